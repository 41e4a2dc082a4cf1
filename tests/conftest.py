"""Shared tiny fixtures for the modeling_slimp tests.

The config is deliberately odd (image 30, patch 6, hidden 32, intermediate 37, metadata widths 16/24,
projection 12) so that a transposed or mixed-up shape fails loudly instead of broadcasting.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import ViTConfig  # noqa: E402

from modeling_slimp import SLIMPConfig, SLIMPMetadataConfig  # noqa: E402

torch.set_num_threads(1)  # 2 shared cores: threads only add contention at these sizes

IMAGE_SIZE = 30
LESION_NUMERICAL = ["clin_size_long_diam_mm", "tbp_lv_areaMM2", "tbp_lv_H"]
LESION_CATEGORICAL = {
    "anatom_site_general": ["head/neck", "upper extremity", "lower extremity", "posterior torso"],
    "tbp_tile_type": ["3D: white", "3D: XP"],
}
PATIENT_NUMERICAL = ["age_approx", "num_moles"]
PATIENT_CATEGORICAL = {"sex": ["female", "male"]}


def tiny_vision_config(**overrides) -> ViTConfig:
    kwargs = dict(image_size=IMAGE_SIZE, patch_size=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37)
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def tiny_metadata_configs(feature_dropout: float = 0.1) -> tuple[SLIMPMetadataConfig, SLIMPMetadataConfig]:
    lesion = SLIMPMetadataConfig(
        numerical_features=LESION_NUMERICAL, categorical_features=LESION_CATEGORICAL,
        numerical_mean=[4.0, 9.0, 50.0], numerical_std=[2.0, 8.0, 10.0],
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=23,
        feature_dropout=feature_dropout,
    )
    patient = SLIMPMetadataConfig(
        numerical_features=PATIENT_NUMERICAL, categorical_features=PATIENT_CATEGORICAL,
        numerical_mean=[55.0, 30.0], numerical_std=[15.0, 20.0],
        hidden_size=24, num_hidden_layers=1, num_attention_heads=3, intermediate_size=29,
        feature_dropout=feature_dropout,
    )
    return lesion, patient


def tiny_config(vision_config=None, feature_dropout: float = 0.1, **overrides) -> SLIMPConfig:
    """A small SLIMPConfig: ViT tower, 3+2 lesion features, 2+1 patient features, D = 12, 3 labels."""
    lesion, patient = tiny_metadata_configs(feature_dropout)
    kwargs = dict(
        vision_config=vision_config if vision_config is not None else tiny_vision_config(),
        lesion_metadata_config=lesion, patient_metadata_config=patient, projection_dim=12,
        num_labels=3, id2label={0: "nevus", 1: "melanoma", 2: "bcc"},
    )
    kwargs.update(overrides)
    return SLIMPConfig(**kwargs)


def make_batch(config: SLIMPConfig, lesions_per_patient=(1, 4, 2), seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch of sum(lesions_per_patient) lesions from len(lesions_per_patient) patients.

    Lesions of a patient are interleaved with other patients' (patient_index is not sorted), raw numerical
    values are on the scale of the config's statistics, and some values are missing (NaN / id 0).
    """
    generator = torch.Generator().manual_seed(seed)
    lesion_cfg, patient_cfg = config.lesion_metadata_config, config.patient_metadata_config
    num_patients = len(lesions_per_patient)
    patient_index = torch.repeat_interleave(torch.arange(num_patients), torch.tensor(lesions_per_patient))
    patient_index = patient_index[torch.randperm(len(patient_index), generator=generator)]
    num_lesions = len(patient_index)
    size = getattr(config.vision_config, "image_size", IMAGE_SIZE)

    def numerical(rows: int, cfg: SLIMPMetadataConfig) -> torch.Tensor:
        values = torch.randn(rows, cfg.num_numerical, generator=generator)
        values = values * torch.tensor(cfg.numerical_std) + torch.tensor(cfg.numerical_mean)
        values[torch.rand(rows, cfg.num_numerical, generator=generator) < 0.15] = float("nan")
        return values

    def categorical(rows: int, cfg: SLIMPMetadataConfig) -> torch.Tensor:
        columns = [torch.randint(0, len(vocabulary) + 1, (rows,), generator=generator)
                   for vocabulary in cfg.categorical_features.values()]
        return torch.stack(columns, dim=1) if columns else torch.zeros(rows, 0, dtype=torch.long)

    return {
        "pixel_values": torch.randn(num_lesions, 3, size, size, generator=generator),
        "lesion_numerical_values": numerical(num_lesions, lesion_cfg),
        "lesion_categorical_ids": categorical(num_lesions, lesion_cfg),
        "patient_numerical_values": numerical(num_patients, patient_cfg),
        "patient_categorical_ids": categorical(num_patients, patient_cfg),
        "patient_index": patient_index,
    }


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch from several (patients stay whole): lesion rows stacked, patient_index offset."""
    result, offset = {}, 0
    for batch in batches:
        for key, value in batch.items():
            value = value + offset if key == "patient_index" else value
            result.setdefault(key, []).append(value)
        offset += batch["patient_numerical_values"].shape[0]
    return {key: torch.cat(values) for key, values in result.items()}
