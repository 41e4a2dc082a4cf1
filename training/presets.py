"""Model presets and the SLIMPConfig of a dataset: backbone sizes, tower widths, fitted metadata schema.

    from training.presets import preset_config
    config = preset_config("small")                                   # a preset, anywhere (no data needed)
    config = build_slimp_config(schema, train_split, model_size="tiny", vision_model_type="vit")  # pretrain.py's

`tiny` is the CPU preset of the README's main job (64 px); `small` is the release architecture
(ViT-S/16, DINOv2-S/14, ResNet-50 or ConvNeXt-T at 224 px); `base` is ViT-B sized.
"""

from __future__ import annotations

from transformers import ConvNextConfig, Dinov2Config, PreTrainedConfig, ResNetConfig, ViTConfig

from modeling_slimp import SLIMPConfig, SLIMPMetadataConfig, SLIMPProcessor
from modeling_slimp.schema_slimp import (
    ISIC2024_LESION_CATEGORICAL,
    ISIC2024_LESION_NUMERICAL,
    ISIC2024_PATIENT_CATEGORICAL,
    ISIC2024_PATIENT_NUMERICAL,
)

MODEL_SIZES = ("tiny", "small", "base")
VISION_MODEL_TYPES = ("vit", "dinov2", "resnet", "convnext")

# (metadata hidden size, layers, heads, projection_dim) per size.
_TOWERS = {"tiny": (64, 2, 4, 64), "small": (192, 3, 8, 256), "base": (256, 4, 8, 512)}


def vision_config(model_size: str, vision_model_type: str, image_size: int | None = None) -> PreTrainedConfig:
    """A transformers vision config for a preset; `image_size` overrides the preset's resolution."""
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {MODEL_SIZES}, got '{model_size}'")
    if vision_model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"vision_model_type must be one of {VISION_MODEL_TYPES}, got '{vision_model_type}'")
    size = image_size or (64 if model_size == "tiny" else 224)
    if vision_model_type == "vit":
        width, layers, heads = {"tiny": (96, 4, 4), "small": (384, 12, 6), "base": (768, 12, 12)}[model_size]
        patch = 8 if model_size == "tiny" else 16
        return ViTConfig(image_size=size, patch_size=patch, hidden_size=width, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=2 * width if model_size == "tiny" else 4 * width,
                         layer_norm_eps=1e-6)
    if vision_model_type == "dinov2":
        width, layers, heads = {"tiny": (96, 4, 4), "small": (384, 12, 6), "base": (768, 12, 12)}[model_size]
        return Dinov2Config(image_size=size, patch_size=8 if model_size == "tiny" else 14, hidden_size=width,
                            num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=2 if model_size == "tiny" else 4)
    if vision_model_type == "resnet":
        if model_size == "tiny":
            return ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 192], depths=[1, 1, 1, 1], layer_type="basic")
        return ResNetConfig(depths=[3, 4, 6, 3] if model_size == "small" else [3, 4, 23, 3])
    if model_size == "tiny":
        return ConvNextConfig(hidden_sizes=[32, 64, 128, 192], depths=[1, 1, 2, 1], image_size=size)
    return ConvNextConfig(image_size=size, **({} if model_size == "small" else {"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3]}))


def tower_sizes(model_size: str) -> dict:
    hidden, layers, heads, _ = _TOWERS[model_size]
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads}


def preset_config(model_size: str = "small", vision_model_type: str = "vit", image_size: int | None = None,
                  lesion_metadata_config: SLIMPMetadataConfig | dict | None = None,
                  patient_metadata_config: SLIMPMetadataConfig | dict | None = None,
                  vision: PreTrainedConfig | None = None, **overrides) -> SLIMPConfig:
    """The SLIMPConfig of a preset: the image backbone, metadata tower widths and projection size of
    `model_size` (`MODEL_SIZES`) with the `vision_model_type` backbone (`VISION_MODEL_TYPES`).

        config = preset_config("small")                          # ViT-S/16 at 224 px, the ISIC 2024 columns
        config = preset_config("tiny", "resnet", lesion_metadata_config={
            "numerical_features": ["clin_size_long_diam_mm"], "numerical_mean": [4.0], "numerical_std": [2.0],
            "categorical_features": {"anatom_site_general": ["head/neck", "upper extremity"]}})
        model = SLIMPModel(config)                               # randomly initialised

    Each metadata tower: a `SLIMPMetadataConfig` is used as it is; a dict of its fields gets the preset's tower
    sizes (hidden size, layers, heads) unless it sets them; None gives the ISIC 2024 release columns with
    mean 0 and std 1 (fit them on your training split with `SLIMPProcessor.fit_metadata_schema`, or use
    `build_slimp_config`). `image_size` overrides the preset's resolution, `vision` replaces its backbone config;
    `overrides` are other SLIMPConfig fields (`lesion_loss_weight`, `patient_aggregation`, `id2label`, ...).
    """
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {MODEL_SIZES}, got '{model_size}'")
    defaults = {"lesion_metadata_config": (ISIC2024_LESION_NUMERICAL, ISIC2024_LESION_CATEGORICAL),
                "patient_metadata_config": (ISIC2024_PATIENT_NUMERICAL, ISIC2024_PATIENT_CATEGORICAL)}
    towers = {}
    for key, given in (("lesion_metadata_config", lesion_metadata_config), ("patient_metadata_config", patient_metadata_config)):
        if isinstance(given, SLIMPMetadataConfig):
            towers[key] = given
            continue
        numerical, categorical = defaults[key]
        fields = dict(given) if given is not None else {
            "numerical_features": list(numerical), "categorical_features": {k: list(v) for k, v in categorical.items()}}
        towers[key] = {**tower_sizes(model_size), **fields}
    overrides.setdefault("projection_dim", _TOWERS[model_size][3])
    return SLIMPConfig(vision_config=vision if vision is not None else vision_config(model_size, vision_model_type, image_size),
                       **towers, **overrides)


def schema_columns(schema: dict) -> list[str]:
    """`patient_id` and every model-input column of a dataset's `schema.json`."""
    return ["patient_id"] + [c for level in ("lesion", "patient") for kind in ("numerical", "categorical") for c in schema[level][kind]]


def build_slimp_config(schema: dict, train_split, model_size: str = "tiny", vision_model_type: str = "vit",
                       image_size: int | None = None, vision: PreTrainedConfig | None = None, **overrides) -> SLIMPConfig:
    """SLIMPConfig for a converted dataset: metadata schema fitted on `train_split` (a `datasets.Dataset`
    or DataFrame), labels from `schema["label"]["names"]`, towers from the preset. `overrides` are
    SLIMPConfig fields (lesion_loss_weight, patient_aggregation, ...)."""
    if hasattr(train_split, "select_columns"):
        train_split = train_split.select_columns(schema_columns(schema)).to_pandas()
    lesion, patient = SLIMPProcessor.fit_metadata_schema(
        train_split,
        lesion_numerical=schema["lesion"]["numerical"], lesion_categorical=schema["lesion"]["categorical"],
        patient_numerical=schema["patient"]["numerical"], patient_categorical=schema["patient"]["categorical"],
        lesion_tower=tower_sizes(model_size), patient_tower=tower_sizes(model_size),
    )
    names = schema["label"]["names"]
    return preset_config(model_size, vision_model_type, image_size, lesion, patient, vision=vision,
                         id2label=dict(enumerate(names)), **overrides)


__all__ = ["MODEL_SIZES", "VISION_MODEL_TYPES", "vision_config", "tower_sizes", "preset_config", "schema_columns",
           "build_slimp_config"]
