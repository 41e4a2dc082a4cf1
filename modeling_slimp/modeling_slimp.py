"""SLIMP: Skin Lesion Image-Metadata Pre-training with a nested contrastive loss.

Paper: "Skin Lesion Phenotyping via Nested Multi-modal Contrastive Learning", Christopoulos et al.,
arXiv 2505.23709 (2025).

One batch holds N lesions of P patients:

    pixel_values (N, 3, H, W) --image tower--> image_embeds (N, D) ----.
    lesion metadata (N, Fn|Fc) --FT-Transformer--> lesion_metadata_embeds (N, D)
                                                                       |  lesion loss: image <-> lesion metadata
    concat(image_embeds, lesion_metadata_embeds) (N, 2D) --pool by patient_index--> (P, 2D)
        --projection--> phenotype_embeds (P, D)
    patient metadata (P, Gn|Gc) --FT-Transformer--> patient_metadata_embeds (P, D)
                                                          patient loss: phenotype <-> patient metadata

Class order: `SLIMPOutput -> SLIMPAttentionPooling -> SLIMPPreTrainedModel -> SLIMPModel ->
SLIMPForLesionClassification`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_slimp import SLIMPConfig, SLIMPMetadataConfig
from .losses import NestedContrastiveLoss, distributed_context
from .metadata_encoder import SLIMPFeatureTokenizer, SLIMPMetadataEncoder


@dataclass
class SLIMPOutput(ModelOutput):
    """Output of `SLIMPModel.forward`. N lesions, P patients, D = projection_dim.

    loss (`()`): `(1 − w)·[λ·lesion_loss + (1 − λ)·patient_loss] + w·image_ssl_loss`, with `return_loss=True`.
    lesion_loss (`()`): symmetric InfoNCE of images vs lesion metadata.
    patient_loss (`()`): symmetric InfoNCE of phenotypes vs patient metadata (0 with fewer than 2 patients).
    image_ssl_loss (`()`): SimCLR NT-Xent between two views, when `ssl_pixel_values` and w > 0.
    logits_per_image (`(N, N)`): lesion scale · image_embeds @ lesion_metadata_embedsᵀ. Under
        `torch.distributed` with `return_loss=True`: (N_local, N_global), this process's rows.
    logits_per_phenotype (`(P, P)`): patient scale · phenotype_embeds @ patient_metadata_embedsᵀ (same rule).
    image_embeds, lesion_metadata_embeds (`(N, D)`), phenotype_embeds, patient_metadata_embeds (`(P, D)`):
        L2-normalised embeddings.
    vision_model_output: the image backbone's own output.
    """

    loss: torch.FloatTensor | None = None
    lesion_loss: torch.FloatTensor | None = None
    patient_loss: torch.FloatTensor | None = None
    image_ssl_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_phenotype: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    lesion_metadata_embeds: torch.FloatTensor | None = None
    phenotype_embeds: torch.FloatTensor | None = None
    patient_metadata_embeds: torch.FloatTensor | None = None
    vision_model_output: ModelOutput | None = None


def vision_feature_size(config: SLIMPConfig) -> int:
    """Width of the image tower's pooled feature: last stage width for CNNs, hidden size for ViTs."""
    hidden_sizes = getattr(config.vision_config, "hidden_sizes", None)
    return hidden_sizes[-1] if hidden_sizes else config.vision_config.hidden_size


def uses_cls_token(vision_config) -> bool:
    """True for token backbones (ViT, DINOv2): image feature = final-norm [CLS]; CNNs use their pooler."""
    return not getattr(vision_config, "hidden_sizes", None)


def pool_by_patient(values: torch.Tensor, patient_index: torch.Tensor, num_patients: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Ragged pooling: (N, C) rows -> (P, C), the (weighted) mean of each patient's rows. No padding, no loop.

    weights (N,) must already sum to 1 within each patient; without them the plain mean is taken.
    """
    if weights is None:
        # Counts by index_add, not bincount: CUDA bincount reads the index min/max back to the host (a sync).
        ones = torch.ones(patient_index.shape[0], device=values.device)  # float32: exact counts to 2**24
        counts = ones.new_zeros(num_patients).index_add_(0, patient_index, ones).clamp(min=1).to(values.dtype)  # (P,)
        weights = 1.0 / counts[patient_index]
    pooled = values.new_zeros((num_patients, values.shape[-1]))
    return pooled.index_add(0, patient_index, values * weights.unsqueeze(-1).to(values.dtype))


class SLIMPAttentionPooling(nn.Module):
    """Gated attention pooling (Ilse et al., 2018, arXiv 1802.04712) over each patient's lesions.

    A rare malignant lesion can carry a large weight instead of being averaged away among hundreds of
    benign ones. (N, C) + patient_index (N,) -> (P, C); softmax within each patient, vectorised.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.attention_v = nn.Linear(input_size, hidden_size)
        self.attention_u = nn.Linear(input_size, hidden_size)
        self.attention_w = nn.Linear(hidden_size, 1)

    def forward(self, values: torch.Tensor, patient_index: torch.Tensor, num_patients: int) -> torch.Tensor:
        gate = torch.tanh(self.attention_v(values)) * torch.sigmoid(self.attention_u(values))
        scores = self.attention_w(gate).squeeze(-1).float()  # (N,)
        peak = scores.new_full((num_patients,), float("-inf")).scatter_reduce(0, patient_index, scores, "amax")
        expd = torch.exp(scores - peak[patient_index].detach())
        totals = expd.new_zeros(num_patients).index_add(0, patient_index, expd)
        return pool_by_patient(values, patient_index, num_patients, weights=expd / totals[patient_index])


class SLIMPPreTrainedModel(PreTrainedModel):
    config_class = SLIMPConfig
    base_model_prefix = "slimp"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SLIMPEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, SLIMPFeatureTokenizer):
            # Per-feature affine maps of a unit-variance input, as in the FT-Transformer.
            bound = 1 / math.sqrt(module.config.hidden_size)
            for parameter in (module.numerical_weight, module.numerical_bias, module.numerical_missing):
                nn.init.uniform_(parameter, -bound, bound)
            module.reset_schema_buffers()
        elif isinstance(module, SLIMPMetadataEncoder):
            nn.init.normal_(module.cls_token, std=std)
        elif isinstance(module, SLIMPModel):
            nn.init.constant_(module.lesion_logit_scale, self.config.logit_scale_init_value)
            nn.init.constant_(module.patient_logit_scale, self.config.logit_scale_init_value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, with an `auto_map` naming all three auto classes whichever class is saved."""
        self.config.auto_map = {
            "AutoConfig": "configuration_slimp.SLIMPConfig",
            "AutoModel": "modeling_slimp.SLIMPModel",
            "AutoModelForImageClassification": "modeling_slimp.SLIMPForLesionClassification",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


def _missing_metadata(config: SLIMPMetadataConfig, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All-missing metadata for `rows` items: (rows, Fn) NaN and (rows, Fc) zeros."""
    numerical = torch.full((rows, config.num_numerical), float("nan"), device=device)
    categorical = torch.zeros((rows, config.num_categorical), dtype=torch.long, device=device)
    return numerical, categorical


class SLIMPModel(SLIMPPreTrainedModel):
    """The three towers, the projections, the patient aggregation and the nested contrastive loss.

    Any metadata input may be omitted: it is then all missing. Without `patient_index` every lesion is
    its own patient.
    """

    def __init__(self, config: SLIMPConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        if uses_cls_token(config.vision_config) and getattr(self.vision_model, "pooler", None) is not None:
            self.vision_model.pooler = None  # the feature is the final-norm [CLS]; an unused pooler breaks DDP
        embeddings = getattr(self.vision_model, "embeddings", None)
        if isinstance(getattr(embeddings, "mask_token", None), nn.Parameter):
            # Masked-image modelling only (DINOv2 has one): a parameter that never gets a gradient breaks DDP.
            # A buffer of the same name keeps the checkpoint key (exports, vision checkpoints) and trains nothing.
            mask_token = embeddings.mask_token.data
            del embeddings.mask_token
            embeddings.register_buffer("mask_token", mask_token)
        self.lesion_metadata_model = SLIMPMetadataEncoder(config.lesion_metadata_config)
        self.patient_metadata_model = SLIMPMetadataEncoder(config.patient_metadata_config)
        dim = config.projection_dim
        self.visual_projection = nn.Linear(vision_feature_size(config), dim)
        self.lesion_metadata_projection = nn.Linear(config.lesion_metadata_config.hidden_size, dim)
        self.patient_metadata_projection = nn.Linear(config.patient_metadata_config.hidden_size, dim)
        self.patient_pooling = SLIMPAttentionPooling(2 * dim, dim) if config.patient_aggregation == "attention" else None
        self.phenotype_projection = nn.Linear(2 * dim, dim)
        self.lesion_logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.patient_logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.contrastive_loss = NestedContrastiveLoss(config.lesion_loss_weight, config.image_ssl_weight, config.ssl_temperature)
        self.post_init()

    @classmethod
    def from_vision_pretrained(cls, vision_model_name_or_path: str, config: SLIMPConfig | None = None, **kwargs):
        """Build SLIMP with its image tower initialised from a transformers vision checkpoint.

        The checkpoint's config replaces `config.vision_config`; the other towers are freshly initialised.
        kwargs go to `AutoModel.from_pretrained` of the vision checkpoint (e.g. `revision`).
        """
        vision_model = AutoModel.from_pretrained(vision_model_name_or_path, **kwargs)
        config = config if config is not None else SLIMPConfig()
        config.vision_config = vision_model.config
        model = cls(config)
        missing, unexpected = model.vision_model.load_state_dict(vision_model.state_dict(), strict=False)
        if missing:
            raise ValueError(f"Vision checkpoint '{vision_model_name_or_path}' lacks weights for: {missing[:10]}")
        return model

    # ----- features -----
    def _image_feature(self, pixel_values: torch.Tensor):
        output = self.vision_model(pixel_values=pixel_values.to(self.dtype))
        if uses_cls_token(self.config.vision_config):
            return output.last_hidden_state[:, 0], output  # (N, C)
        return output.pooler_output.flatten(1), output  # (N, C)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> projected, un-normalised image features (N, D)."""
        return self.visual_projection(self._image_feature(pixel_values)[0])

    def _metadata_inputs(self, config: SLIMPMetadataConfig, rows: int, numerical, categorical, device):
        default_numerical, default_categorical = _missing_metadata(config, rows, device)
        return (numerical if numerical is not None else default_numerical,
                categorical if categorical is not None else default_categorical)

    def get_lesion_metadata_features(self, lesion_numerical_values=None, lesion_categorical_ids=None, num_lesions=None) -> torch.Tensor:
        """(N, Fn) raw values + (N, Fc) ids -> projected, un-normalised features (N, D)."""
        rows = num_lesions if num_lesions is not None else _rows(lesion_numerical_values, lesion_categorical_ids)
        numerical, categorical = self._metadata_inputs(
            self.config.lesion_metadata_config, rows, lesion_numerical_values, lesion_categorical_ids, self.device
        )
        return self.lesion_metadata_projection(self.lesion_metadata_model(numerical, categorical))

    def get_patient_metadata_features(self, patient_numerical_values=None, patient_categorical_ids=None, num_patients=None) -> torch.Tensor:
        """(P, Gn) raw values + (P, Gc) ids -> projected, un-normalised features (P, D)."""
        rows = num_patients if num_patients is not None else _rows(patient_numerical_values, patient_categorical_ids)
        numerical, categorical = self._metadata_inputs(
            self.config.patient_metadata_config, rows, patient_numerical_values, patient_categorical_ids, self.device
        )
        return self.patient_metadata_projection(self.patient_metadata_model(numerical, categorical))

    def aggregate_phenotype(self, image_embeds: torch.Tensor, lesion_metadata_embeds: torch.Tensor,
                            patient_index: torch.Tensor, num_patients: int) -> torch.Tensor:
        """Lesion representations (N, 2D) pooled per patient and projected: phenotype features (P, D)."""
        lesions = torch.cat([image_embeds, lesion_metadata_embeds], dim=-1)  # (N, 2D)
        if self.patient_pooling is not None:
            pooled = self.patient_pooling(lesions, patient_index, num_patients)
        else:
            pooled = pool_by_patient(lesions, patient_index, num_patients)
        return self.phenotype_projection(pooled)  # (P, D)

    def get_phenotype_features(self, pixel_values, lesion_numerical_values=None, lesion_categorical_ids=None,
                               patient_index=None, num_patients=None) -> torch.Tensor:
        """Projected, un-normalised phenotype features (P, D) of the patients of a batch of lesions."""
        image_embeds = F.normalize(self.get_image_features(pixel_values), dim=-1)
        lesion_embeds = F.normalize(
            self.get_lesion_metadata_features(lesion_numerical_values, lesion_categorical_ids, pixel_values.shape[0]), dim=-1
        )
        patient_index, num_patients = _resolve_patients(patient_index, num_patients, pixel_values.shape[0], pixel_values.device)
        return self.aggregate_phenotype(image_embeds, lesion_embeds, patient_index, num_patients)

    def forward(
        self,
        pixel_values: torch.Tensor,
        lesion_numerical_values: torch.Tensor | None = None,
        lesion_categorical_ids: torch.Tensor | None = None,
        patient_numerical_values: torch.Tensor | None = None,
        patient_categorical_ids: torch.Tensor | None = None,
        patient_index: torch.Tensor | None = None,
        ssl_pixel_values: torch.Tensor | None = None,
        return_loss: bool = False,
        **kwargs,
    ) -> SLIMPOutput:
        """See `SLIMPOutput`. `ssl_pixel_values` (N, 3, H, W): a second view of each image for the SimCLR term.

        With `return_loss=True` under an initialised `torch.distributed`, embeddings are gathered across
        processes (each process must hold whole patients) and the loss is the global-batch loss.
        """
        num_lesions = pixel_values.shape[0]
        num_patients = _rows(patient_numerical_values, patient_categorical_ids) if patient_index is not None else None
        patient_index, num_patients = _resolve_patients(patient_index, num_patients, num_lesions, pixel_values.device)
        image_features, vision_output = self._image_feature(pixel_values)
        image_embeds = F.normalize(self.visual_projection(image_features), dim=-1)  # (N, D)
        lesion_metadata_embeds = F.normalize(
            self.get_lesion_metadata_features(lesion_numerical_values, lesion_categorical_ids, num_lesions), dim=-1
        )  # (N, D)
        patient_metadata_embeds = F.normalize(
            self.get_patient_metadata_features(patient_numerical_values, patient_categorical_ids, num_patients), dim=-1
        )  # (P, D)
        phenotype_embeds = F.normalize(
            self.aggregate_phenotype(image_embeds, lesion_metadata_embeds, patient_index, num_patients), dim=-1
        )  # (P, D)
        ssl_embeds = None
        if ssl_pixel_values is not None and self.config.image_ssl_weight > 0:
            ssl_embeds = F.normalize(self.get_image_features(ssl_pixel_values), dim=-1)
        rank, world_size = distributed_context() if return_loss else (0, 1)
        max_scale = self.config.max_logit_scale
        terms = self.contrastive_loss(
            image_embeds, lesion_metadata_embeds, phenotype_embeds, patient_metadata_embeds,
            self.lesion_logit_scale.clamp(max=max_scale).exp(), self.patient_logit_scale.clamp(max=max_scale).exp(),
            ssl_image_embeds=ssl_embeds, rank=rank, world_size=world_size,
        )
        return SLIMPOutput(
            loss=terms.loss if return_loss else None,
            lesion_loss=terms.lesion_loss if return_loss else None,
            patient_loss=terms.patient_loss if return_loss else None,
            image_ssl_loss=terms.image_ssl_loss if return_loss else None,
            logits_per_image=terms.logits_per_image,
            logits_per_phenotype=terms.logits_per_phenotype,
            image_embeds=image_embeds,
            lesion_metadata_embeds=lesion_metadata_embeds,
            phenotype_embeds=phenotype_embeds,
            patient_metadata_embeds=patient_metadata_embeds,
            vision_model_output=vision_output,
        )


def _rows(numerical: torch.Tensor | None, categorical: torch.Tensor | None) -> int | None:
    for tensor in (numerical, categorical):
        if tensor is not None:
            return tensor.shape[0]
    return None


def _resolve_patients(patient_index, num_patients, num_lesions: int, device) -> tuple[torch.Tensor, int]:
    """Default: every lesion is its own patient. Otherwise P = given count, or max index + 1."""
    if patient_index is None:
        return torch.arange(num_lesions, device=device), num_lesions
    if patient_index.shape != (num_lesions,):
        raise ValueError(f"patient_index must have shape ({num_lesions},), one entry per lesion, got {tuple(patient_index.shape)}.")
    patient_index = patient_index.long()
    if num_patients is None:
        num_patients = int(patient_index.max().item()) + 1 if num_lesions else 0
    return patient_index, num_patients


class SLIMPForLesionClassification(SLIMPPreTrainedModel):
    """A lesion classifier on SLIMP features: `classifier(concat(features))`.

    Features (`config.classifier_features`): the projected, un-normalised image features, plus the
    lesion-metadata features, plus the features of the lesion's patient's metadata. Absent metadata is
    missing, so `pipeline("image-classification")`, which passes only `pixel_values`, works; the
    image-only path is then affine in the image feature (exportable to a built-in classifier).
    """

    def __init__(self, config: SLIMPConfig):
        super().__init__(config)
        self.slimp = SLIMPModel(config)
        parts = len(config.classifier_features.split("+"))
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(parts * config.projection_dim, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        lesion_numerical_values: torch.Tensor | None = None,
        lesion_categorical_ids: torch.Tensor | None = None,
        patient_numerical_values: torch.Tensor | None = None,
        patient_categorical_ids: torch.Tensor | None = None,
        patient_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        """Returns `ImageClassifierOutput` with logits (N, num_labels) and, given labels (N,), the loss."""
        num_lesions = pixel_values.shape[0]
        features = [self.slimp.get_image_features(pixel_values)]  # (N, D)
        if "lesion" in self.config.classifier_features.split("+"):
            features.append(self.slimp.get_lesion_metadata_features(lesion_numerical_values, lesion_categorical_ids, num_lesions))
        if "patient" in self.config.classifier_features.split("+"):
            num_patients = _rows(patient_numerical_values, patient_categorical_ids) if patient_index is not None else None
            patient_index, num_patients = _resolve_patients(patient_index, num_patients, num_lesions, pixel_values.device)
            patient_features = self.slimp.get_patient_metadata_features(patient_numerical_values, patient_categorical_ids, num_patients)
            features.append(patient_features[patient_index])  # (N, D)
        logits = self.classifier(self.dropout(torch.cat(features, dim=-1)))  # (N, num_labels)
        loss = None
        if labels is not None:
            weight = None
            if self.config.class_weights is not None:
                weight = torch.tensor(self.config.class_weights, dtype=logits.dtype, device=logits.device)
            loss = F.cross_entropy(logits.float(), labels.long(), weight=weight.float() if weight is not None else None)
        return ImageClassifierOutput(loss=loss, logits=logits)


SLIMPConfig.register_for_auto_class("AutoConfig")
SLIMPModel.register_for_auto_class("AutoModel")
SLIMPForLesionClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["SLIMPOutput", "SLIMPPreTrainedModel", "SLIMPModel", "SLIMPForLesionClassification", "SLIMPAttentionPooling"]
