"""SLIMPConfig / SLIMPMetadataConfig: validation, round trips, the release architecture."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, Dinov2Config, ResNetConfig, ViTConfig

from conftest import tiny_config
from modeling_slimp import (
    SLIMPConfig,
    SLIMPForLesionClassification,
    SLIMPLesionMetadataConfig,
    SLIMPMetadataConfig,
    SLIMPModel,
    SLIMPPatientMetadataConfig,
)
from modeling_slimp.configuration_slimp import DEFAULT_CLASSIFIER_FEATURES, DEFAULT_CLASSIFIER_REPRESENTATION


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: tiny_config(patient_aggregation="max"), "patient_aggregation"),
        (lambda: tiny_config(classifier_features="image+patient"), "classifier_features"),
        (lambda: tiny_config(lesion_loss_weight=1.5), "lesion_loss_weight"),
        (lambda: tiny_config(image_ssl_weight=-0.1), "image_ssl_weight"),
        (lambda: tiny_config(vision_config={"image_size": 30, "patch_size": 6}), "model_type"),
        (lambda: tiny_config(class_weights=[1.0, 2.0]), "class_weights"),
        (lambda: SLIMPMetadataConfig(numerical_features=["a", "b"], numerical_mean=[0.0]), "numerical_mean"),
        (lambda: SLIMPMetadataConfig(numerical_features=["a"], numerical_std=[1.0, 2.0]), "numerical_std"),
        (lambda: SLIMPMetadataConfig(numerical_features=["a"], numerical_std=[0.0]), "numerical_std"),
        (lambda: SLIMPMetadataConfig(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (lambda: SLIMPMetadataConfig(categorical_features={"sex": []}), "categorical_features"),
        (lambda: SLIMPMetadataConfig(numerical_features=["age"], categorical_features={"age": ["x"]}), "age"),
        (lambda: SLIMPMetadataConfig(feature_dropout=1.0), "feature_dropout"),
    ],
)
def test_invalid_config_raises_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_allowed_values_are_listed_in_the_error():
    with pytest.raises(ValueError, match="'mean', 'attention'"):
        tiny_config(patient_aggregation="median")
    with pytest.raises(ValueError, match="image\\+lesion\\+patient"):
        tiny_config(classifier_features="all")


def test_vision_config_from_dict_with_model_type():
    config = tiny_config(vision_config={"model_type": "dinov2", "image_size": 30, "patch_size": 6, "hidden_size": 32,
                                        "num_hidden_layers": 1, "num_attention_heads": 4})
    assert isinstance(config.vision_config, Dinov2Config)
    assert (config.vision_config.image_size, config.vision_config.hidden_size) == (30, 32)


def test_metadata_defaults_and_properties():
    config = SLIMPMetadataConfig(numerical_features=["a", "b"], categorical_features={"c": ["x", "y"]}, hidden_size=24,
                                 num_attention_heads=3)
    assert config.numerical_mean == [0.0, 0.0] and config.numerical_std == [1.0, 1.0]
    assert config.intermediate_size == 48
    assert config.feature_names == ["a", "b", "c"]
    assert (config.num_numerical, config.num_categorical) == (2, 1)


def _comparable(config) -> dict:
    data = config.to_dict()
    data.pop("transformers_version", None)
    return data


def test_to_dict_from_dict_round_trip():
    config = tiny_config(patient_aggregation="attention", lesion_loss_weight=0.3, class_weights=[1.0, 5.0, 2.0],
                         vision_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    data = config.to_dict()
    json.dumps(data)  # serialisable
    restored = SLIMPConfig.from_dict(data)
    assert _comparable(restored) == _comparable(config)
    assert isinstance(restored.vision_config, ResNetConfig)
    assert isinstance(restored.lesion_metadata_config, SLIMPMetadataConfig)
    assert restored.lesion_metadata_config.categorical_features == config.lesion_metadata_config.categorical_features
    assert restored.patient_aggregation == "attention" and restored.class_weights == [1.0, 5.0, 2.0]


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    config = tiny_config(patient_aggregation="attention", classifier_features="image+lesion", projection_dim=20)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "slimp"
    assert saved["lesion_metadata_config"]["numerical_mean"] == [4.0, 9.0, 50.0]
    restored = SLIMPConfig.from_pretrained(tmp_path)
    assert _comparable(restored) == _comparable(config)
    assert restored.id2label == {0: "nevus", 1: "melanoma", 2: "bcc"}
    assert restored.label2id == {"nevus": 0, "melanoma": 1, "bcc": 2}
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SLIMPConfig)  # registered on import


def test_default_config_is_the_release_architecture():
    config = SLIMPConfig()
    vision = config.vision_config
    assert isinstance(vision, ViTConfig)
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (224, 16, 384)
    assert (vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size) == (12, 6, 1536)
    assert "clin_size_long_diam_mm" in config.lesion_metadata_config.numerical_features
    assert config.lesion_metadata_config.num_numerical == 33
    assert "anatom_site_general" in config.lesion_metadata_config.categorical_features
    assert config.patient_metadata_config.numerical_features == ["age_approx"]
    assert config.patient_metadata_config.categorical_features == {"sex": ["female", "male"]}
    leaking = {"target", "mel_thick_mm", "mel_mitotic_index", "lesion_id"}
    assert not leaking & set(config.lesion_metadata_config.feature_names + config.patient_metadata_config.feature_names)
    assert (config.lesion_loss_weight, config.patient_aggregation, config.image_ssl_weight) == (0.5, "mean", 0.0)

    with torch.device("meta"):  # no allocation
        model = SLIMPModel(config)
    vision_params = sum(p.numel() for p in model.vision_model.parameters())
    assert 21.0e6 < vision_params < 22.5e6, vision_params  # ViT-S/16: ~21.7M without the unused pooler


def test_the_default_config_and_the_isic2024_converter_read_the_same_columns():
    """One contract (`schema_slimp`): the release model's towers and the converter's ISIC 2024 spec name the
    same features at the same level, no feature is a label-leaking column, and the synthetic generator
    writes every one of them into its Kaggle-layout CSV."""
    from modeling_slimp import schema_slimp as contract
    from training.data.sources import ISIC2024
    from training.data.synthetic import CSV_COLUMNS

    config = SLIMPConfig()
    lesion, patient = config.lesion_metadata_config, config.patient_metadata_config
    assert tuple(lesion.numerical_features) == ISIC2024.lesion_numerical
    assert list(lesion.categorical_features) == sorted(ISIC2024.lesion_categorical)  # a config keeps them sorted
    assert tuple(patient.numerical_features) == ISIC2024.patient_numerical
    assert list(patient.categorical_features) == sorted(ISIC2024.patient_categorical)
    assert "tbp_lv_location" in lesion.categorical_features
    features = lesion.feature_names + patient.feature_names
    assert not [f for f in features if contract.leaks_label(f)]
    assert set(features) <= set(CSV_COLUMNS) <= set(contract.ISIC2024_CSV_COLUMNS)
    assert len(contract.ISIC2024_CSV_COLUMNS) == len(set(contract.ISIC2024_CSV_COLUMNS)) == 55


def test_each_sub_config_loads_from_a_whole_checkpoint_by_its_own_key(tmp_path):
    """The lesion and the patient towers share a config class but not a key: each loads its own tower's schema,
    and the shared class, which cannot know which tower is meant, refuses instead of returning one silently."""
    config = tiny_config()
    config.save_pretrained(tmp_path)
    lesion = SLIMPLesionMetadataConfig.from_pretrained(tmp_path)
    patient = SLIMPPatientMetadataConfig.from_pretrained(tmp_path)
    assert _comparable(lesion) == _comparable(config.lesion_metadata_config)
    assert _comparable(patient) == _comparable(config.patient_metadata_config)
    assert lesion.numerical_features != patient.numerical_features  # really two different towers
    vision = ViTConfig.from_pretrained(tmp_path)
    assert (vision.image_size, vision.hidden_size) == (config.vision_config.image_size, config.vision_config.hidden_size)
    with pytest.raises(ValueError, match="SLIMPLesionMetadataConfig.*SLIMPPatientMetadataConfig"):
        SLIMPMetadataConfig.from_pretrained(tmp_path)
    # A tower config saved on its own still loads with either class.
    lesion.save_pretrained(tmp_path / "lesion")
    assert _comparable(SLIMPMetadataConfig.from_pretrained(tmp_path / "lesion")) == _comparable(lesion)


def test_sub_configs_are_the_classes_that_know_their_key(tmp_path):
    config = SLIMPConfig.from_dict(tiny_config().to_dict())
    assert type(config.lesion_metadata_config) is SLIMPLesionMetadataConfig
    assert type(config.patient_metadata_config) is SLIMPPatientMetadataConfig
    assert SLIMPConfig.sub_configs["lesion_metadata_config"] is SLIMPLesionMetadataConfig
    assert SLIMPConfig.sub_configs["patient_metadata_config"] is SLIMPPatientMetadataConfig


def test_classifier_defaults_are_the_measured_ones_stated_once():
    """One set of defaults (every part, tower outputs), read by the config, the fine-tuning script and the probes."""
    import inspect

    from training.finetune import ModelArguments
    from training.probe import evaluate_features, probe_inputs

    assert (DEFAULT_CLASSIFIER_FEATURES, DEFAULT_CLASSIFIER_REPRESENTATION) == ("image+lesion+patient+context", "tower")
    config = SLIMPConfig()
    assert (config.classifier_features, config.classifier_representation) == (DEFAULT_CLASSIFIER_FEATURES,
                                                                            DEFAULT_CLASSIFIER_REPRESENTATION)
    arguments = ModelArguments(model_dir="unused")
    assert (arguments.classifier_features, arguments.representation) == (DEFAULT_CLASSIFIER_FEATURES,
                                                                         DEFAULT_CLASSIFIER_REPRESENTATION)
    for probe_function in (evaluate_features, probe_inputs):  # the probes' default is the classifier's
        assert inspect.signature(probe_function).parameters["representation"].default == DEFAULT_CLASSIFIER_REPRESENTATION
    model = SLIMPForLesionClassification(tiny_config())
    assert model.parts == ["image", "lesion", "patient", "context"]
    assert model.classifier.in_features == 32 + 16 + 24 + (32 + 16)  # tower widths (ViT, lesion, patient) + context


def test_a_checkpoint_config_of_the_previous_release_loads_with_its_own_values(tmp_path):
    """config.json files written before the defaults changed name their classifier fields, and their towers as
    plain `slimp_metadata` dicts: they load with those values and the tower classes that know their key."""
    config = tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(classifier_features="image+lesion+patient", classifier_representation="projection")
    for key in ("lesion_metadata_config", "patient_metadata_config"):
        assert saved[key]["model_type"] == "slimp_metadata"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    restored = SLIMPConfig.from_pretrained(tmp_path)
    assert (restored.classifier_features, restored.classifier_representation) == ("image+lesion+patient", "projection")
    assert type(restored.lesion_metadata_config) is SLIMPLesionMetadataConfig
    model = SLIMPForLesionClassification(restored)
    assert model.classifier.in_features == 3 * restored.projection_dim
