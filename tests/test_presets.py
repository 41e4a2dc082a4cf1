"""training.presets.preset_config: the model presets as a documented SLIMPConfig factory, usable without
pretrain.py or a dataset, and the same presets that pretrain.py builds."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import ResNetConfig, ViTConfig

from conftest import make_batch
from modeling_slimp import SLIMPConfig, SLIMPMetadataConfig, SLIMPModel
from training.presets import build_slimp_config, preset_config


def test_the_small_preset_is_the_release_architecture():
    config = preset_config("small")
    assert isinstance(config, SLIMPConfig) and isinstance(config.vision_config, ViTConfig)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (224, 16, 384, 12)
    assert config.projection_dim == 256
    for tower in (config.lesion_metadata_config, config.patient_metadata_config):
        assert (tower.hidden_size, tower.num_hidden_layers, tower.num_attention_heads) == (192, 3, 8)
    assert "clin_size_long_diam_mm" in config.lesion_metadata_config.numerical_features  # the ISIC 2024 columns
    assert config.patient_metadata_config.categorical_features == {"sex": ["female", "male"]}


def test_metadata_towers_given_as_fields_get_the_preset_sizes_and_a_config_is_kept_as_given():
    lesion = {"numerical_features": ["clin_size_long_diam_mm"], "numerical_mean": [4.0], "numerical_std": [2.0],
              "categorical_features": {"anatom_site_general": ["head/neck", "upper extremity"]}}
    patient = SLIMPMetadataConfig(numerical_features=["age_approx"], hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = preset_config("tiny", "resnet", lesion_metadata_config=lesion, patient_metadata_config=patient,
                           lesion_loss_weight=1.0, id2label={0: "benign", 1: "malignant"})
    assert isinstance(config.vision_config, ResNetConfig)
    assert config.lesion_metadata_config.hidden_size == 64 and config.lesion_metadata_config.numerical_std == [2.0]
    assert config.patient_metadata_config.hidden_size == 32  # as given
    assert config.lesion_loss_weight == 1.0 and config.label2id == {"benign": 0, "malignant": 1}


def test_a_tiny_preset_model_runs_a_forward():
    config = preset_config("tiny", image_size=32)
    model = SLIMPModel(config).eval()
    with torch.no_grad():
        out = model(**make_batch(config, lesions_per_patient=(2, 3)))
    assert out.image_embeds.shape == (5, config.projection_dim) and out.phenotype_embeds.shape == (2, config.projection_dim)


def test_pretrain_builds_its_models_from_the_same_presets():
    rows = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(40)], "age_approx": [30.0 + i for i in range(40)],
                         "clin_size_long_diam_mm": [1.0 + i / 10 for i in range(40)], "label": [0, 1] * 20})
    schema = {"lesion": {"numerical": ["clin_size_long_diam_mm"], "categorical": []},
              "patient": {"numerical": ["age_approx"], "categorical": []}, "label": {"names": ["benign", "malignant"]}}
    for size in ("tiny", "small"):
        fitted, preset = build_slimp_config(schema, rows, size, "dinov2"), preset_config(size, "dinov2")
        assert fitted.vision_config.to_dict() == preset.vision_config.to_dict() and fitted.projection_dim == preset.projection_dim
        assert fitted.lesion_metadata_config.hidden_size == preset.lesion_metadata_config.hidden_size
        assert fitted.lesion_metadata_config.numerical_features == ["clin_size_long_diam_mm"]


def test_an_unknown_preset_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"model_size must be one of \('tiny', 'small', 'base'\), got 'huge'"):
        preset_config("huge")
    with pytest.raises(ValueError, match="vision_model_type must be one of"):
        preset_config("tiny", "swin")
