"""Model presets, the SLIMPConfig of a dataset, and the model pretrain.py builds from them.

    from training.presets import preset_config
    config = preset_config("small")                                   # a preset, anywhere (no data needed)
    config = build_slimp_config(schema, train_split, model_size="tiny", vision_model_type="vit")  # pretrain.py's
    model = seeded_model(ModelArguments(model_size="tiny"), schema, train_split, seed=0)        # pretrain.py's start
    processor = build_processor(model, model_args)

`ModelArguments` are pretrain.py's model options; `seeded_model` seeds every generator (`accelerate.utils.set_seed`)
and builds the model, so pretrain.py and the benchmarks start from the same initialisation at a seed.

`tiny` is the CPU preset of the README's main job (64 px); `small` is the release architecture
(ViT-S/16, DINOv2-S/14, ResNet-50 or ConvNeXt-T at 224 px); `base` is ViT-B sized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from accelerate.logging import get_logger
from accelerate.utils import set_seed
from transformers import (AutoImageProcessor, ConvNextConfig, Dinov2Config, PreTrainedConfig, ResNetConfig, ViTConfig,
                          ViTImageProcessorPil)

from modeling_slimp import SLIMPConfig, SLIMPMetadataConfig, SLIMPModel, SLIMPProcessor
from modeling_slimp.configuration_slimp import PATIENT_AGGREGATIONS
from modeling_slimp.schema_slimp import (
    ISIC2024_LESION_CATEGORICAL,
    ISIC2024_LESION_NUMERICAL,
    ISIC2024_PATIENT_CATEGORICAL,
    ISIC2024_PATIENT_NUMERICAL,
)
from training.arguments import ArgumentError
from training.continual import freeze_for_continual, replace_metadata_schema
from training.data.metadata_schema import fit_metadata_schema

logger = get_logger(__name__)

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
    mean 0 and std 1 (fit them on your training split with `training.data.metadata_schema.fit_metadata_schema`, or use
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
    lesion, patient = fit_metadata_schema(
        train_split,
        lesion_numerical=schema["lesion"]["numerical"], lesion_categorical=schema["lesion"]["categorical"],
        patient_numerical=schema["patient"]["numerical"], patient_categorical=schema["patient"]["categorical"],
        lesion_tower=tower_sizes(model_size), patient_tower=tower_sizes(model_size),
    )
    names = schema["label"]["names"]
    return preset_config(model_size, vision_model_type, image_size, lesion, patient, vision=vision,
                         id2label=dict(enumerate(names)), **overrides)


# ----- pretrain.py's model: its options, the seeded build, the processor -----
@dataclass
class ModelArguments:
    model_size: str = field(default="tiny", metadata={"help": f"Preset: one of {MODEL_SIZES} (tiny: 64 px CPU model; small: the release ViT-S/16 at 224 px)."})
    vision_model_type: str = field(default="vit", metadata={"help": f"Image backbone: one of {VISION_MODEL_TYPES}."})
    image_size: int | None = field(default=None, metadata={"help": "Override the preset's image resolution."})
    init_vision_from: str | None = field(default=None, metadata={"help": "A transformers vision checkpoint (folder or Hub id) to initialise the image tower; its image processor's normalisation is used."})
    init_from: str | None = field(default=None, metadata={"help": "A SLIMP checkpoint to start from (with --continual: continual pre-training)."})
    continual: bool = field(default=False, metadata={"help": "Train only embedding layers, projections and logit scales; attention frozen. Needs --init_from."})
    lesion_loss_weight: float = field(default=0.5, metadata={"help": "λ in L = λ·L_lesion + (1 − λ)·L_patient (1 = flat lesion-only CLIP loss)."})
    patient_aggregation: str | None = field(default=None, metadata={"help": f"One of {PATIENT_AGGREGATIONS}: how a patient's lesions are pooled (default: mean, or the --init_from checkpoint's)."})
    image_ssl_weight: float = field(default=0.0, metadata={"help": "Weight w of the SimCLR term: (1 − w)·L_nested + w·L_SimCLR (1 = SimCLR baseline)."})
    feature_dropout: float = field(default=0.1, metadata={"help": "Probability of hiding a present metadata value in training."})
    temperature: float | None = field(default=None, metadata={"help": "Initial temperature τ of both contrastive levels (learned from there; logit scale 1/τ). Default: the config's 0.07, as CLIP."})

    def __post_init__(self):
        if self.temperature is not None and not 0.01 <= self.temperature <= 1.0:
            raise ArgumentError(f"--temperature must be in [0.01, 1] (logit scale at most 100, the clamp), got {self.temperature}")
        if self.model_size not in MODEL_SIZES:
            raise ArgumentError(f"--model_size must be one of {MODEL_SIZES}, got '{self.model_size}'")
        if self.vision_model_type not in VISION_MODEL_TYPES:
            raise ArgumentError(f"--vision_model_type must be one of {VISION_MODEL_TYPES}, got '{self.vision_model_type}'")
        if self.patient_aggregation is not None and self.patient_aggregation not in PATIENT_AGGREGATIONS:
            raise ArgumentError(f"--patient_aggregation must be one of {PATIENT_AGGREGATIONS}, got '{self.patient_aggregation}'")
        for name in ("lesion_loss_weight", "image_ssl_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ArgumentError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ArgumentError(f"--feature_dropout must be in [0, 1), got {self.feature_dropout}")
        if self.continual and not self.init_from:
            raise ArgumentError("--continual needs --init_from: continual pre-training adapts a pre-trained checkpoint")
        if self.image_size is not None and self.image_size < 8:
            raise ArgumentError(f"--image_size must be at least 8 pixels, got {self.image_size}")


def build_model(model_args: ModelArguments, schema: dict, train_split) -> SLIMPModel:
    overrides = dict(lesion_loss_weight=model_args.lesion_loss_weight, image_ssl_weight=model_args.image_ssl_weight)
    if model_args.temperature is not None and model_args.init_from:
        raise ArgumentError("--temperature sets the initial logit scales of a new model; --init_from keeps the checkpoint's")
    if model_args.temperature is not None:
        overrides["logit_scale_init_value"] = math.log(1.0 / model_args.temperature)
    if model_args.init_from:
        model = SLIMPModel.from_pretrained(model_args.init_from)
        saved = model.config.patient_aggregation
        if model_args.patient_aggregation not in (None, saved):
            raise ArgumentError(f"--patient_aggregation {model_args.patient_aggregation} differs from the --init_from "
                                f"checkpoint's '{saved}': its pooling weights cannot be reused; drop the option")
        for key, value in overrides.items():  # loss weights only: they live in the config, read at each step
            setattr(model.config, key, value)
        target = build_slimp_config(schema, train_split, vision=model.config.vision_config)
        replace_metadata_schema(model, "lesion", target.lesion_metadata_config)
        replace_metadata_schema(model, "patient", target.patient_metadata_config)
        model.config.id2label, model.config.label2id = target.id2label, target.label2id
    else:
        config = build_slimp_config(schema, train_split, model_args.model_size, model_args.vision_model_type,
                                    model_args.image_size, patient_aggregation=model_args.patient_aggregation or "mean",
                                    **overrides)
        model = (SLIMPModel.from_vision_pretrained(model_args.init_vision_from, config)
                 if model_args.init_vision_from else SLIMPModel(config))
    for tower in (model.config.lesion_metadata_config, model.config.patient_metadata_config):
        tower.feature_dropout = model_args.feature_dropout
    check_towers(model.config)
    if model_args.continual:
        freeze_for_continual(model)
    return model


def check_towers(config) -> None:
    """A metadata tower without any usable feature outputs a constant: the loss term it feeds would stay at
    chance for the whole run. That is an error, unless that term is switched off."""
    if not config.lesion_metadata_config.feature_names and config.lesion_loss_weight > 0 and config.image_ssl_weight < 1:
        raise ArgumentError("the dataset leaves the lesion metadata tower without any usable feature (none in schema.json, "
                            "or every value missing in the train split): the lesion loss could not learn. Convert the data "
                            "with its lesion columns, or pre-train image-only (--image_ssl_weight 1).")
    if not config.patient_metadata_config.feature_names and config.lesion_loss_weight < 1 and config.image_ssl_weight < 1:
        raise ArgumentError("the dataset leaves the patient metadata tower without any usable feature (none in schema.json, "
                            "or every value missing in the train split): the patient loss would stay at chance. Pass "
                            "--lesion_loss_weight 1 (the flat lesion-level loss), or give the data its patient columns.")


def build_processor(model: SLIMPModel, model_args: ModelArguments) -> SLIMPProcessor:
    """A resize-to-square processor at the model's resolution, with the image normalisation of the
    `--init_vision_from` checkpoint's own image processor when it has one (DINOv2: ImageNet mean/std)."""
    size = getattr(model.config.vision_config, "image_size", 224)
    normalisation = {}
    source = model_args.init_vision_from or model_args.init_from
    if source:
        try:
            reference = AutoImageProcessor.from_pretrained(source)
            normalisation = {"image_mean": list(reference.image_mean), "image_std": list(reference.image_std)}
        except (OSError, ValueError, AttributeError):
            logger.warning("%s has no image processor: using ViT's normalisation (mean 0.5, std 0.5)", source,
                           main_process_only=True)
    return SLIMPProcessor(ViTImageProcessorPil(size={"height": size, "width": size}, **normalisation), model.config)


def model_arguments(argv: list[str]) -> ModelArguments:
    """The `ModelArguments` of a pretrain.py command line (its other options are ignored)."""
    from transformers import HfArgumentParser

    model_args, _ = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    return model_args


def seeded_model(model_args: ModelArguments, schema: dict, train_split, seed: int) -> SLIMPModel:
    """The model a pre-training run at `seed` starts from: every generator seeded (`set_seed`: Python, numpy,
    torch), then `build_model`. pretrain.py and the benchmarks build their initial models with it."""
    set_seed(seed)
    return build_model(model_args, schema, train_split)


__all__ = ["MODEL_SIZES", "VISION_MODEL_TYPES", "vision_config", "tower_sizes", "preset_config", "schema_columns",
           "build_slimp_config", "ModelArguments", "model_arguments", "build_model", "check_towers", "build_processor",
           "seeded_model"]
