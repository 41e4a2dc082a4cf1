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

Inference runs no loss: `forward` computes embeddings and logits, and the nested loss only with
`return_loss=True`. Pooling is a sum over lesions (`pooling.PatientSums`), so a patient whose lesions are
spread over several batches can be pooled exactly (`new_patient_sums` / `add_lesions` / `phenotype_from_sums`).

Class order: `SLIMPOutput -> SLIMPPreTrainedModel -> SLIMPModel -> SLIMPForLesionClassification`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput, logging

from .configuration_slimp import SLIMPConfig, SLIMPMetadataConfig
from .losses import NestedContrastiveLoss, NestedLossOutput, clamped_logit_scale, distributed_context
from .metadata_encoder import SLIMPFeatureTokenizer, SLIMPMetadataEncoder
from .pooling import PatientSums, SLIMPAttentionPooling

logger = logging.get_logger(__name__)


@dataclass
class SLIMPOutput(ModelOutput):
    """Output of `SLIMPModel.forward`. N lesions, P patients, D = projection_dim.

    loss (`()`): `(1 − w)·[λ·lesion_loss + (1 − λ)·patient_loss] + w·image_ssl_loss`, with `return_loss=True`.
    lesion_loss (`()`): symmetric InfoNCE of images vs lesion metadata.
    patient_loss (`()`): symmetric InfoNCE of phenotypes vs patient metadata (0 with fewer than 2 patients).
    image_ssl_loss (`()`): SimCLR NT-Xent between two views, when `ssl_pixel_values` and w > 0.
    logits_per_image (`(N, N)`): lesion scale · image_embeds @ lesion_metadata_embedsᵀ. In training mode
        under `torch.distributed` with `return_loss=True`: (N_local, N_global), this process's rows.
    logits_per_phenotype (`(P, P)`): patient scale · phenotype_embeds @ patient_metadata_embedsᵀ (same rule).
    image_embeds, lesion_metadata_embeds (`(N, D)`), phenotype_embeds, patient_metadata_embeds (`(P, D)`):
        L2-normalised embeddings.
    image_pooled_output (`(N, C)`), lesion_metadata_pooled_output (`(N, H)`), patient_metadata_pooled_output
        (`(P, H')`): the tower outputs before the projections (pooled image feature, metadata [CLS]).
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
    image_pooled_output: torch.FloatTensor | None = None
    lesion_metadata_pooled_output: torch.FloatTensor | None = None
    patient_metadata_pooled_output: torch.FloatTensor | None = None
    vision_model_output: ModelOutput | None = None


def vision_feature_size(config: SLIMPConfig) -> int:
    """Width of the image tower's pooled feature: last stage width for CNNs, hidden size for ViTs."""
    hidden_sizes = getattr(config.vision_config, "hidden_sizes", None)
    return hidden_sizes[-1] if hidden_sizes else config.vision_config.hidden_size


def uses_cls_token(vision_config) -> bool:
    """True for token backbones (ViT, DINOv2): image feature = final-norm [CLS]; CNNs use their pooler."""
    return not getattr(vision_config, "hidden_sizes", None)


def pooled_image_feature(vision_config, output: ModelOutput) -> torch.Tensor:
    """(N, C) the image feature of a backbone's output: the final-norm [CLS] of a token backbone (ViT,
    DINOv2), the pooler output (global average pool) of a CNN."""
    if uses_cls_token(vision_config):
        return output.last_hidden_state[:, 0]
    return output.pooler_output.flatten(1)


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
                if parameter is not None:
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


# ----- input checks: a ValueError that names the input and what was expected, never a raw shape error -----
def _rows(numerical: torch.Tensor | None, categorical: torch.Tensor | None) -> int | None:
    for tensor in (numerical, categorical):
        if tensor is not None:
            return tensor.shape[0]
    return None


def _check_pixel_values(pixel_values: torch.Tensor, name: str = "pixel_values") -> None:
    if not torch.is_tensor(pixel_values) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
        raise ValueError(f"{name} must be a (N, 3, H, W) tensor of images, got {shape}; a single image needs a batch "
                         "dimension (pixel_values[None]).")
    if pixel_values.shape[0] == 0:
        raise ValueError(f"{name} holds no image (N = 0); give at least one lesion.")
    if not pixel_values.is_floating_point():
        raise ValueError(f"{name} has dtype {pixel_values.dtype}: the model takes normalised float images. Run raw "
                         "images through SLIMPProcessor (or its image processor) first.")


def _check_metadata(name: str, tensor: torch.Tensor | None, rows: int, columns: int, what: str, floating: bool) -> None:
    if tensor is None:
        return
    if tensor.ndim != 2 or tensor.shape != (rows, columns):
        raise ValueError(f"{name} must have shape ({rows}, {columns}): one row per {what} and one column per feature "
                         f"of the config's schema, got {tuple(tensor.shape)}.")
    if not floating and tensor.is_floating_point():
        raise ValueError(f"{name} must hold integer category ids (0 = missing), got dtype {tensor.dtype}.")


def resolve_patients(patient_index: torch.Tensor | None, num_patients: int | None, num_lesions: int,
                     device) -> tuple[torch.Tensor, int]:
    """Validated `(patient_index (N,) long, P)`. Without `patient_index` every lesion is its own patient.

    `num_patients` is the number of patient metadata rows, when given; otherwise P = max index + 1.
    Raises ValueError naming `patient_index` for a wrong shape or dtype, an index outside [0, P), or a
    patient row that no lesion points to (its phenotype would be empty).
    """
    if patient_index is None:
        if num_patients not in (None, num_lesions):
            raise ValueError(f"patient metadata has {num_patients} rows but no patient_index maps the {num_lesions} "
                             "lesions to them; give patient_index (N,) with values in [0, P).")
        return torch.arange(num_lesions, device=device), num_lesions
    if not torch.is_tensor(patient_index) or patient_index.shape != (num_lesions,):
        shape = tuple(patient_index.shape) if torch.is_tensor(patient_index) else type(patient_index).__name__
        raise ValueError(f"patient_index must have shape ({num_lesions},), one entry per lesion, got {shape}.")
    if patient_index.is_floating_point() or patient_index.dtype == torch.bool:
        raise ValueError(f"patient_index must hold integer patient indices, got dtype {patient_index.dtype}.")
    patient_index = patient_index.long()

    def lesions_per_row(rows: int) -> torch.Tensor:  # (rows,) lesions pointing at each patient row
        ones = torch.ones(num_lesions, device=patient_index.device)
        return torch.zeros(rows, device=patient_index.device).index_add(0, patient_index.clamp(0, max(rows - 1, 0)), ones)

    if num_patients is None:  # P from the indices: one host sync more
        num_patients = int(patient_index.max()) + 1 if num_lesions else 0
    hits = lesions_per_row(num_patients)
    # One host sync for the three checks.
    low, high, empty = (int(v) for v in torch.stack([patient_index.min(), patient_index.max(), (hits == 0).sum()]).tolist())
    if low < 0 or high >= num_patients:
        raise ValueError(f"patient_index must lie in [0, {num_patients}) (P = {num_patients} patient rows), got values "
                         f"from {low} to {high}.")
    if empty:
        rows = torch.nonzero(hits == 0).flatten()[:5].tolist()
        raise ValueError(f"patient rows {rows} have no lesion in patient_index: every patient row needs at least one "
                         "lesion (its phenotype is the pool of its lesions); leave such patients out of the batch.")
    return patient_index, num_patients


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
        self.contrastive_loss = NestedContrastiveLoss()
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

    def logit_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lesion, patient) logit scales: exp of the learned log scales, clamped at `config.max_logit_scale`."""
        ceiling = self.config.max_logit_scale
        return clamped_logit_scale(self.lesion_logit_scale, ceiling), clamped_logit_scale(self.patient_logit_scale, ceiling)

    # ----- towers: outputs before the projections -----
    def image_tower(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        """(N, 3, H, W) -> (pooled feature (N, C), backbone output): the final-norm [CLS] of a token
        backbone (ViT, DINOv2), the pooler output of a CNN (global average pool)."""
        output = self.vision_model(pixel_values=pixel_values.to(self.dtype))
        return pooled_image_feature(self.config.vision_config, output), output

    def lesion_metadata_tower(self, lesion_numerical_values=None, lesion_categorical_ids=None, num_lesions=None) -> torch.Tensor:
        """(N, Fn) raw values + (N, Fc) ids -> the lesion tower's final-norm [CLS] (N, H)."""
        return self._metadata_tower(self.lesion_metadata_model, lesion_numerical_values, lesion_categorical_ids, num_lesions)

    def patient_metadata_tower(self, patient_numerical_values=None, patient_categorical_ids=None, num_patients=None) -> torch.Tensor:
        """(P, Gn) raw values + (P, Gc) ids -> the patient tower's final-norm [CLS] (P, H')."""
        return self._metadata_tower(self.patient_metadata_model, patient_numerical_values, patient_categorical_ids, num_patients)

    def _metadata_tower(self, tower: SLIMPMetadataEncoder, numerical, categorical, rows) -> torch.Tensor:
        rows = rows if rows is not None else _rows(numerical, categorical)
        if rows is None:
            raise ValueError("give the metadata tensors or the number of rows they would have")
        missing_numerical, missing_categorical = _missing_metadata(tower.config, rows, self.device)
        return tower(numerical if numerical is not None else missing_numerical,
                     categorical if categorical is not None else missing_categorical)

    # ----- projected features (un-normalised), as CLIP's get_*_features -----
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> projected, un-normalised image features (N, D)."""
        return self.visual_projection(self.image_tower(pixel_values)[0])

    def get_lesion_metadata_features(self, lesion_numerical_values=None, lesion_categorical_ids=None, num_lesions=None) -> torch.Tensor:
        """(N, Fn) raw values + (N, Fc) ids -> projected, un-normalised features (N, D)."""
        return self.lesion_metadata_projection(self.lesion_metadata_tower(lesion_numerical_values, lesion_categorical_ids, num_lesions))

    def get_patient_metadata_features(self, patient_numerical_values=None, patient_categorical_ids=None, num_patients=None) -> torch.Tensor:
        """(P, Gn) raw values + (P, Gc) ids -> projected, un-normalised features (P, D)."""
        return self.patient_metadata_projection(self.patient_metadata_tower(patient_numerical_values, patient_categorical_ids, num_patients))

    # ----- the phenotype: per-patient sums, exact however the lesions are batched -----
    def new_patient_sums(self, num_patients: int, device=None) -> PatientSums:
        """Empty per-patient sums of lesion representations (N, 2D) for `num_patients` patients."""
        return PatientSums(num_patients, 2 * self.config.projection_dim, attention=self.patient_pooling is not None,
                           device=device if device is not None else self.device)

    def add_lesions(self, sums: PatientSums, image_embeds: torch.Tensor, lesion_metadata_embeds: torch.Tensor,
                    patient_index: torch.Tensor) -> PatientSums:
        """Add lesions (L2-normalised embeddings (N, D) each) to their patients' rows `patient_index` (N,)."""
        lesions = torch.cat([image_embeds, lesion_metadata_embeds], dim=-1)  # (N, 2D)
        scores = self.patient_pooling(lesions) if self.patient_pooling is not None else None
        return sums.add(lesions, patient_index, scores)

    def phenotype_from_sums(self, sums: PatientSums) -> torch.Tensor:
        """Projected, un-normalised phenotype features (P, D) of the pooled lesions."""
        pooled = sums.attention_pool() if self.patient_pooling is not None else sums.mean()  # (P, 2D)
        return self.phenotype_projection(pooled.to(self.phenotype_projection.weight.dtype))

    def aggregate_phenotype(self, image_embeds: torch.Tensor, lesion_metadata_embeds: torch.Tensor,
                            patient_index: torch.Tensor, num_patients: int) -> torch.Tensor:
        """Lesion representations pooled per patient and projected: phenotype features (P, D)."""
        sums = self.add_lesions(self.new_patient_sums(num_patients, image_embeds.device), image_embeds,
                                lesion_metadata_embeds, patient_index)
        return self.phenotype_from_sums(sums)

    def get_phenotype_features(self, pixel_values, lesion_numerical_values=None, lesion_categorical_ids=None,
                               patient_index=None, num_patients=None) -> torch.Tensor:
        """Projected, un-normalised phenotype features (P, D) of the patients of a batch of lesions."""
        _check_pixel_values(pixel_values)
        patient_index, num_patients = resolve_patients(patient_index, num_patients, pixel_values.shape[0], pixel_values.device)
        image_embeds = F.normalize(self.get_image_features(pixel_values), dim=-1)
        lesion_embeds = F.normalize(
            self.get_lesion_metadata_features(lesion_numerical_values, lesion_categorical_ids, pixel_values.shape[0]), dim=-1
        )
        return self.aggregate_phenotype(image_embeds, lesion_embeds, patient_index, num_patients)

    def check_inputs(self, pixel_values, lesion_numerical_values=None, lesion_categorical_ids=None,
                     patient_numerical_values=None, patient_categorical_ids=None, patient_index=None) -> tuple[torch.Tensor, int]:
        """Validate a batch (see the input table of the README); returns `(patient_index, P)`."""
        _check_pixel_values(pixel_values)
        num_lesions = pixel_values.shape[0]
        lesion, patient = self.config.lesion_metadata_config, self.config.patient_metadata_config
        _check_metadata("lesion_numerical_values", lesion_numerical_values, num_lesions, lesion.num_numerical, "lesion", True)
        _check_metadata("lesion_categorical_ids", lesion_categorical_ids, num_lesions, lesion.num_categorical, "lesion", False)
        num_patients = _rows(patient_numerical_values, patient_categorical_ids)
        if patient_numerical_values is not None and patient_categorical_ids is not None \
                and patient_numerical_values.shape[0] != patient_categorical_ids.shape[0]:
            raise ValueError(f"patient_numerical_values has {patient_numerical_values.shape[0]} rows but "
                             f"patient_categorical_ids has {patient_categorical_ids.shape[0]}: one row per patient in both.")
        patient_index, num_patients = resolve_patients(patient_index, num_patients, num_lesions, pixel_values.device)
        _check_metadata("patient_numerical_values", patient_numerical_values, num_patients, patient.num_numerical, "patient", True)
        _check_metadata("patient_categorical_ids", patient_categorical_ids, num_patients, patient.num_categorical, "patient", False)
        return patient_index, num_patients

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

        The nested loss runs only with `return_loss=True`. In training mode under an initialised
        `torch.distributed`, its embeddings are gathered across processes (each process must hold whole
        patients) and the loss is the global-batch loss; in eval mode (validation) it is the loss of this
        process's batch.
        """
        patient_index, num_patients = self.check_inputs(pixel_values, lesion_numerical_values, lesion_categorical_ids,
                                                        patient_numerical_values, patient_categorical_ids, patient_index)
        num_lesions = pixel_values.shape[0]
        image_pooled, vision_output = self.image_tower(pixel_values)  # (N, C)
        lesion_pooled = self.lesion_metadata_tower(lesion_numerical_values, lesion_categorical_ids, num_lesions)  # (N, H)
        patient_pooled = self.patient_metadata_tower(patient_numerical_values, patient_categorical_ids, num_patients)  # (P, H')
        image_embeds = F.normalize(self.visual_projection(image_pooled), dim=-1)  # (N, D)
        lesion_metadata_embeds = F.normalize(self.lesion_metadata_projection(lesion_pooled), dim=-1)  # (N, D)
        patient_metadata_embeds = F.normalize(self.patient_metadata_projection(patient_pooled), dim=-1)  # (P, D)
        phenotype_embeds = F.normalize(
            self.aggregate_phenotype(image_embeds, lesion_metadata_embeds, patient_index, num_patients), dim=-1
        )  # (P, D)
        lesion_scale, patient_scale = self.logit_scales()
        terms: NestedLossOutput | None = None
        if return_loss:
            ssl_embeds = None
            if ssl_pixel_values is not None and self.config.image_ssl_weight > 0:
                _check_pixel_values(ssl_pixel_values, "ssl_pixel_values")
                ssl_embeds = F.normalize(self.get_image_features(ssl_pixel_values), dim=-1)
            rank, world_size = distributed_context() if self.training else (0, 1)
            terms = self.contrastive_loss(
                image_embeds, lesion_metadata_embeds, phenotype_embeds, patient_metadata_embeds, lesion_scale, patient_scale,
                lesion_loss_weight=self.config.lesion_loss_weight, ssl_image_embeds=ssl_embeds,
                image_ssl_weight=self.config.image_ssl_weight, ssl_temperature=self.config.ssl_temperature,
                rank=rank, world_size=world_size,
            )
            logits_per_image, logits_per_phenotype = terms.logits_per_image, terms.logits_per_phenotype
        else:
            logits_per_image = lesion_scale * image_embeds @ lesion_metadata_embeds.t()  # (N, N)
            logits_per_phenotype = patient_scale * phenotype_embeds @ patient_metadata_embeds.t()  # (P, P)
        return SLIMPOutput(
            loss=terms.loss if terms else None,
            lesion_loss=terms.lesion_loss if terms else None,
            patient_loss=terms.patient_loss if terms else None,
            image_ssl_loss=terms.image_ssl_loss if terms else None,
            logits_per_image=logits_per_image,
            logits_per_phenotype=logits_per_phenotype,
            image_embeds=image_embeds,
            lesion_metadata_embeds=lesion_metadata_embeds,
            phenotype_embeds=phenotype_embeds,
            patient_metadata_embeds=patient_metadata_embeds,
            image_pooled_output=image_pooled,
            lesion_metadata_pooled_output=lesion_pooled,
            patient_metadata_pooled_output=patient_pooled,
            vision_model_output=vision_output,
        )


class SLIMPForLesionClassification(SLIMPPreTrainedModel):
    """A lesion classifier on SLIMP features: `classifier(concat(parts))`.

    Parts (`config.classifier_features`): the image feature; the lesion-metadata feature; the feature of
    the lesion's patient's metadata; and the patient context, the lesion's image (+ lesion-metadata)
    representation minus the mean of the same patient's other lesions in the batch (zero for a
    one-lesion patient). `config.classifier_representation` picks the projected, un-normalised features
    or the tower outputs before the projection.

    Absent metadata is missing and, without `patient_index`, every lesion is its own patient, so
    `pipeline("image-classification")`, which passes only `pixel_values`, works and its path is affine
    in the image feature (exportable to a built-in classifier). A head fitted on metadata or context is
    not fitted for that path, so it then warns once (its model card scores it: "test, images only"). For
    a patient whose lesions do not fit
    in one batch, compute `lesion_features` batch by batch, pool them with `pooling.PatientSums` and call
    `classify` (what the project's evaluation does), so the context covers all of the patient's lesions.
    """

    def __init__(self, config: SLIMPConfig):
        super().__init__(config)
        self.slimp = SLIMPModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        sizes = self.part_sizes()
        self.classifier = nn.Linear(sum(sizes[part] for part in self.parts), config.num_labels)
        self._warned_images_only = False
        self.post_init()

    @property
    def parts(self) -> list[str]:
        """The parts the head reads, in order (`config.classifier_features` split at "+")."""
        return self.config.classifier_features.split("+")

    def part_sizes(self) -> dict[str, int]:
        """Width of each part in the head's input."""
        config = self.config
        if config.classifier_representation == "projection":
            sizes = dict.fromkeys(("image", "lesion", "patient"), config.projection_dim)
        else:
            sizes = {"image": vision_feature_size(config), "lesion": config.lesion_metadata_config.hidden_size,
                     "patient": config.patient_metadata_config.hidden_size}
        sizes["context"] = sum(sizes[part] for part in self.context_parts())
        return sizes

    def context_parts(self) -> list[str]:
        """The lesion-level parts whose representation the context compares: image, and lesion if read."""
        return [part for part in ("image", "lesion") if part in self.parts]

    def lesion_features(self, pixel_values, lesion_numerical_values=None, lesion_categorical_ids=None,
                        patient_numerical_values=None, patient_categorical_ids=None, patient_index=None) -> dict[str, torch.Tensor]:
        """The head's parts but the context, one row per lesion: `{"image": (N, ·), "lesion": ..., "patient": ...}`
        (only those in `config.classifier_features`), plus `patient_index` (N,) and `num_patients`."""
        slimp = self.slimp
        patient_index, num_patients = slimp.check_inputs(pixel_values, lesion_numerical_values, lesion_categorical_ids,
                                                         patient_numerical_values, patient_categorical_ids, patient_index)
        projected = self.config.classifier_representation == "projection"
        image = slimp.image_tower(pixel_values)[0]
        features = {"image": slimp.visual_projection(image) if projected else image}
        if "lesion" in self.parts:
            lesion = slimp.lesion_metadata_tower(lesion_numerical_values, lesion_categorical_ids, pixel_values.shape[0])
            features["lesion"] = slimp.lesion_metadata_projection(lesion) if projected else lesion
        if "patient" in self.parts:
            patient = slimp.patient_metadata_tower(patient_numerical_values, patient_categorical_ids, num_patients)
            features["patient"] = (slimp.patient_metadata_projection(patient) if projected else patient)[patient_index]
        return {**features, "patient_index": patient_index, "num_patients": num_patients}

    def context_representation(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C) the representation the context compares: concat of the image (+ lesion) parts."""
        return torch.cat([features[part] for part in self.context_parts()], dim=-1)

    def batch_context(self, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The patient context over the lesions of this batch (None when the head does not read it): each
        lesion's representation minus the mean of its patient's other lesions in `features` (`lesion_features`)."""
        if "context" not in self.parts:
            return None
        representation = self.context_representation(features)
        sums = PatientSums(features["num_patients"], representation.shape[-1], device=representation.device,
                           dtype=representation.dtype).add(representation, features["patient_index"])
        return sums.context(representation, features["patient_index"])

    def classify(self, features: dict[str, torch.Tensor], context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, num_labels) from `lesion_features` and, when the head reads it, the context (N, C)."""
        inputs = []
        for part in self.parts:
            if part == "context":
                if context is None:
                    raise ValueError("this classifier reads the patient context: pass `context` (see PatientSums.context)")
                inputs.append(context)
            else:
                inputs.append(features[part])
        return self.classifier(self.dropout(torch.cat(inputs, dim=-1)))

    def forward(
        self,
        pixel_values: torch.Tensor,
        lesion_numerical_values: torch.Tensor | None = None,
        lesion_categorical_ids: torch.Tensor | None = None,
        patient_numerical_values: torch.Tensor | None = None,
        patient_categorical_ids: torch.Tensor | None = None,
        patient_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        """Returns `ImageClassifierOutput` with logits (N, num_labels) and, given labels (N,), the loss.

        The loss is the class-weighted cross-entropy summed over the labelled lesions (label -100: none)
        and divided by `num_items_in_batch` when given (what `transformers.Trainer` passes under gradient
        accumulation: the labelled lesions of all the accumulated batches), else by this batch's count, so
        k accumulated batches give exactly the gradient of one batch k times larger. A batch without any
        labelled lesion has loss 0.
        """
        if self.parts != ["image"] and not self._warned_images_only and all(value is None for value in (
                lesion_numerical_values, lesion_categorical_ids, patient_numerical_values, patient_categorical_ids,
                patient_index)):
            self._warned_images_only = True  # once per model
            logger.warning(
                f"This classifier reads {self.config.classifier_features} but was given images only: every metadata "
                "value is treated as missing and each lesion as its own patient, which is not what its head was fitted "
                "on (training/finetune.py scores this use in the 'test, images only' row of its card). Pass metadata "
                "and patient_id through the processor, or fine-tune with classifier_features='image' for image-only use.")
        features = self.lesion_features(pixel_values, lesion_numerical_values, lesion_categorical_ids,
                                        patient_numerical_values, patient_categorical_ids, patient_index)
        logits = self.classify(features, self.batch_context(features))  # (N, num_labels)
        loss = self.classification_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                            num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        """Class-weighted cross-entropy sum over labelled lesions / `num_items_in_batch` (see `forward`)."""
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels must have shape ({logits.shape[0]},), one per lesion, got {tuple(labels.shape)}.")
        labels = labels.long()
        labelled = labels != -100
        per_lesion = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
        if self.config.class_weights is not None:
            weight = torch.tensor(self.config.class_weights, dtype=torch.float32, device=logits.device)
            per_lesion = per_lesion * weight[labels.clamp(min=0)]
        total = torch.where(labelled, per_lesion, torch.zeros_like(per_lesion)).sum()
        count = num_items_in_batch if num_items_in_batch is not None else labelled.sum()
        if torch.is_tensor(count):
            return total / count.to(total.device, total.dtype).clamp(min=1)
        return total / max(int(count), 1)


SLIMPConfig.register_for_auto_class("AutoConfig")
SLIMPModel.register_for_auto_class("AutoModel")
SLIMPForLesionClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["SLIMPOutput", "SLIMPPreTrainedModel", "SLIMPModel", "SLIMPForLesionClassification", "SLIMPAttentionPooling",
           "resolve_patients"]
