"""training/export_widget.py: the image-only SLIMP classifier as a built-in transformers classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    DeiTConfig,
    Dinov2Config,
    Dinov2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    pipeline,
)

from modeling_slimp import SLIMPConfig, SLIMPForLesionClassification, SLIMPMetadataConfig, SLIMPProcessor
from training import export_widget as export_module
from training.export_widget import build_widget_model, export_widget, main

ID2LABEL = {0: "nevus", 1: "melanoma", 2: "bcc"}

# Odd tiny sizes (hidden 32, image 30) so that transposed or mis-sliced head weights fail loudly.
BACKBONES = {
    "vit": (lambda: ViTConfig(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=37), "image", ViTForImageClassification),
    "dinov2": (lambda: Dinov2Config(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, mlp_ratio=1), "image+lesion", Dinov2ForImageClassification),
    "resnet": (lambda: ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], layer_type="basic"),
               "image+lesion+patient", ResNetForImageClassification),
    "convnext": (lambda: ConvNextConfig(num_stages=2, hidden_sizes=[8, 12], depths=[1, 1], image_size=32),
                 "image+lesion+patient", ConvNextForImageClassification),
}


def tiny_classifier(vision_config, classifier_features: str, dropout: float = 0.0,
                    representation: str = "projection") -> SLIMPForLesionClassification:
    """Random SLIMP classifier whose head, projections and biases are far from zero (so a dropped term shows)."""
    torch.manual_seed(0)
    metadata = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                    hidden_dropout=dropout)
    config = SLIMPConfig(
        vision_config=vision_config,
        lesion_metadata_config=SLIMPMetadataConfig(
            numerical_features=["clin_size_long_diam_mm"], categorical_features={"anatom_site_general": ["head/neck", "torso"]},
            numerical_mean=[4.0], numerical_std=[2.0], **metadata),
        patient_metadata_config=SLIMPMetadataConfig(
            numerical_features=["age_approx"], categorical_features={"sex": ["female", "male"]},
            numerical_mean=[50.0], numerical_std=[15.0], **metadata),
        projection_dim=8, classifier_features=classifier_features, num_labels=3, id2label=ID2LABEL,
        classifier_dropout=dropout, classifier_representation=representation,
    )
    model = SLIMPForLesionClassification(config)
    slimp = model.slimp
    with torch.no_grad():
        for layer in (model.classifier, slimp.visual_projection, slimp.lesion_metadata_projection,
                      slimp.patient_metadata_projection):
            layer.weight.normal_(std=0.5)
            layer.bias.normal_(std=0.5)
    return model.eval()


def assert_builtin_export(out, expected_class) -> torch.nn.Module:
    """The folder holds no code and no auto_map, and loads as a transformers built-in class."""
    assert not list(out.rglob("*.py"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    for name in ("config.json", "preprocessor_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text())
    loaded, info = AutoModelForImageClassification.from_pretrained(out, output_loading_info=True)
    assert type(loaded) is expected_class
    assert type(loaded).__module__.startswith("transformers.models.")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.id2label == ID2LABEL
    return loaded.eval()


@pytest.mark.parametrize("backbone, variant", [(b, None) for b in BACKBONES] + [
    ("vit", ("image+lesion+patient+context", "tower")), ("resnet", ("image+lesion+context", "tower")),
    ("dinov2", ("image+context", "projection"))])
def test_export_reproduces_image_only_logits_and_pipeline(backbone, variant, tmp_path):
    make_config, classifier_features, expected_class = BACKBONES[backbone]
    features, representation = variant or (classifier_features, "projection")
    model = tiny_classifier(make_config(), features, representation=representation)
    out = tmp_path / "widget"
    export_widget(model, out)
    loaded = assert_builtin_export(out, expected_class)

    size = getattr(model.config.vision_config, "image_size", 64)
    pixel_values = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
        actual = loaded(pixel_values=pixel_values).logits
    assert expected.abs().max() > 0.5  # the perturbed head makes the comparison meaningful
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)

    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    classifier = pipeline("image-classification", model=str(out))
    predictions = classifier(image, top_k=len(ID2LABEL))
    with torch.no_grad():
        inputs = AutoImageProcessor.from_pretrained(out)(images=image, return_tensors="pt")
        probabilities = model(pixel_values=inputs["pixel_values"]).logits.softmax(-1)[0]
    order = probabilities.argsort(descending=True).tolist()
    assert [p["label"] for p in predictions] == [ID2LABEL[i] for i in order]
    assert [p["score"] for p in predictions] == pytest.approx(probabilities[order].tolist(), abs=1e-5)


def test_main_exports_verifies_and_fails_loudly(tmp_path, monkeypatch):
    model = tiny_classifier(BACKBONES["vit"][0](), "image+lesion+patient")
    model_dir = tmp_path / "classifier"
    model.save_pretrained(model_dir)
    SLIMPProcessor(config=model.config).save_pretrained(model_dir)

    out = tmp_path / "widget"
    difference = main(["--model_dir", str(model_dir), "--output_dir", str(out), "--atol", "1e-4"])
    assert difference <= 1e-4
    assert_builtin_export(out, ViTForImageClassification)
    assert (out / "preprocessor_config.json").read_text() == (model_dir / "preprocessor_config.json").read_text()
    card = (out / "README.md").read_text()
    for line in ("license: other", "pipeline_tag: image-classification", "library_name: transformers"):
        assert line in card
    assert "base_model" not in card, "a local path is not a Hub id"
    assert "image-only export" in card

    original = export_module.image_only_head  # a wrong constant must fail the check with the difference
    monkeypatch.setattr(export_module, "image_only_head", lambda m: (original(m)[0], original(m)[1] + 1.0))
    with pytest.raises(SystemExit, match=r"max \|logit difference\| = 1 > atol"):
        main(["--model_dir", str(model_dir), "--output_dir", str(tmp_path / "broken")])


def test_head_is_folded_in_eval_mode_and_training_mode_restored():
    model = tiny_classifier(BACKBONES["vit"][0](), "image+lesion+patient", dropout=0.5).train()
    widget = build_widget_model(model)
    assert model.training
    pixel_values = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(widget(pixel_values=pixel_values).logits, model.eval()(pixel_values=pixel_values).logits,
                                   atol=1e-4, rtol=0)


def test_unsupported_backbone_names_supported_ones(tmp_path):
    vision = DeiTConfig(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37)
    model = tiny_classifier(vision, "image")
    with pytest.raises(ValueError, match="DeiTConfig.*ViTConfig, Dinov2Config, ResNetConfig, ConvNextConfig"):
        export_widget(model, tmp_path / "widget")
    assert not (tmp_path / "widget").exists()
