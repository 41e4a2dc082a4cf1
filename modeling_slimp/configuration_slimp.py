"""Configuration of SLIMP: the image tower, the two metadata towers and the nested contrastive head.

No torch here: a config is data. `SLIMPMetadataConfig` is also the *metadata schema* (feature names,
kinds, category vocabularies, normalisation statistics), fitted on the training split by
`training.data.metadata_schema.fit_metadata_schema` and stored once, in `config.json`, where both the model and the
processor read it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig, ViTConfig
from transformers.configuration_utils import SubConfigSpec

from .schema_slimp import (
    ISIC2024_LESION_CATEGORICAL,
    ISIC2024_LESION_NUMERICAL,
    ISIC2024_PATIENT_CATEGORICAL,
    ISIC2024_PATIENT_NUMERICAL,
)

PATIENT_AGGREGATIONS = ("mean", "attention")
# The parts a classifier may read, in this order: `image`, then optionally `lesion`, `patient`, `context`.
CLASSIFIER_FEATURES = tuple(
    "+".join(["image", *metadata, *context])
    for metadata in ((), ("lesion",), ("lesion", "patient"))
    for context in ((), ("context",))
)
CLASSIFIER_REPRESENTATIONS = ("projection", "tower")
# The feature sets the probes, evaluate.py and the benchmarks report, by their report names, each with the
# `classifier_features` that read exactly those inputs ("metadata": the lesion's and its patient's). One
# vocabulary: a probe of a feature set reads what that classifier head reads.
FEATURE_SETS = {"image": "image", "image+context": "image+context", "image+metadata": "image+lesion+patient",
                "image+metadata+context": "image+lesion+patient+context"}
# The classifier defaults, the measured ones (README, quality section): every part, read before the projections.
# `training/finetune.py` and the examples import them from here.
DEFAULT_CLASSIFIER_FEATURES = "image+lesion+patient+context"
DEFAULT_CLASSIFIER_REPRESENTATION = "tower"


class SLIMPMetadataConfig(PreTrainedConfig):
    r"""Configuration of one FT-Transformer metadata tower, and the schema of the features it reads.

    Args:
        numerical_features (`list[str]`): column names of the numerical features, in input order.
        categorical_features (`dict[str, list[str]]`): column name -> category vocabulary. Kept sorted by column
            name, the input order: `config.json` stores its keys sorted, so any other order would feed a loaded
            model's categorical tokens in another order than it was trained with.
            Category id 0 is reserved for "missing/unknown"; vocabulary entry `j` has id `j + 1`.
        numerical_mean, numerical_std (`list[float]`): normalisation statistics, one per numerical
            feature (fitted on the training split). Defaults: 0 and 1.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: transformer widths.
        feature_dropout (`float`): probability, in training, of marking a present feature as missing.
        hidden_dropout, attention_dropout (`float`): dropout in the blocks.
        layer_norm_eps, initializer_range, hidden_act: the usual.
    """

    model_type: ClassVar[str] = "slimp_metadata"

    numerical_features: list[str] | None = None
    categorical_features: dict[str, list[str]] | None = None
    numerical_mean: list[float] | None = None
    numerical_std: list[float] | None = None
    hidden_size: int = 192
    num_hidden_layers: int = 3
    num_attention_heads: int = 8
    intermediate_size: int | None = None
    feature_dropout: float = 0.1
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    hidden_act: str = "gelu"

    def __post_init__(self, **kwargs):
        self.numerical_features = list(self.numerical_features or [])
        self.categorical_features = {str(k): [str(c) for c in v]
                                     for k, v in sorted((self.categorical_features or {}).items(), key=lambda kv: str(kv[0]))}
        n = len(self.numerical_features)
        self.numerical_mean = [float(v) for v in self.numerical_mean] if self.numerical_mean is not None else [0.0] * n
        self.numerical_std = [float(v) for v in self.numerical_std] if self.numerical_std is not None else [1.0] * n
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.hidden_size
        self._validate()
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        n = len(self.numerical_features)
        for name in ("numerical_mean", "numerical_std"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"SLIMPMetadataConfig.{name} has {len(getattr(self, name))} values but numerical_features has "
                    f"{n} ({self.numerical_features}); give one statistic per numerical feature."
                )
        bad_std = [f for f, s in zip(self.numerical_features, self.numerical_std) if not (s > 0 and math.isfinite(s))]
        if bad_std:
            raise ValueError(f"SLIMPMetadataConfig.numerical_std must be finite and > 0; not so for {bad_std}.")
        bad_mean = [f for f, m in zip(self.numerical_features, self.numerical_mean) if not math.isfinite(m)]
        if bad_mean:
            raise ValueError(f"SLIMPMetadataConfig.numerical_mean must be finite; not so for {bad_mean}.")
        names = self.numerical_features + list(self.categorical_features)
        duplicates = sorted({f for f in names if names.count(f) > 1})
        if duplicates:
            raise ValueError(f"SLIMPMetadataConfig: features listed twice: {duplicates}.")
        for feature, vocabulary in self.categorical_features.items():
            if len(vocabulary) == 0 or len(set(vocabulary)) != len(vocabulary):
                raise ValueError(
                    f"SLIMPMetadataConfig.categorical_features['{feature}'] must be a non-empty list of distinct "
                    f"categories, got {vocabulary}."
                )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"SLIMPMetadataConfig.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"SLIMPMetadataConfig.feature_dropout must be in [0, 1), got {self.feature_dropout}.")

    @property
    def num_numerical(self) -> int:
        return len(self.numerical_features)

    @property
    def num_categorical(self) -> int:
        return len(self.categorical_features)

    @property
    def feature_names(self) -> list[str]:
        """All features in token order: numerical first, then categorical."""
        return self.numerical_features + list(self.categorical_features)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """As `PreTrainedConfig.get_config_dict`; a full SLIMP checkpoint holds two towers, so loading one of them
        from it needs the class that names its key (`SLIMPLesionMetadataConfig`, `SLIMPPatientMetadataConfig`)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "slimp" and cls.base_config_key not in config_dict:
            raise ValueError(
                f"'{pretrained_model_name_or_path}' is a whole SLIMP checkpoint with two metadata towers: load "
                "SLIMPLesionMetadataConfig.from_pretrained(...) or SLIMPPatientMetadataConfig.from_pretrained(...) "
                "(or SLIMPConfig.from_pretrained(...).lesion_metadata_config)."
            )
        return config_dict, kwargs


class SLIMPLesionMetadataConfig(SLIMPMetadataConfig):
    """The lesion tower's `SLIMPMetadataConfig`; `from_pretrained` of a whole SLIMP checkpoint reads its key."""

    base_config_key: ClassVar[str] = "lesion_metadata_config"


class SLIMPPatientMetadataConfig(SLIMPMetadataConfig):
    """The patient tower's `SLIMPMetadataConfig`; `from_pretrained` of a whole SLIMP checkpoint reads its key."""

    base_config_key: ClassVar[str] = "patient_metadata_config"


def _release_vision_config() -> ViTConfig:
    """ViT-S/16 at 224 px (DINOv2-small/ViT-S sized): the release image tower."""
    return ViTConfig(
        image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
        intermediate_size=1536, layer_norm_eps=1e-6,
    )


class SLIMPConfig(PreTrainedConfig):
    r"""Configuration of a SLIMP model (`SLIMPModel`, `SLIMPForLesionClassification`).

    `SLIMPConfig()` with no arguments is the release architecture: a ViT-S/16 image tower at 224 px and
    FT-Transformer towers over the ISIC 2024 (SLICE-3D) metadata columns.

    Args:
        vision_config (`PreTrainedConfig` or `dict` with `model_type`): any transformers vision config
            (ViT, DINOv2, ResNet, ConvNeXt, ...); the tower is `AutoModel.from_config(vision_config)`.
        lesion_metadata_config, patient_metadata_config (`SLIMPMetadataConfig` or `dict`): the two
            metadata towers and their schemas (a dict becomes a `SLIMPLesionMetadataConfig` /
            `SLIMPPatientMetadataConfig`, the classes that load one tower from a whole checkpoint).
        projection_dim (`int`): width D of every embedding the losses compare.
        lesion_loss_weight (`float`): λ in `L = λ·L_lesion + (1 − λ)·L_patient`; λ = 1 is the flat
            lesion-only (CLIP-style image-metadata) loss.
        image_ssl_weight (`float`): weight w of the SimCLR NT-Xent term between two views of each image;
            the total is `(1 − w)·L_nested + w·L_ssl`, so w = 1 is the image-only SimCLR baseline.
        ssl_temperature (`float`): NT-Xent temperature.
        patient_aggregation (`"mean"` or `"attention"`): how a patient's lesion representations are pooled.
        logit_scale_init_value (`float`): initial log logit scale of both levels (ln(1/0.07)).
        max_logit_scale (`float`): clamp of the log logit scales (ln 100).
        classifier_features (`str`): the parts `SLIMPForLesionClassification` reads, joined by "+":
            `image`, then optionally `lesion` (the lesion's metadata), `patient` (its patient's metadata) and
            `context` (the lesion's image [+ lesion metadata] representation minus the mean of the same
            patient's other lesions; see `pooling.PatientSums.context`). One of `CLASSIFIER_FEATURES`;
            default `DEFAULT_CLASSIFIER_FEATURES`, all four.
        classifier_representation (`"projection"` or `"tower"`): what the head reads of each tower: the
            projected, un-normalised features (`get_image_features(...).pooler_output`, ...), or the tower
            outputs before the projection (pooled image feature, metadata [CLS]); default
            `DEFAULT_CLASSIFIER_REPRESENTATION`, the towers. Either way the image-only path is affine in the
            backbone's pooled feature.
        classifier_dropout (`float`): dropout before the classification head.
        class_weights (`list[float]`, optional): per-class weights of the classification loss.
        initializer_range (`float`): std of the truncated-normal init of the SLIMP-specific layers.
    """

    model_type: ClassVar[str] = "slimp"
    sub_configs_defaults: ClassVar[dict] = {
        "vision_config": SubConfigSpec(AutoConfig, model_type="vit"),
        "lesion_metadata_config": SLIMPLesionMetadataConfig,
        "patient_metadata_config": SLIMPPatientMetadataConfig,
    }

    vision_config: Any = None
    lesion_metadata_config: Any = None
    patient_metadata_config: Any = None
    projection_dim: int = 256
    lesion_loss_weight: float = 0.5
    image_ssl_weight: float = 0.0
    ssl_temperature: float = 0.1
    patient_aggregation: str = "mean"
    logit_scale_init_value: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    classifier_features: str = DEFAULT_CLASSIFIER_FEATURES
    classifier_representation: str = DEFAULT_CLASSIFIER_REPRESENTATION
    classifier_dropout: float = 0.0
    class_weights: list[float] | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = _release_vision_config()
        elif isinstance(self.vision_config, dict):
            vision = dict(self.vision_config)
            if "model_type" not in vision:
                raise ValueError(
                    "SLIMPConfig.vision_config given as a dict needs a 'model_type' (e.g. 'vit', 'dinov2', 'resnet')."
                )
            self.vision_config = AutoConfig.for_model(vision.pop("model_type"), **vision)
        elif not isinstance(self.vision_config, PreTrainedConfig):
            raise TypeError(
                f"SLIMPConfig.vision_config must be a transformers config or a dict, got {type(self.vision_config)}."
            )
        if self.lesion_metadata_config is None:
            self.lesion_metadata_config = SLIMPLesionMetadataConfig(
                numerical_features=list(ISIC2024_LESION_NUMERICAL),
                categorical_features={k: list(v) for k, v in ISIC2024_LESION_CATEGORICAL.items()},
            )
        if self.patient_metadata_config is None:
            self.patient_metadata_config = SLIMPPatientMetadataConfig(
                numerical_features=list(ISIC2024_PATIENT_NUMERICAL),
                categorical_features={k: list(v) for k, v in ISIC2024_PATIENT_CATEGORICAL.items()},
            )
        for key in ("lesion_metadata_config", "patient_metadata_config"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, self.sub_configs[key](**value))
            elif not isinstance(value, SLIMPMetadataConfig):
                raise TypeError(f"SLIMPConfig.{key} must be a SLIMPMetadataConfig or a dict, got {type(value)}.")
        super().__post_init__(**kwargs)
        if self.id2label is not None and not self.label2id:
            self.label2id = {label: index for index, label in self.id2label.items()}
        self._validate()

    def _validate(self) -> None:
        if self.patient_aggregation not in PATIENT_AGGREGATIONS:
            raise ValueError(
                f"SLIMPConfig.patient_aggregation must be one of {PATIENT_AGGREGATIONS}, got '{self.patient_aggregation}'."
            )
        if self.classifier_features not in CLASSIFIER_FEATURES:
            raise ValueError(
                f"SLIMPConfig.classifier_features must be one of {CLASSIFIER_FEATURES}, got '{self.classifier_features}'."
            )
        if self.classifier_representation not in CLASSIFIER_REPRESENTATIONS:
            raise ValueError(
                f"SLIMPConfig.classifier_representation must be one of {CLASSIFIER_REPRESENTATIONS}, "
                f"got '{self.classifier_representation}'."
            )
        for name in ("lesion_loss_weight", "image_ssl_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SLIMPConfig.{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.projection_dim < 1:
            raise ValueError(f"SLIMPConfig.projection_dim must be >= 1, got {self.projection_dim}.")
        if self.ssl_temperature <= 0:
            raise ValueError(f"SLIMPConfig.ssl_temperature must be > 0, got {self.ssl_temperature}.")
        if self.class_weights is not None and self.id2label is not None and len(self.class_weights) != len(self.id2label):
            raise ValueError(
                f"SLIMPConfig.class_weights has {len(self.class_weights)} values but there are {len(self.id2label)} "
                f"labels ({self.id2label})."
            )
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"SLIMPConfig.classifier_dropout must be in [0, 1), got {self.classifier_dropout}.")


__all__ = ["SLIMPConfig", "SLIMPMetadataConfig", "SLIMPLesionMetadataConfig", "SLIMPPatientMetadataConfig",
           "CLASSIFIER_FEATURES", "CLASSIFIER_REPRESENTATIONS", "DEFAULT_CLASSIFIER_FEATURES", "FEATURE_SETS",
           "DEFAULT_CLASSIFIER_REPRESENTATION", "PATIENT_AGGREGATIONS"]
