"""SLIMPModel and SLIMPForLesionClassification on one process (tiny configs, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ConvNextConfig, Dinov2Config, Dinov2Model, ResNetConfig, ViTModel

from conftest import IMAGE_SIZE, make_batch, tiny_config, tiny_vision_config
from modeling_slimp import SLIMPForLesionClassification, SLIMPMetadataConfig, SLIMPModel
from modeling_slimp.metadata_encoder import MAX_ABS_ZSCORE


def build(model_class=SLIMPModel, seed: int = 0, train: bool = False, **config_overrides):
    """A seeded tiny model. Linear biases are made non-zero: with the zero init, the phenotype projection is
    linear and the final L2 normalisation would hide any per-patient rescaling bug in the pooling."""
    torch.manual_seed(seed)
    model = model_class(tiny_config(**config_overrides))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.1)
    return model.train(train)


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    targets = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def assert_finite_grads(model) -> None:
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads, "no parameter received a gradient"
    bad = [name for name, grad in grads.items() if not torch.isfinite(grad).all()]
    assert not bad, f"non-finite gradients in {bad}"


# ----- outputs and the loss -----


def test_output_shapes_and_unit_norm_embeddings():
    model = build()
    batch = make_batch(model.config, lesions_per_patient=(1, 4, 2))  # N = 7, P = 3
    out = model(**batch, return_loss=True)
    assert out.logits_per_image.shape == (7, 7)
    assert out.logits_per_phenotype.shape == (3, 3)
    for name, rows in [("image_embeds", 7), ("lesion_metadata_embeds", 7), ("phenotype_embeds", 3), ("patient_metadata_embeds", 3)]:
        embeds = getattr(out, name)
        assert embeds.shape == (rows, 12), name
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(rows), msg=name)
    assert out.vision_model_output.last_hidden_state.shape == (7, (IMAGE_SIZE // 6) ** 2 + 1, 32)
    assert out.loss.shape == () and out.image_ssl_loss is None


def test_feature_getters_are_the_unnormalised_embeddings():
    model = build()
    batch = make_batch(model.config)
    out = model(**batch)
    assert out.loss is None and out.lesion_loss is None
    image = model.get_image_features(batch["pixel_values"]).pooler_output
    lesion = model.get_lesion_metadata_features(batch["lesion_numerical_values"], batch["lesion_categorical_ids"]).pooler_output
    patient = model.get_patient_metadata_features(batch["patient_numerical_values"],
                                                  batch["patient_categorical_ids"]).pooler_output
    phenotype = model.get_phenotype_features(batch["pixel_values"], batch["lesion_numerical_values"],
                                             batch["lesion_categorical_ids"], batch["patient_index"],
                                             num_patients=3).pooler_output
    assert not torch.allclose(image.norm(dim=-1), torch.ones(len(image)))  # not normalised
    for features, embeds in [(image, out.image_embeds), (lesion, out.lesion_metadata_embeds),
                             (patient, out.patient_metadata_embeds), (phenotype, out.phenotype_embeds)]:
        torch.testing.assert_close(F.normalize(features, dim=-1), embeds)


@pytest.mark.parametrize("lesion_loss_weight", [0.25, 1.0])
def test_loss_is_weighted_sum_of_recomputed_symmetric_cross_entropies(lesion_loss_weight):
    model = build(lesion_loss_weight=lesion_loss_weight)
    with torch.no_grad():
        model.lesion_logit_scale.fill_(2.0)
        model.patient_logit_scale.fill_(1.0)
    out = model(**make_batch(model.config, lesions_per_patient=(3, 1, 2, 2)), return_loss=True)
    torch.testing.assert_close(out.logits_per_image, math.exp(2.0) * out.image_embeds @ out.lesion_metadata_embeds.t())
    torch.testing.assert_close(out.logits_per_phenotype, math.exp(1.0) * out.phenotype_embeds @ out.patient_metadata_embeds.t())
    lesion_loss, patient_loss = clip_loss(out.logits_per_image), clip_loss(out.logits_per_phenotype)
    torch.testing.assert_close(out.lesion_loss, lesion_loss)
    torch.testing.assert_close(out.patient_loss, patient_loss)
    torch.testing.assert_close(out.loss, lesion_loss_weight * lesion_loss + (1 - lesion_loss_weight) * patient_loss)
    assert out.patient_loss > 0


def test_logit_scale_is_clamped_at_max():
    model = build()
    with torch.no_grad():
        model.lesion_logit_scale.fill_(10.0)
    out = model(**make_batch(model.config))
    torch.testing.assert_close(out.logits_per_image, 100.0 * out.image_embeds @ out.lesion_metadata_embeds.t())
    torch.testing.assert_close(model.lesion_logit_scale.detach(), torch.tensor(10.0))


def test_image_ssl_term_with_second_view():
    model = build(image_ssl_weight=0.4, lesion_loss_weight=0.7)
    batch = make_batch(model.config)
    torch.manual_seed(1)
    second_view = batch["pixel_values"] + 0.1 * torch.randn_like(batch["pixel_values"])
    out = model(**batch, ssl_pixel_values=second_view, return_loss=True)
    assert out.image_ssl_loss is not None and out.image_ssl_loss > 0
    nested = 0.7 * out.lesion_loss + 0.3 * out.patient_loss
    torch.testing.assert_close(out.loss, 0.6 * nested + 0.4 * out.image_ssl_loss)


# ----- patient aggregation -----


@pytest.mark.parametrize("aggregation", ["mean", "attention"])
def test_phenotype_depends_only_on_own_patient(aggregation):
    model = build(patient_aggregation=aggregation)
    batch = make_batch(model.config, lesions_per_patient=(1, 4, 2))
    changed = dict(batch)
    other = batch["patient_index"] == 1  # the patient with 4 lesions
    torch.manual_seed(3)
    changed["pixel_values"] = torch.where(other[:, None, None, None], torch.randn_like(batch["pixel_values"]), batch["pixel_values"])
    before, after = model(**batch).phenotype_embeds, model(**changed).phenotype_embeds
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=0, atol=1e-6)
    assert not torch.allclose(after[1], before[1], atol=1e-4)


def test_mean_aggregation_equals_per_patient_loop():
    model = build(patient_aggregation="mean")
    batch = make_batch(model.config, lesions_per_patient=(1, 5, 2, 1))
    out = model(**batch)
    lesions = torch.cat([out.image_embeds, out.lesion_metadata_embeds], dim=-1)  # (N, 2D)
    expected = torch.stack([
        model.phenotype_projection(lesions[batch["patient_index"] == p].mean(dim=0)) for p in range(4)
    ])
    torch.testing.assert_close(out.phenotype_embeds, F.normalize(expected, dim=-1))


def test_attention_aggregation_equals_per_patient_softmax_loop():
    model = build(patient_aggregation="attention")
    with torch.no_grad():  # make the attention weights far from uniform
        torch.nn.init.normal_(model.patient_pooling.attention_v.weight, std=1.0)
        torch.nn.init.normal_(model.patient_pooling.attention_w.weight, std=100.0)
    batch = make_batch(model.config, lesions_per_patient=(1, 5, 3))
    out = model(**batch)
    lesions = torch.cat([out.image_embeds, out.lesion_metadata_embeds], dim=-1)
    pooling = model.patient_pooling
    expected, weights = [], []
    for p in range(3):
        rows = lesions[batch["patient_index"] == p]
        gate = torch.tanh(pooling.attention_v(rows)) * torch.sigmoid(pooling.attention_u(rows))
        w = torch.softmax(pooling.attention_w(gate).squeeze(-1), dim=0)
        weights.append(w)
        expected.append(model.phenotype_projection((w[:, None] * rows).sum(dim=0)))
    torch.testing.assert_close(out.phenotype_embeds, F.normalize(torch.stack(expected), dim=-1))
    assert weights[1].max() - weights[1].min() > 0.2  # really not a plain mean


@pytest.mark.parametrize("aggregation", ["mean", "attention"])
def test_lesion_order_permutation_invariance(aggregation):
    model = build(patient_aggregation=aggregation)
    batch = make_batch(model.config, lesions_per_patient=(2, 4, 1))
    torch.manual_seed(5)
    order = torch.randperm(7)
    permuted = dict(batch)
    for key in ("pixel_values", "lesion_numerical_values", "lesion_categorical_ids", "patient_index"):
        permuted[key] = batch[key][order]
    out, out_permuted = model(**batch, return_loss=True), model(**permuted, return_loss=True)
    torch.testing.assert_close(out_permuted.phenotype_embeds, out.phenotype_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_permuted.image_embeds, out.image_embeds[order], rtol=0, atol=1e-6)
    torch.testing.assert_close(out_permuted.loss, out.loss)


def test_without_patient_index_every_lesion_is_its_own_patient():
    model = build()
    batch = make_batch(model.config, lesions_per_patient=(1, 1, 1, 1))
    out = model(pixel_values=batch["pixel_values"], lesion_numerical_values=batch["lesion_numerical_values"],
                lesion_categorical_ids=batch["lesion_categorical_ids"], return_loss=True)
    assert out.phenotype_embeds.shape == (4, 12) and out.logits_per_phenotype.shape == (4, 4)
    assert torch.isfinite(out.loss)


def test_patient_index_of_wrong_shape_raises():
    model = build()
    batch = make_batch(model.config)
    batch["patient_index"] = batch["patient_index"][:-1]
    with pytest.raises(ValueError, match="patient_index"):
        model(**batch)


# ----- missing and malformed metadata -----


def test_all_missing_metadata_gives_finite_outputs_and_gradients():
    model = build(train=True)
    batch = make_batch(model.config)
    batch["lesion_numerical_values"].fill_(float("nan"))
    batch["patient_numerical_values"].fill_(float("nan"))
    batch["lesion_categorical_ids"].zero_()
    batch["patient_categorical_ids"].zero_()
    out = model(**batch, return_loss=True)
    assert torch.isfinite(out.loss) and torch.isfinite(out.phenotype_embeds).all()
    out.loss.backward()
    assert_finite_grads(model)
    # Omitting metadata inputs means the same thing as passing all-missing ones.
    model.eval()
    explicit = model(**batch)
    omitted = model(pixel_values=batch["pixel_values"], patient_index=batch["patient_index"])
    torch.testing.assert_close(omitted.lesion_metadata_embeds, explicit.lesion_metadata_embeds)
    torch.testing.assert_close(omitted.patient_metadata_embeds, explicit.patient_metadata_embeds)


def test_nan_inf_unknown_and_out_of_range_values_are_missing_and_finite():
    model = build(train=False)
    batch = make_batch(model.config, lesions_per_patient=(2, 2))
    clean = dict(batch)
    clean["lesion_numerical_values"] = batch["lesion_numerical_values"].clone()
    clean["lesion_numerical_values"][0, 0] = float("nan")
    clean["lesion_numerical_values"][1, 1] = float("nan")
    clean["lesion_categorical_ids"] = batch["lesion_categorical_ids"].clone()
    clean["lesion_categorical_ids"][2:, 0] = 0
    mean, std = model.config.lesion_metadata_config.numerical_mean[2], model.config.lesion_metadata_config.numerical_std[2]
    clean["lesion_numerical_values"][2, 2] = mean + MAX_ABS_ZSCORE * std  # the clamp of an absurd value
    dirty = dict(clean)
    dirty["lesion_numerical_values"] = clean["lesion_numerical_values"].clone()
    dirty["lesion_numerical_values"][0, 0] = float("inf")
    dirty["lesion_numerical_values"][1, 1] = float("-inf")
    dirty["lesion_categorical_ids"] = clean["lesion_categorical_ids"].clone()
    dirty["lesion_categorical_ids"][2, 0] = 99  # beyond the vocabulary
    dirty["lesion_categorical_ids"][3, 0] = -4
    dirty["lesion_numerical_values"][2, 2] = 1e30  # absurd but present: clamped, finite
    out = model(**dirty, return_loss=True)
    assert torch.isfinite(out.loss) and torch.isfinite(out.lesion_metadata_embeds).all()
    reference = model(**clean).lesion_metadata_embeds
    torch.testing.assert_close(out.lesion_metadata_embeds[:2], reference[:2])  # ±inf == NaN == missing
    torch.testing.assert_close(out.lesion_metadata_embeds[2:], reference[2:])  # ids 99, -4 == id 0; 1e30 clamped
    model.train()
    out = model(**dirty, return_loss=True)
    out.loss.backward()
    assert_finite_grads(model)


def test_feature_dropout_acts_in_train_mode_only():
    model = build(feature_dropout=0.5)
    batch = make_batch(model.config, lesions_per_patient=(6, 6, 4))
    inputs = (batch["lesion_numerical_values"], batch["lesion_categorical_ids"])
    model.train()
    torch.manual_seed(0)

    def features():
        return model.get_lesion_metadata_features(*inputs).pooler_output

    first, second = features(), features()
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(features(), features(), rtol=0, atol=0)
    torch.manual_seed(0)
    model.train()
    torch.testing.assert_close(features(), first)  # seeded: reproducible


def test_single_patient_batch_has_zero_patient_loss_and_finite_loss():
    model = build(train=True, lesion_loss_weight=0.5)
    batch = make_batch(model.config, lesions_per_patient=(5,))
    out = model(**batch, return_loss=True)
    assert out.logits_per_phenotype.shape == (1, 1)
    assert out.patient_loss.item() == 0.0
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, 0.5 * out.lesion_loss)
    out.loss.backward()
    assert_finite_grads(model)


@pytest.mark.parametrize(
    "features",
    [dict(categorical_features={"sex": ["female", "male"]}), dict(numerical_features=["age_approx"]), dict()],
    ids=["categorical-only", "numerical-only", "no-features"],
)
def test_patient_tower_with_one_kind_of_feature_or_none(features):
    patient = SLIMPMetadataConfig(hidden_size=8, num_attention_heads=2, **features)
    model = build(train=True, patient_metadata_config=patient)
    out = model(**make_batch(model.config), return_loss=True)
    assert out.patient_metadata_embeds.shape == (3, 12) and torch.isfinite(out.loss)
    out.loss.backward()
    assert_finite_grads(model)


# ----- image towers -----

VISION_CONFIGS = {
    "vit": lambda: tiny_vision_config(),
    "dinov2": lambda: Dinov2Config(image_size=IMAGE_SIZE, patch_size=6, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, mlp_ratio=1),
    "resnet": lambda: ResNetConfig(embedding_size=8, hidden_sizes=[8, 20], depths=[1, 1], layer_type="basic"),
    "convnext": lambda: ConvNextConfig(hidden_sizes=[8, 20], depths=[1, 1], num_stages=2, patch_size=2),
}


def loss_and_unused_parameters(model: SLIMPModel, batch: dict) -> tuple[torch.Tensor, list[str]]:
    """Backward of the training loss; names of trainable parameters that got no gradient (DDP would fail)."""
    model.zero_grad()
    out = model(**batch, return_loss=True)
    out.loss.backward()
    return out.loss.detach(), [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("kind", sorted(VISION_CONFIGS))
def test_image_towers_forward_backward_and_reload(kind, tmp_path):
    torch.manual_seed(0)
    model = SLIMPModel(tiny_config(vision_config=VISION_CONFIGS[kind]())).train()
    batch = make_batch(model.config, lesions_per_patient=(1, 3, 2))
    out = model(**batch, return_loss=True)
    assert out.image_embeds.shape == (6, 12) and out.logits_per_image.shape == (6, 6)
    loss, unused = loss_and_unused_parameters(model, batch)
    assert torch.isfinite(loss)
    assert not unused, f"parameters outside the graph: {unused}"
    vision_grads = [p.grad for p in model.vision_model.parameters() if p.grad is not None]
    assert vision_grads and all(torch.isfinite(g).all() for g in vision_grads)
    assert any(g.abs().sum() > 0 for g in vision_grads)

    model.save_pretrained(tmp_path)  # a reloaded model holds the same weights (and BatchNorm statistics) ...
    reloaded = SLIMPModel.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_image_features(batch["pixel_values"]).pooler_output,
                                   model.get_image_features(batch["pixel_values"]).pooler_output, rtol=0, atol=1e-6)
    _, unused = loss_and_unused_parameters(reloaded.train(), batch)  # ... and still trains cleanly
    assert not unused, f"parameters outside the graph after from_pretrained: {unused}"


@pytest.mark.parametrize("backbone", ["vit", "dinov2"])
def test_from_vision_pretrained_copies_vision_weights(tmp_path, backbone):
    torch.manual_seed(7)
    if backbone == "vit":
        vision = ViTModel(tiny_vision_config(hidden_size=40, num_attention_heads=5))
    else:
        vision = Dinov2Model(VISION_CONFIGS["dinov2"]())
    vision.save_pretrained(tmp_path)
    model = SLIMPModel.from_vision_pretrained(str(tmp_path), config=tiny_config())
    assert model.config.vision_config.model_type == backbone
    loaded = model.vision_model.state_dict()
    expected = {k: v for k, v in vision.state_dict().items() if not k.startswith("pooler.")}  # SLIMP drops the pooler
    assert set(expected) <= set(loaded)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert model.visual_projection.in_features == vision.config.hidden_size
    out = model(**make_batch(model.config), return_loss=True)
    assert torch.isfinite(out.loss)


# ----- classification -----


@pytest.mark.parametrize("features", ["image", "image+lesion", "image+lesion+patient"])
def test_classifier_features_with_and_without_metadata(features):
    model = build(SLIMPForLesionClassification, classifier_features=features, classifier_representation="projection")
    batch = make_batch(model.config, lesions_per_patient=(2, 3))
    labels = torch.tensor([0, 1, 2, 1, 0])
    assert model.classifier.in_features == 12 * len(features.split("+"))
    with_metadata = model(**batch, labels=labels)
    image_only = model(pixel_values=batch["pixel_values"], labels=labels)
    for out in (with_metadata, image_only):
        assert out.logits.shape == (5, 3)
        torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    metadata_matters = not torch.allclose(with_metadata.logits, image_only.logits)
    assert metadata_matters == (features != "image")


def test_patient_features_reach_each_lesion_of_the_patient():
    model = build(SLIMPForLesionClassification, classifier_features="image+lesion+patient")
    batch = make_batch(model.config, lesions_per_patient=(2, 3))
    changed = dict(batch)
    changed["patient_numerical_values"] = batch["patient_numerical_values"].clone()
    changed["patient_numerical_values"][1] = torch.tensor([20.0, 90.0])
    delta = (model(**changed).logits - model(**batch).logits).abs().sum(dim=-1)
    moved = batch["patient_index"] == 1
    assert (delta[moved] > 1e-6).all() and (delta[~moved] == 0).all()


def test_class_weights_weight_the_loss():
    weights = [1.0, 4.0, 0.5]
    weighted = build(SLIMPForLesionClassification, class_weights=weights)
    plain = build(SLIMPForLesionClassification)
    batch = make_batch(weighted.config)
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    out, out_plain = weighted(**batch, labels=labels), plain(**batch, labels=labels)
    torch.testing.assert_close(out.logits, out_plain.logits)  # same seed, same weights
    # Weighted sum over the lesions / their number (not / the weight sum): the normaliser does not depend on
    # the batch's labels, so accumulated batches add up to the large batch (see test_gradient_accumulation...).
    per_lesion = F.cross_entropy(out.logits, labels, reduction="none") * torch.tensor(weights)[labels]
    torch.testing.assert_close(out.loss, per_lesion.sum() / len(labels))
    assert not torch.allclose(out.loss, out_plain.loss)


def test_image_only_path_is_affine_in_the_image_feature():
    model = build(SLIMPForLesionClassification, classifier_features="image+lesion+patient",
                  classifier_representation="projection")
    torch.manual_seed(2)
    pixels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    image_weight = model.classifier.weight[:, :12]  # the columns reading the image feature
    offsets = []
    for chunk in (pixels[:1], pixels[1:]):  # batch size must not matter either
        features = model.slimp.get_image_features(chunk).pooler_output  # (n, D)
        logits = model(pixel_values=chunk).logits
        offsets.append(logits - features @ image_weight.t())  # = c for every image if logits = A·f + c
    offsets = torch.cat(offsets)
    torch.testing.assert_close(offsets, offsets[:1].expand_as(offsets), rtol=0, atol=1e-5)


# ----- training conveniences -----


def count_calls(module, name: str, calls: list) -> None:
    """Record each run of module.forward (forward hooks do not fire when checkpointing recomputes)."""
    forward = module.forward

    def counted(*args, **kwargs):
        calls.append(name)
        return forward(*args, **kwargs)

    module.forward = counted


def test_gradient_checkpointing_gives_same_loss_and_grads():
    def run(checkpointing: bool):
        model = build(train=True, feature_dropout=0.0, patient_aggregation="attention")
        calls = []
        count_calls(model.vision_model.layers[0].mlp, "vision", calls)
        count_calls(model.lesion_metadata_model.layers[0].mlp, "lesion", calls)
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(**make_batch(model.config), return_loss=True)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls

    loss, grads, calls = run(False)
    loss_ckpt, grads_ckpt, calls_ckpt = run(True)
    assert sorted(calls) == ["lesion", "vision"]
    assert sorted(calls_ckpt) == ["lesion", "lesion", "vision", "vision"]  # recomputed in backward
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bfloat16_forward_on_cpu():
    model = build(patient_aggregation="attention").to(torch.bfloat16)
    out = model(**make_batch(model.config), return_loss=True)
    assert out.image_embeds.dtype == torch.bfloat16
    for name in ("loss", "lesion_loss", "patient_loss", "logits_per_image", "phenotype_embeds", "patient_metadata_embeds"):
        assert torch.isfinite(getattr(out, name).float()).all(), name
    classifier = build(SLIMPForLesionClassification).to(torch.bfloat16)
    logits = classifier(pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_an_inference_forward_never_runs_the_loss(monkeypatch):
    """Embeddings and logits without `return_loss=True` do not touch the nested loss (as CLIP's forward)."""
    from modeling_slimp import modeling_slimp as modeling

    def forbidden(*args, **kwargs):
        raise AssertionError("the loss ran during inference")

    model = SLIMPModel(tiny_config()).eval()
    batch = make_batch(model.config)
    monkeypatch.setattr(modeling, "nested_contrastive_loss", forbidden)
    with torch.no_grad():
        out = model(**batch)
    assert out.loss is None and out.logits_per_image is not None and out.logits_per_phenotype is not None
    with pytest.raises(AssertionError, match="the loss ran"):
        model(**batch, return_loss=True)
