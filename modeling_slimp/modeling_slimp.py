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

The three towers are transformers sub-models: `attn_implementation` ("sdpa", the default, or "eager"),
`output_attentions`, `output_hidden_states` and gradient checkpointing reach all of them, and the
`get_*_features` methods return output objects whose `pooler_output` is the projected feature, as CLIP's.

Class order: `SLIMPOutput -> SLIMPPreTrainedModel -> SLIMPModel -> SLIMPForLesionClassification`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput, logging

from .configuration_slimp import SLIMPConfig
from .input_checks import (
    LARGE_LOSS_BATCH,
    check_batch,
    check_checkpoint,
    check_pixel_values,
    is_tracing,
    metadata_rows,
    missing_metadata,
    output_flags,
    resolve_patients,
)
from .losses import clamped_logit_scale, distributed_context, nested_contrastive_loss, weighted_cross_entropy
from .metadata_encoder import SLIMPMetadataEncoder, init_slimp_weights
from .pooling import PatientSums, SLIMPAttentionPooling, patient_context

logger = logging.get_logger(__name__)


@dataclass
class SLIMPOutput(ModelOutput):
    """Output of `SLIMPModel.forward`. N lesions, P patients, D = projection_dim.

    loss (`()`): `(1 − w)·[λ·lesion_loss + (1 − λ)·patient_loss] + w·image_ssl_loss`, with `return_loss=True`.
    lesion_loss (`()`): symmetric InfoNCE of images vs lesion metadata.
    patient_loss (`()`): symmetric InfoNCE of phenotypes vs patient metadata (0 with fewer than 2 patients).
    image_ssl_loss (`()`): SimCLR NT-Xent between two views, when `ssl_pixel_values` and w > 0.
    logits_per_image (`(N, N)`): lesion scale · image_embeds @ lesion_metadata_embedsᵀ; None for images alone. In
        training mode under `torch.distributed` with `return_loss=True`: (N_local, N_global), this process's rows.
    logits_per_phenotype (`(P, P)`): patient scale · phenotype_embeds @ patient_metadata_embedsᵀ (same rule).
    image_embeds, lesion_metadata_embeds (`(N, D)`), phenotype_embeds, patient_metadata_embeds (`(P, D)`):
        L2-normalised embeddings.
    image_pooled_output (`(N, C)`), lesion_metadata_pooled_output (`(N, H)`), patient_metadata_pooled_output
        (`(P, H')`): the tower outputs before the projections (pooled image feature, metadata [CLS]).
    vision_model_output, lesion_metadata_model_output, patient_metadata_model_output: each tower's own output.
    hidden_states, attentions: the image tower's, with `output_hidden_states` / `output_attentions` (as in an
        image classifier's output; also in `vision_model_output`).
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
    lesion_metadata_model_output: BaseModelOutputWithPooling | None = None
    patient_metadata_model_output: BaseModelOutputWithPooling | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


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
    _supports_sdpa = True  # every tower: the image backbone's own, the metadata towers' attention interface
    _no_split_modules = ["SLIMPEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        init_slimp_weights(module, self.config.initializer_range)
        if isinstance(module, SLIMPModel):
            nn.init.constant_(module.lesion_logit_scale, self.config.logit_scale_init_value)
            nn.init.constant_(module.patient_logit_scale, self.config.logit_scale_init_value)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, refusing another architecture's checkpoint (a plain ViT folder:
        use `SLIMPModel.from_vision_pretrained`) and warning when a local checkpoint's code files differ from
        the SLIMP code running now."""
        if pretrained_model_name_or_path is not None:
            check_checkpoint(pretrained_model_name_or_path, SLIMPConfig.model_type, cls.__name__, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, with an `auto_map` naming all three auto classes whichever class is saved."""
        self.config.auto_map = {
            "AutoConfig": "configuration_slimp.SLIMPConfig",
            "AutoModel": "modeling_slimp.SLIMPModel",
            "AutoModelForImageClassification": "modeling_slimp.SLIMPForLesionClassification",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


class SLIMPModel(SLIMPPreTrainedModel):
    """The three towers, the projections, the patient aggregation and the nested contrastive loss. Any metadata
    input may be omitted: it is then all missing. Without `patient_index` every lesion is its own patient."""

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

    def get_input_embeddings(self) -> nn.Module:
        """The image tower's input embedding (the patch embedding of a ViT); each metadata tower, a sub-model,
        exposes its own feature tokenizer, so `enable_input_require_grads` hooks all three."""
        return self.vision_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.vision_model.set_input_embeddings(value)

    def loss_weights(self) -> dict[str, float]:
        """The nested loss's hyper-parameters (`losses.nested_contrastive_loss`), as the config states them."""
        return {"lesion_loss_weight": self.config.lesion_loss_weight, "image_ssl_weight": self.config.image_ssl_weight,
                "ssl_temperature": self.config.ssl_temperature}

    def logit_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lesion, patient) logit scales: exp of the learned log scales, clamped at `config.max_logit_scale`."""
        ceiling = self.config.max_logit_scale
        return clamped_logit_scale(self.lesion_logit_scale, ceiling), clamped_logit_scale(self.patient_logit_scale, ceiling)

    # ----- towers: outputs before the projections -----
    def image_tower(self, pixel_values: torch.Tensor, output_attentions: bool = False,
                    output_hidden_states=False) -> tuple[torch.Tensor, ModelOutput]:
        """(N, 3, H, W) -> (pooled feature (N, C), backbone output): the final-norm [CLS] of a token
        backbone (ViT, DINOv2), the pooler output of a CNN (global average pool)."""
        flags = {"output_hidden_states": output_hidden_states} if output_hidden_states else {}
        if output_attentions:
            flags["output_attentions"] = True  # CNN backbones have no attention to return
        output = self.vision_model(pixel_values=pixel_values.to(self.dtype), return_dict=True, **flags)
        return pooled_image_feature(self.config.vision_config, output), output

    def metadata_tower(self, tower: SLIMPMetadataEncoder, numerical=None, categorical=None, rows=None,
                       output_attentions: bool = False, output_hidden_states=False) -> BaseModelOutputWithPooling:
        """One metadata tower's output; absent inputs are all missing (`rows` then gives their number)."""
        rows = rows if rows is not None else metadata_rows(numerical, categorical)
        if rows is None:
            raise ValueError("give the metadata tensors or the number of rows they would have")
        config = tower.config
        missing_numerical, missing_categorical = missing_metadata(config.num_numerical, config.num_categorical, rows,
                                                                  self.device)
        return tower(numerical if numerical is not None else missing_numerical,
                     categorical if categorical is not None else missing_categorical,
                     output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states))

    def lesion_metadata_tower(self, lesion_numerical_values=None, lesion_categorical_ids=None, num_lesions=None) -> torch.Tensor:
        """(N, Fn) raw values + (N, Fc) ids -> the lesion tower's final-norm [CLS] (N, H)."""
        return self.metadata_tower(self.lesion_metadata_model, lesion_numerical_values, lesion_categorical_ids,
                                   num_lesions).pooler_output

    def patient_metadata_tower(self, patient_numerical_values=None, patient_categorical_ids=None, num_patients=None) -> torch.Tensor:
        """(P, Gn) raw values + (P, Gc) ids -> the patient tower's final-norm [CLS] (P, H')."""
        return self.metadata_tower(self.patient_metadata_model, patient_numerical_values, patient_categorical_ids,
                                   num_patients).pooler_output

    # ----- projected features (un-normalised), as CLIP's get_*_features: output objects, pooler_output = features -----
    def get_image_features(self, pixel_values: torch.Tensor, output_attentions: bool | None = None,
                           output_hidden_states: bool | None = None, return_dict: bool | None = None):
        """(N, 3, H, W) -> the image tower's output with `pooler_output` = projected, un-normalised image
        features (N, D) (`last_hidden_state`, `hidden_states`, `attentions`: the backbone's)."""
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict)
        check_pixel_values(pixel_values)
        pooled, output = self.image_tower(pixel_values, output_attentions, output_hidden_states)
        output = BaseModelOutputWithPooling(
            last_hidden_state=output.last_hidden_state, pooler_output=self.visual_projection(pooled),
            hidden_states=output.get("hidden_states"), attentions=output.get("attentions"))
        return output if return_dict else output.to_tuple()

    def _projected_metadata(self, tower, projection, numerical, categorical, rows, output_attentions,
                            output_hidden_states, return_dict):
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict)
        output = self.metadata_tower(tower, numerical, categorical, rows, output_attentions, output_hidden_states)
        output.pooler_output = projection(output.pooler_output)
        return output if return_dict else output.to_tuple()

    def get_lesion_metadata_features(self, lesion_numerical_values=None, lesion_categorical_ids=None, num_lesions=None,
                                     output_attentions=None, output_hidden_states=None, return_dict=None):
        """(N, Fn) raw values + (N, Fc) ids -> the lesion tower's output with `pooler_output` = projected,
        un-normalised features (N, D). Without inputs, `num_lesions` all-missing rows."""
        return self._projected_metadata(self.lesion_metadata_model, self.lesion_metadata_projection, lesion_numerical_values,
                                        lesion_categorical_ids, num_lesions, output_attentions, output_hidden_states,
                                        return_dict)

    def get_patient_metadata_features(self, patient_numerical_values=None, patient_categorical_ids=None, num_patients=None,
                                      output_attentions=None, output_hidden_states=None, return_dict=None):
        """(P, Gn) raw values + (P, Gc) ids -> the patient tower's output with `pooler_output` = projected,
        un-normalised features (P, D). Without inputs, `num_patients` all-missing rows."""
        return self._projected_metadata(self.patient_metadata_model, self.patient_metadata_projection,
                                        patient_numerical_values, patient_categorical_ids, num_patients, output_attentions,
                                        output_hidden_states, return_dict)

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

    def pooled_lesions(self, sums: PatientSums) -> torch.Tensor:
        """(P, 2D) each patient's pooled lesion representations (mean or attention pooling)."""
        pooled = sums.attention_pool() if self.patient_pooling is not None else sums.mean()
        return pooled.to(self.phenotype_projection.weight.dtype)

    def phenotype_from_sums(self, sums: PatientSums) -> torch.Tensor:
        """Projected, un-normalised phenotype features (P, D) of the pooled lesions."""
        return self.phenotype_projection(self.pooled_lesions(sums))

    def aggregate_phenotype(self, image_embeds: torch.Tensor, lesion_metadata_embeds: torch.Tensor,
                            patient_index: torch.Tensor, num_patients: int) -> torch.Tensor:
        """Lesion representations pooled per patient and projected: phenotype features (P, D)."""
        sums = self.add_lesions(self.new_patient_sums(num_patients, image_embeds.device), image_embeds,
                                lesion_metadata_embeds, patient_index)
        return self.phenotype_from_sums(sums)

    def get_phenotype_features(self, pixel_values, lesion_numerical_values=None, lesion_categorical_ids=None,
                               patient_index=None, num_patients=None, return_dict=None):
        """The phenotypes of the patients of a batch of lesions: `pooler_output` = projected, un-normalised
        phenotype features (P, D), `last_hidden_state` = the pooled lesion representations (P, 2D) they project."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        check_pixel_values(pixel_values)
        patient_index, num_patients = resolve_patients(patient_index, num_patients, pixel_values.shape[0], pixel_values.device)
        image_embeds = F.normalize(self.get_image_features(pixel_values, return_dict=True).pooler_output, dim=-1)
        lesion_embeds = F.normalize(self.get_lesion_metadata_features(
            lesion_numerical_values, lesion_categorical_ids, pixel_values.shape[0], return_dict=True).pooler_output, dim=-1)
        sums = self.add_lesions(self.new_patient_sums(num_patients, pixel_values.device), image_embeds, lesion_embeds,
                                patient_index)
        pooled = self.pooled_lesions(sums)
        output = BaseModelOutputWithPooling(last_hidden_state=pooled, pooler_output=self.phenotype_projection(pooled))
        return output if return_dict else output.to_tuple()

    # ----- what each lesion and patient has on its own; `forward` adds the phenotype, the logits and the loss -----
    def encode(self, pixel_values: torch.Tensor, lesion_numerical_values: torch.Tensor | None = None,
               lesion_categorical_ids: torch.Tensor | None = None, patient_numerical_values: torch.Tensor | None = None,
               patient_categorical_ids: torch.Tensor | None = None, patient_index: torch.Tensor | None = None,
               output_attentions: bool = False, output_hidden_states: bool = False) -> SLIMPOutput:
        """A batch through the three towers and the projections: `SLIMPOutput` with the L2-normalised `image_embeds`,
        `lesion_metadata_embeds` (N, D) and `patient_metadata_embeds` (P, D), the tower outputs (`*_pooled_output`)
        and each tower's own output. No phenotype, logits or loss (`forward` adds them): what an evaluation that
        pools each patient over all of its lesions, across batches (`PatientSums`), needs of a batch."""
        _, num_patients = check_batch(self.config, pixel_values, lesion_numerical_values, lesion_categorical_ids,
                                      patient_numerical_values, patient_categorical_ids, patient_index)
        return self._encode(pixel_values, lesion_numerical_values, lesion_categorical_ids, patient_numerical_values,
                            patient_categorical_ids, num_patients, output_attentions, output_hidden_states)

    def _encode(self, pixel_values, lesion_numerical_values, lesion_categorical_ids, patient_numerical_values,
                patient_categorical_ids, num_patients: int, output_attentions, output_hidden_states) -> SLIMPOutput:
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        image_pooled, vision_output = self.image_tower(pixel_values, **flags)  # (N, C)
        lesion_output = self.metadata_tower(self.lesion_metadata_model, lesion_numerical_values, lesion_categorical_ids,
                                            pixel_values.shape[0], **flags)  # pooler_output (N, H)
        patient_output = self.metadata_tower(self.patient_metadata_model, patient_numerical_values,
                                             patient_categorical_ids, num_patients, **flags)  # pooler_output (P, H')
        lesion_pooled, patient_pooled = lesion_output.pooler_output, patient_output.pooler_output
        return SLIMPOutput(
            image_embeds=F.normalize(self.visual_projection(image_pooled), dim=-1),  # (N, D)
            lesion_metadata_embeds=F.normalize(self.lesion_metadata_projection(lesion_pooled), dim=-1),  # (N, D)
            patient_metadata_embeds=F.normalize(self.patient_metadata_projection(patient_pooled), dim=-1),  # (P, D)
            image_pooled_output=image_pooled,
            lesion_metadata_pooled_output=lesion_pooled,
            patient_metadata_pooled_output=patient_pooled,
            vision_model_output=vision_output,
            lesion_metadata_model_output=lesion_output,
            patient_metadata_model_output=patient_output,
            hidden_states=vision_output.get("hidden_states"),
            attentions=vision_output.get("attentions"),
        )

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SLIMPOutput | tuple:
        """See `SLIMPOutput`. `ssl_pixel_values` (N, 3, H, W): a second view of each image for the SimCLR term.

        The nested loss runs only with `return_loss=True`. In training mode under an initialised
        `torch.distributed`, its embeddings are gathered across processes (each process must hold whole
        patients) and the loss is the global-batch loss; in eval mode (validation) it is the loss of this
        process's batch. Its (N, N) logits grow with the square of the batch: above `LARGE_LOSS_BATCH` lesions
        (8,192) in one forward it warns; split such a set into batches of whole patients (the loss of a
        validation set is the mean over its batches) or evaluate without the loss. Output flags default to the
        config's. Images alone (no metadata): no logits, `image_embeds` first (`pipeline("image-feature-extraction")`).
        """
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict)
        patient_index, num_patients = check_batch(self.config, pixel_values, lesion_numerical_values, lesion_categorical_ids,
                                                  patient_numerical_values, patient_categorical_ids, patient_index)
        num_lesions = pixel_values.shape[0]
        if return_loss and not is_tracing() and num_lesions > LARGE_LOSS_BATCH:
            logger.warning(f"return_loss=True on {num_lesions} lesions in one forward: the loss builds ({num_lesions}, "
                           f"{num_lesions}) logits, their memory and time grow with the square of the batch. Use batches "
                           f"of at most {LARGE_LOSS_BATCH} lesions (whole patients each), or no loss for embeddings.")
        encoded = self._encode(pixel_values, lesion_numerical_values, lesion_categorical_ids, patient_numerical_values,
                               patient_categorical_ids, num_patients, output_attentions, output_hidden_states)
        image_embeds, lesion_embeds = encoded.image_embeds, encoded.lesion_metadata_embeds  # (N, D)
        phenotype_embeds = F.normalize(self.aggregate_phenotype(image_embeds, lesion_embeds, patient_index, num_patients),
                                       dim=-1)  # (P, D)
        lesion_scale, patient_scale = self.logit_scales()
        losses = {}
        if return_loss:
            ssl_embeds = None
            if ssl_pixel_values is not None and self.config.image_ssl_weight > 0:
                check_pixel_values(ssl_pixel_values, "ssl_pixel_values")
                ssl_embeds = F.normalize(self.visual_projection(self.image_tower(ssl_pixel_values)[0]), dim=-1)
            rank, world_size = distributed_context() if self.training else (0, 1)
            inputs = dict(image_embeds=image_embeds, lesion_metadata_embeds=lesion_embeds,  # the model's outputs
                          phenotype_embeds=phenotype_embeds, patient_metadata_embeds=encoded.patient_metadata_embeds,
                          lesion_logit_scale=lesion_scale, patient_logit_scale=patient_scale, ssl_image_embeds=ssl_embeds)
            terms = nested_contrastive_loss(**inputs, **self.loss_weights(), rank=rank, world_size=world_size)
            losses = {name: getattr(terms, name) for name in ("loss", "lesion_loss", "patient_loss", "image_ssl_loss")}
            logits_per_image, logits_per_phenotype = terms.logits_per_image, terms.logits_per_phenotype
        else:  # (N, N) and (P, P); none for images alone (similarities with all-missing metadata mean nothing)
            given = any(t is not None for t in (lesion_numerical_values, lesion_categorical_ids, patient_numerical_values,
                                                patient_categorical_ids))
            logits_per_image = lesion_scale * image_embeds @ lesion_embeds.t() if given else None
            logits_per_phenotype = patient_scale * phenotype_embeds @ encoded.patient_metadata_embeds.t() if given else None
        output = SLIMPOutput(**losses, logits_per_image=logits_per_image, logits_per_phenotype=logits_per_phenotype,
                             phenotype_embeds=phenotype_embeds, **encoded)  # + embeddings and tower outputs (`encode`)
        return output if return_dict else output.to_tuple()


class SLIMPForLesionClassification(SLIMPPreTrainedModel):
    """A lesion classifier on SLIMP features: `classifier(concat(parts))`.

    Parts (`config.classifier_features`): the image feature; the lesion-metadata feature; the feature of
    the lesion's patient's metadata; and the patient context, the lesion's image (+ lesion-metadata)
    representation minus the mean of the same patient's other lesions in the batch (zero for a
    one-lesion patient). `config.classifier_representation` picks the projected, un-normalised features
    or the tower outputs before the projection.

    What the head never reads (the contrastive logit scales, the phenotype projection and pooling, the
    projections when it reads the towers, a tower whose part it leaves out) is frozen (`requires_grad=False`,
    also after `from_pretrained`): no trainable parameter without a gradient, which would stop DDP (`Trainer`
    with gradient checkpointing runs DDP with `find_unused_parameters=False`). The weights keep their keys, so
    SLIMP checkpoints load into the classifier and its checkpoints load back into `SLIMPModel`.

    Absent metadata is missing and, without `patient_index`, every lesion is its own patient, so
    `pipeline("image-classification")`, which passes only `pixel_values`, works and its path is affine
    in the image feature (exportable to a built-in classifier). A head fitted on metadata or context is
    not fitted for that path, so it then warns, once per process (its model card scores it: "test, images only";
    an explicit `patient_index`, e.g. `torch.arange(N)`, states the images-only use and does not warn). For a
    patient whose lesions do not fit in one batch, compute `lesion_features` batch by batch and call `classify`
    with `pooling.patient_context` over all of them (what `training/embeddings.py` does).
    """

    accepts_loss_kwargs = True  # `Trainer` passes `num_items_in_batch`, the loss's divisor under accumulation

    def __init__(self, config: SLIMPConfig):
        super().__init__(config)
        self.slimp = SLIMPModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        sizes = self.part_sizes()
        self.classifier = nn.Linear(sum(sizes[part] for part in self.parts), config.num_labels)
        self.post_init()
        self.freeze_unused()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained` (which makes every loaded weight trainable), then `freeze_unused`."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_unused()  # (model, loading info) on request
        return loaded

    @property
    def parts(self) -> list[str]:
        """The parts the head reads, in order (`config.classifier_features` split at "+")."""
        return self.config.classifier_features.split("+")

    def unused_parameters(self) -> list[nn.Parameter]:
        """The parameters of `slimp` that this head's forward never reads."""
        slimp, parts = self.slimp, self.parts
        unused = [slimp.phenotype_projection] + ([slimp.patient_pooling] if slimp.patient_pooling is not None else [])
        if self.config.classifier_representation == "tower":
            unused += [slimp.visual_projection, slimp.lesion_metadata_projection, slimp.patient_metadata_projection]
        for part in ("lesion", "patient"):
            if part not in parts:
                unused += [getattr(slimp, f"{part}_metadata_model"), getattr(slimp, f"{part}_metadata_projection")]
        return [slimp.lesion_logit_scale, slimp.patient_logit_scale] + [p for module in unused for p in module.parameters()]

    def freeze_unused(self) -> None:
        """`requires_grad=False` on `unused_parameters` (done at construction and after `from_pretrained`)."""
        for parameter in self.unused_parameters():
            parameter.requires_grad_(False)

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
                        patient_numerical_values=None, patient_categorical_ids=None, patient_index=None,
                        output_attentions: bool = False, output_hidden_states=False) -> dict:
        """The head's parts but the context, one row per lesion: `{"image": (N, ·), "lesion": ..., "patient": ...}`
        (only those in `config.classifier_features`), plus `patient_index` (N,), `num_patients` and the image
        tower's output `vision_model_output`."""
        slimp = self.slimp
        patient_index, num_patients = check_batch(self.config, pixel_values, lesion_numerical_values, lesion_categorical_ids,
                                                  patient_numerical_values, patient_categorical_ids, patient_index)
        projected = self.config.classifier_representation == "projection"
        image, vision_output = slimp.image_tower(pixel_values, output_attentions, output_hidden_states)
        features = {"image": slimp.visual_projection(image) if projected else image}
        if "lesion" in self.parts:
            lesion = slimp.lesion_metadata_tower(lesion_numerical_values, lesion_categorical_ids, pixel_values.shape[0])
            features["lesion"] = slimp.lesion_metadata_projection(lesion) if projected else lesion
        if "patient" in self.parts:
            patient = slimp.patient_metadata_tower(patient_numerical_values, patient_categorical_ids, num_patients)
            features["patient"] = (slimp.patient_metadata_projection(patient) if projected else patient)[patient_index]
        return {**features, "patient_index": patient_index, "num_patients": num_patients,
                "vision_model_output": vision_output}

    def context_representation(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C) the representation the context compares: concat of the image (+ lesion) parts."""
        return torch.cat([features[part] for part in self.context_parts()], dim=-1)

    def batch_context(self, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The patient context over the lesions of this batch (None when the head does not read it): each
        lesion's representation minus the mean of its patient's other lesions in `features` (`lesion_features`)."""
        if "context" not in self.parts:
            return None
        return patient_context(self.context_representation(features), features["patient_index"], features["num_patients"])

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        """Returns `ImageClassifierOutput` with logits (N, num_labels), given labels (N,) the loss, and the image
        tower's `hidden_states` / `attentions` when asked.

        The loss (`losses.weighted_cross_entropy`) is the class-weighted cross-entropy summed over the labelled
        lesions (label -100: none) and divided by `num_items_in_batch` when given (what `transformers.Trainer`
        passes under gradient accumulation: the labelled lesions of all the accumulated batches), else by this
        batch's count, so k accumulated batches give exactly the gradient of one batch k times larger. A batch
        without any labelled lesion has loss 0.
        """
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict)
        if self.parts != ["image"] and not is_tracing() and all(value is None for value in (
                lesion_numerical_values, lesion_categorical_ids, patient_numerical_values, patient_categorical_ids,
                patient_index)):
            # Once per process, not per model: pipeline() builds a new model at each call.
            logger.warning_once(
                f"This classifier reads {self.config.classifier_features} but was given images only: every metadata "
                "value is treated as missing and each lesion as its own patient, which is not what its head was fitted "
                "on (training/finetune.py scores this use in the 'test, images only' row of its card). Pass metadata "
                "and patient_id through the processor, or fine-tune with classifier_features='image' for image-only use.")
        features = self.lesion_features(pixel_values, lesion_numerical_values, lesion_categorical_ids,
                                        patient_numerical_values, patient_categorical_ids, patient_index,
                                        output_attentions, output_hidden_states)
        logits = self.classify(features, self.batch_context(features))  # (N, num_labels)
        loss = None
        if labels is not None:
            loss = weighted_cross_entropy(logits, labels, self.config.class_weights, num_items_in_batch)
        vision_output = features["vision_model_output"]
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=vision_output.get("hidden_states"),
                                       attentions=vision_output.get("attentions"))
        return output if return_dict else output.to_tuple()

SLIMPConfig.register_for_auto_class("AutoConfig")
SLIMPModel.register_for_auto_class("AutoModel")
SLIMPForLesionClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["SLIMPOutput", "SLIMPPreTrainedModel", "SLIMPModel", "SLIMPForLesionClassification", "SLIMPAttentionPooling",
           "resolve_patients"]
