"""SLIMPModel and SLIMPForLesionClassification behave as every transformers model does: the attention choice
reaches all three towers, output flags and `return_dict` are honoured, a misspelt keyword is an error, the
feature getters return output objects, the classifier owns no trainable parameter its forward never reads, and
the forward traces under `torch.export` and `torch.compile(fullgraph=True)` with `patient_index` given."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conftest import IMAGE_SIZE, make_batch, tiny_config
from modeling_slimp import SLIMPForLesionClassification, SLIMPModel

CLASSES = [SLIMPModel, SLIMPForLesionClassification]
NUM_PATCHES = (IMAGE_SIZE // 6) ** 2  # the tiny ViT: 30 px images, 6 px patches


def seeded(model_class, **overrides):
    torch.manual_seed(0)
    return model_class(tiny_config(feature_dropout=0.0, **overrides)).eval()


def towers(model) -> dict:
    base = model.base_model
    return {"vision": base.vision_model, "lesion": base.lesion_metadata_model, "patient": base.patient_metadata_model}


# ----- attention implementation -----


@pytest.mark.parametrize("model_class", CLASSES)
def test_sdpa_and_eager_reach_all_three_towers_and_give_the_same_outputs(model_class, tmp_path):
    seeded(model_class).save_pretrained(tmp_path)
    batch = make_batch(tiny_config())
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model = model_class.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        for name, tower in towers(model).items():
            assert tower.config._attn_implementation == implementation, name
        with torch.no_grad():
            outputs[implementation] = model(**batch)
    for key, value in outputs["eager"].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(outputs["sdpa"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    default = model_class.from_pretrained(tmp_path)
    assert {tower.config._attn_implementation for tower in towers(default).values()} == {"sdpa"}


def test_set_attn_implementation_switches_every_tower_and_eager_returns_the_maps():
    model = seeded(SLIMPModel)
    batch = make_batch(model.config)
    with torch.no_grad():
        reference = model(**batch).phenotype_embeds
    model.set_attn_implementation("eager")
    assert {tower.config._attn_implementation for tower in towers(model).values()} == {"eager"}
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    torch.testing.assert_close(out.phenotype_embeds, reference, rtol=1e-5, atol=1e-5)
    lesion_maps = out.lesion_metadata_model_output.attentions
    assert len(lesion_maps) == 2 and lesion_maps[0].shape == (7, 2, 1 + 5, 1 + 5)  # heads, [CLS] + 3 + 2 features
    torch.testing.assert_close(lesion_maps[0].sum(-1), torch.ones(7, 2, 6))  # softmax rows
    assert len(out.attentions) == 2 and out.attentions[0].shape == (7, 4, NUM_PATCHES + 1, NUM_PATCHES + 1)
    with pytest.raises(ValueError, match="attn_implementation"):
        model.set_attn_implementation("no_such_attention")


# ----- output flags, return_dict and keyword arguments -----


@pytest.mark.parametrize("model_class", CLASSES)
def test_output_flags_reach_the_image_tower_from_the_call_or_the_config(model_class):
    model = seeded(model_class)
    batch = make_batch(model.config)
    with torch.no_grad():
        plain = model(**batch)
        asked = model(**batch, output_hidden_states=True)
        model.config.output_hidden_states = True
        from_config = model(**batch)
    assert plain.hidden_states is None
    for out in (asked, from_config):
        assert len(out.hidden_states) == 3  # embeddings + 2 layers
        assert out.hidden_states[0].shape == (7, NUM_PATCHES + 1, 32)
    if model_class is SLIMPModel:
        hidden = asked.lesion_metadata_model_output.hidden_states
        assert len(hidden) == 3 and hidden[-1].shape == (7, 6, 16)


@pytest.mark.parametrize("model_class", CLASSES)
def test_return_dict_false_gives_the_same_values_as_a_tuple(model_class):
    model = seeded(model_class)
    batch = make_batch(model.config)
    with torch.no_grad():
        as_object = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        model.config.return_dict = False
        from_config = model(**batch)
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    first_key = next(iter(as_object.keys()))  # logits_per_image / logits: the loss is absent
    torch.testing.assert_close(as_tuple[0], as_object[first_key])
    assert len(as_tuple) == len(as_object.to_tuple()) == len(from_config)


@pytest.mark.parametrize("model_class", CLASSES)
def test_a_misspelt_keyword_is_an_error_not_a_silent_default(model_class):
    model = seeded(model_class)
    batch = make_batch(model.config)
    patient_index = batch.pop("patient_index")
    with pytest.raises(TypeError, match="patient_idx"):
        model(**batch, patient_idx=patient_index)  # would otherwise make every lesion its own patient
    with pytest.raises(TypeError, match="lesion_numeric_values"):
        model(pixel_values=batch["pixel_values"], lesion_numeric_values=batch["lesion_numerical_values"])


# ----- feature getters -----


def test_feature_getters_return_output_objects_whose_pooler_output_is_the_projected_feature():
    model = seeded(SLIMPModel)
    batch = make_batch(model.config)
    with torch.no_grad():
        out = model(**batch)
        image = model.get_image_features(batch["pixel_values"], output_hidden_states=True)
        lesion = model.get_lesion_metadata_features(batch["lesion_numerical_values"], batch["lesion_categorical_ids"])
        patient = model.get_patient_metadata_features(batch["patient_numerical_values"], batch["patient_categorical_ids"])
        phenotype = model.get_phenotype_features(batch["pixel_values"], batch["lesion_numerical_values"],
                                                 batch["lesion_categorical_ids"], batch["patient_index"], num_patients=3)
        as_tuple = model.get_image_features(batch["pixel_values"], return_dict=False)
    for output in (image, lesion, patient, phenotype):
        assert isinstance(output, BaseModelOutputWithPooling)
    assert image.last_hidden_state.shape == (7, NUM_PATCHES + 1, 32) and len(image.hidden_states) == 3
    torch.testing.assert_close(image.pooler_output, model.visual_projection(out.image_pooled_output))
    torch.testing.assert_close(lesion.pooler_output, model.lesion_metadata_projection(out.lesion_metadata_pooled_output))
    torch.testing.assert_close(patient.pooler_output, model.patient_metadata_projection(out.patient_metadata_pooled_output))
    assert lesion.last_hidden_state.shape == (7, 6, 16) and patient.last_hidden_state.shape == (3, 4, 24)
    assert phenotype.pooler_output.shape == (3, 12) and phenotype.last_hidden_state.shape == (3, 24)
    torch.testing.assert_close(torch.nn.functional.normalize(phenotype.pooler_output, dim=-1), out.phenotype_embeds)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], image.pooler_output)  # (last_hidden_state, pooler_output)


# ----- parameters the classifier never reads -----


@pytest.mark.parametrize("features, representation", [("image+lesion+patient+context", "tower"),
                                                      ("image+lesion+patient", "projection"), ("image", "tower")])
def test_every_trainable_parameter_of_the_classifier_gets_a_gradient_also_after_reloading(features, representation,
                                                                                          tmp_path):
    """DDP with find_unused_parameters=False (Trainer with gradient checkpointing) stops at a trainable parameter
    without a gradient; what the head never reads is frozen, from the constructor and from from_pretrained."""
    seeded(SLIMPForLesionClassification, classifier_features=features,
           classifier_representation=representation).save_pretrained(tmp_path)
    for model in (seeded(SLIMPForLesionClassification, classifier_features=features,
                         classifier_representation=representation),
                  SLIMPForLesionClassification.from_pretrained(tmp_path)):
        model.train()
        batch = make_batch(model.config)
        model(**batch, labels=torch.tensor([0, 1, 2, 0, 1, 2, 0])).loss.backward()
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        without = sorted(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None)
        assert not without, without
        assert "slimp.lesion_logit_scale" not in trainable and "slimp.phenotype_projection.weight" not in trainable
        assert ("slimp.visual_projection.weight" in trainable) == (representation == "projection")
        assert any(name.startswith("slimp.patient_metadata_model.") for name in trainable) == ("patient" in features)
    base = SLIMPModel.from_pretrained(tmp_path)  # the frozen weights are still in the checkpoint, and trainable here
    assert base.lesion_logit_scale.requires_grad and base.phenotype_projection.weight.requires_grad


# ----- tracing -----


@pytest.mark.parametrize("model_class", CLASSES)
def test_torch_export_with_patient_index_matches_eager_and_eager_still_checks(model_class):
    model = seeded(model_class)
    batch = make_batch(model.config)
    with torch.no_grad():
        expected = model(**batch)
    program = torch.export.export(model, (), kwargs=dict(batch), strict=False)
    with torch.no_grad():
        exported = program.module()(**batch)
    key = "phenotype_embeds" if model_class is SLIMPModel else "logits"
    torch.testing.assert_close(exported[key], expected[key], rtol=1e-5, atol=1e-5)
    other = make_batch(model.config, lesions_per_patient=(2, 2, 3), seed=5)  # same shapes, other values
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**other)[key], model(**other)[key], rtol=1e-5, atol=1e-5)
    bad = dict(batch, patient_index=batch["patient_index"].clone().fill_(7))  # out of range: eager says so
    with pytest.raises(ValueError, match="patient_index must lie in"):
        model(**bad)


@pytest.mark.parametrize("model_class", CLASSES)
def test_torch_export_with_patient_index_alone_counts_the_patients_at_run_time(model_class):
    """Without patient rows, P is the largest index + 1: a size the exported program reads from its input."""
    model = seeded(model_class)
    keys = ("pixel_values", "lesion_numerical_values", "lesion_categorical_ids", "patient_index")
    batch = {key: make_batch(model.config)[key] for key in keys}  # 7 lesions of 3 patients
    program = torch.export.export(model, (), kwargs=batch, strict=False)
    other = {key: make_batch(model.config, lesions_per_patient=(4, 3), seed=2)[key] for key in keys}  # 2 patients
    key = "phenotype_embeds" if model_class is SLIMPModel else "logits"
    for inputs in (batch, other):
        with torch.no_grad():
            exported, expected = program.module()(**inputs)[key], model(**inputs)[key]
        assert exported.shape == expected.shape
        torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph_with_patient_index_matches_eager():
    torch._dynamo.reset()
    model = seeded(SLIMPModel)
    batch = make_batch(model.config)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected, out = model(**batch, return_loss=True), compiled(**batch, return_loss=True)
    for key in ("loss", "phenotype_embeds", "logits_per_image"):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)


def test_image_feature_extraction_pipeline_gives_each_image_its_embedding(tmp_path):
    # The base model's card says pipeline_tag: image-feature-extraction; that pipeline returns the model's first
    # output, which for images alone must be the image embedding (N, D), not an image-metadata similarity: the
    # L2-normalised projection, as `image_embeds` (get_image_features gives it before normalising, as CLIP's).
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    from modeling_slimp import SLIMPProcessor

    torch.manual_seed(0)
    model = SLIMPModel(tiny_config()).eval()
    processor = SLIMPProcessor(config=model.config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(2)]
    extractor = pipeline("image-feature-extraction", model=str(tmp_path), device="cpu")
    features = torch.tensor([extractor(image)[0] for image in images])  # (2, D)
    with torch.no_grad():
        expected = model.get_image_features(**processor(images=images)).pooler_output
        images_only = model(**processor(images=images))
    assert images_only.logits_per_image is None and images_only.logits_per_phenotype is None
    assert features.shape == (2, model.config.projection_dim)
    torch.testing.assert_close(features, torch.nn.functional.normalize(expected, dim=-1), rtol=1e-5, atol=1e-5)
