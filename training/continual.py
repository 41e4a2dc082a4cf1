"""Continual pre-training (the paper's, arXiv 2505.23709): adapt a pre-trained SLIMP to a new dataset.

Only the encoders' embedding layers (the image tower's patch embedding / stem, the metadata feature
tokenizers and [CLS] tokens), the projections, the patient pooling and the logit scales train; the
attention blocks stay frozen. A target dataset with other metadata columns gets new feature
tokenizers for its schema while the transformer blocks are reused.
"""

from __future__ import annotations

import logging

from torch import nn

from modeling_slimp import SLIMPMetadataConfig, SLIMPModel
from modeling_slimp.metadata_encoder import SLIMPFeatureTokenizer

logger = logging.getLogger(__name__)

_SCHEMA_FIELDS = ("numerical_features", "categorical_features", "numerical_mean", "numerical_std")


def _vision_stem(vision_model: nn.Module) -> nn.Module:
    """The image tower's embedding layer: patch embeddings (ViT, DINOv2, ConvNeXt) or the stem (ResNet)."""
    stem = getattr(vision_model, "embeddings", None) or getattr(vision_model, "embedder", None)
    if stem is None:
        raise ValueError(f"{type(vision_model).__name__} has no `embeddings`/`embedder` module to train in continual mode.")
    return stem


def replace_metadata_schema(model: SLIMPModel, tower: str, schema: SLIMPMetadataConfig) -> bool:
    """Give `tower` ("lesion" or "patient") the features of `schema`, keeping its transformer blocks.

    The feature tokenizer is rebuilt (freshly initialised) only if the feature names or vocabularies
    change; new normalisation statistics alone are just written into the existing tokenizer.
    Returns True when a new tokenizer was built.
    """
    key = f"{tower}_metadata_config"
    old: SLIMPMetadataConfig = getattr(model.config, key)
    fields = {name: getattr(schema, name) for name in _SCHEMA_FIELDS}
    new = type(old)(**{**old.to_dict(), **fields})
    new._attn_implementation = old._attn_implementation  # the tower's attention choice is not in to_dict
    encoder = getattr(model, f"{tower}_metadata_model")
    rebuilt = (old.numerical_features, old.categorical_features) != (new.numerical_features, new.categorical_features)
    setattr(model.config, key, new)
    encoder.config = new
    if rebuilt:
        tokenizer = SLIMPFeatureTokenizer(new).to(encoder.cls_token.device)
        tokenizer.apply(model._init_weights)
        encoder.feature_tokenizer = tokenizer
        logger.info("continual: new %s feature tokenizer for %s", tower, new.feature_names)
    else:
        encoder.feature_tokenizer.config = new
        encoder.feature_tokenizer.reset_schema_buffers()
    return rebuilt


def freeze_for_continual(model: SLIMPModel) -> list[str]:
    """Freeze everything but the embedding layers, projections, pooling and logit scales.

    Returns the names of the trainable parameters.
    """
    model.requires_grad_(False)
    trainable = [
        _vision_stem(model.vision_model),
        model.lesion_metadata_model.feature_tokenizer,
        model.patient_metadata_model.feature_tokenizer,
        model.visual_projection, model.lesion_metadata_projection, model.patient_metadata_projection,
        model.phenotype_projection,
    ]
    if model.patient_pooling is not None:
        trainable.append(model.patient_pooling)
    for module in trainable:
        module.requires_grad_(True)
    for parameter in (model.lesion_metadata_model.cls_token, model.patient_metadata_model.cls_token,
                      model.lesion_logit_scale, model.patient_logit_scale):
        parameter.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


__all__ = ["replace_metadata_schema", "freeze_for_continual"]
