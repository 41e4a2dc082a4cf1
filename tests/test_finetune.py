"""training/finetune.py on a tiny synthetic dataset: each mode trains exactly the intended parameters,
scores validation and test, and saves a folder that reloads to the same logits; linear mode is the probe."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForImageClassification, Dinov2Config, pipeline

from _synthetic_fixtures import TRAIN_FAST, synthetic  # noqa: F401
from conftest import tiny_config
from modeling_slimp import SLIMPConfig, SLIMPForLesionClassification, SLIMPModel, SLIMPProcessor
from training import finetune
from training.data.collate import BatchTransform, DecodingCollator
from training.data.dataset import load_slimp_dataset
from training.embeddings import embed_split
from training.metrics import classification_metrics
from training.probe import fit_probe, probe_inputs

RUNS = {"linear": ["--mode", "linear"], "full": ["--mode", "full"], "lora": ["--mode", "lora"],
        "lora-merged": ["--mode", "lora", "--merge"], "full-projection": ["--mode", "full", "--representation", "projection"]}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, synthetic, tmp_path_factory):  # noqa: F811
    """One 3-step fine-tuning run per mode (validation every 2 steps) and its parsed model arguments."""
    output_dir = tmp_path_factory.mktemp(request.param) / "classifier"
    argv = ["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir, "--output_dir", str(output_dir),
            "--max_steps", "3", "--eval_strategy", "steps", "--eval_steps", "2", "--learning_rate", "0.01", "--seed", "3",
            *TRAIN_FAST, *RUNS[request.param]]
    result = finetune.main(argv)
    _, model_args, _ = finetune.parse_args(argv)
    return {"name": request.param, "output_dir": output_dir, "result": result, "model_args": model_args}


def initial_classifier(synthetic, model_args) -> SLIMPForLesionClassification:  # noqa: F811
    """The classifier as `main` builds it before training (same seed, so the same head init)."""
    _, schema = load_slimp_dataset(synthetic.dataset_dir, "train")
    torch.manual_seed(3)
    return finetune.load_classifier(model_args, schema["label"]["names"], None)


def lesion_batch(synthetic, folder: Path) -> dict:  # noqa: F811
    """20 lesions of the test split (several patients), through the saved folder's processor."""
    test, _ = load_slimp_dataset(synthetic.dataset_dir, "test")
    processor = SLIMPProcessor.from_pretrained(folder)
    batch = BatchTransform(processor)(DecodingCollator(processor, train=False)([test[i] for i in range(0, 40, 2)]))
    batch.pop("labels")
    return dict(batch)


def changed_parameters(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_only_the_intended_parameters_change(run, synthetic):  # noqa: F811
    before = {k: v.detach() for k, v in initial_classifier(synthetic, run["model_args"]).named_parameters()}
    model = run["result"]["model"]
    head = {"classifier.weight", "classifier.bias"}
    towers = ("slimp.vision_model.", "slimp.lesion_metadata_model.", "slimp.patient_metadata_model.")

    if run["name"] == "lora":
        after = {k: v.detach() for k, v in model.named_parameters()}
        lora = {k for k in after if ".lora_" in k}
        saved_head = {k for k in after if ".modules_to_save." in k}
        base = {k.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", "."): after[k]
                for k in after if k not in lora | saved_head}
        assert changed_parameters(before, base) == set(), "base weights and the original head must stay as they were"
        assert {k.replace(".modules_to_save.default.", ".").removeprefix("base_model.model.") for k in saved_head} == head
        for k in saved_head:
            initial = before[k.replace(".modules_to_save.default.", ".").removeprefix("base_model.model.")]
            assert not torch.equal(after[k], initial), "the trained head must differ from its init"
        adapted = {k.split(".lora_")[0] for k in lora}
        assert adapted and all(name.endswith(("q_proj", "v_proj")) for name in adapted), adapted
        for tower in towers:  # every tower's adapters moved off their zero init
            assert any(tower in k and ".lora_B." in k and after[k].abs().sum() > 0 for k in lora), tower
        return

    after = {k: v.detach() for k, v in model.named_parameters()}
    changed = changed_parameters(before, after)
    if run["name"] == "linear":
        assert changed == head
    elif run["name"] == "lora-merged":  # merged deltas land in q_proj/v_proj of every tower only
        assert head <= changed
        assert all(k in head or k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed - head
        for tower in towers:
            assert any(k.startswith(tower) for k in changed), tower
    else:  # full: everything the classifier uses, and nothing it does not
        unused = {"slimp.lesion_logit_scale", "slimp.patient_logit_scale", "slimp.phenotype_projection.weight",
                  "slimp.phenotype_projection.bias"}
        if model.config.classifier_representation == "tower":  # the head reads the towers: projections unused
            unused |= {f"slimp.{p}_projection.{w}" for p in ("visual", "lesion_metadata", "patient_metadata") for w in ("weight", "bias")}
        assert changed == set(after) - unused, (set(after) - unused - changed, changed & unused)
        # Frozen, not merely without gradient: DDP rejects trainable parameters that get none.
        assert {k for k, p in model.named_parameters() if p.requires_grad} == set(after) - unused


def test_results_hold_finite_metrics_for_validation_and_test(run):
    results = json.loads((run["output_dir"] / "results.json").read_text())
    for split in ("validation", "test"):
        metrics = results["classification"][split]
        assert set(metrics) == {"auroc", "pauc_80tpr", "balanced_accuracy", "top15_sensitivity"}
        assert all(math.isfinite(v) for v in metrics.values()), (split, metrics)
        assert 0 <= metrics["pauc_80tpr"] <= 0.2 + 1e-9 and 0 <= metrics["auroc"] <= 1
        assert 0 <= metrics["top15_sensitivity"] <= 1
    assert results["classification"] == run["result"]["classification"]
    card = (run["output_dir"] / "README.md").read_text()
    assert "test AUROC" in card and f"value: {round(results['classification']['test']['auroc'], 4)}" in card
    assert "pipeline_tag: image-classification" in card
    if run["name"] != "linear":  # Trainer evaluated the validation split during training
        assert any("eval_auroc" in entry for entry in results["history"])


def test_the_images_only_use_is_scored_in_the_card_as_pipeline_scores_it(synthetic, tmp_path):  # noqa: F811
    """A head fitted on metadata + context gets images only from pipeline() and the widget: results.json and the
    card score exactly that use (the pipeline's own probabilities on the test split). The warnings it gives are
    counted in tests/test_warnings.py (in fresh processes: the model warns once per process)."""
    import numpy as np

    from training.release import IMAGES_ONLY_SPLIT

    output_dir = tmp_path / "classifier"
    result = finetune.main(["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir,
                            "--output_dir", str(output_dir), "--mode", "linear", *TRAIN_FAST])
    scores = json.loads((output_dir / "results.json").read_text())["classification"]
    assert result["model"].config.classifier_features == "image+lesion+patient+context"
    assert set(scores) == {"validation", "test", IMAGES_ONLY_SPLIT}
    test, _ = load_slimp_dataset(synthetic.dataset_dir, "test")
    classify = pipeline("image-classification", model=str(output_dir), trust_remote_code=True)
    malignant = [next(x["score"] for x in classify(row["image"], top_k=None) if x["label"] == "malignant") for row in test]
    labels = np.asarray(test["label"])
    from sklearn.metrics import roc_auc_score
    assert scores[IMAGES_ONLY_SPLIT]["auroc"] == pytest.approx(roc_auc_score(labels, malignant), abs=1e-6)
    assert scores[IMAGES_ONLY_SPLIT]["auroc"] != pytest.approx(scores["test"]["auroc"], abs=1e-6)  # a different use
    card = (output_dir / "README.md").read_text()
    assert f"| {IMAGES_ONLY_SPLIT} | {scores[IMAGES_ONLY_SPLIT]['auroc']:.3f} |" in card and "**Images only.**" in card


def test_an_image_only_classifier_has_no_images_only_row(synthetic, tmp_path):  # noqa: F811
    output_dir = tmp_path / "image-only"
    finetune.main(["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir, "--output_dir",
                   str(output_dir), "--mode", "linear", "--classifier_features", "image", *TRAIN_FAST])
    scores = json.loads((output_dir / "results.json").read_text())["classification"]
    assert set(scores) == {"validation", "test"}   # its test row already is the pipeline's use
    assert "**Images only.**" not in (output_dir / "README.md").read_text()


def test_checkpoints_stay_beside_the_release_folder(run):
    folder = run["output_dir"]
    assert not list(folder.glob("checkpoint-*")) and not (folder / "checkpoints").exists()
    assert not list(folder.rglob("events.out.tfevents.*")) and not list(folder.rglob("*.pt"))


def test_saved_folder_reloads_to_the_same_logits(run, synthetic):  # noqa: F811
    folder, model = run["output_dir"], run["result"]["model"]
    batch = lesion_batch(synthetic, folder)
    if run["name"] == "lora":
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
        config = SLIMPConfig.from_pretrained(folder)
        base = SLIMPForLesionClassification.from_pretrained(synthetic.checkpoint_dir, config=config)
        reloaded = PeftModel.from_pretrained(base, folder).eval()
        card = (folder / "README.md").read_text()
        assert "PeftModel.from_pretrained" in card and "library_name: peft" in card
    else:
        reloaded, info = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True,
                                                                         output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert not any("lora" in name for name, _ in reloaded.named_parameters())
        reloaded.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)
        image_only = model(pixel_values=batch["pixel_values"]).logits
    assert not torch.allclose(expected, image_only, atol=1e-4), "metadata must reach the head"
    if run["name"] == "lora-merged":  # the pipeline is the image-only path of the same classifier
        test, _ = load_slimp_dataset(synthetic.dataset_dir, "test")
        top = pipeline("image-classification", model=str(folder), trust_remote_code=True)(test[0]["image"])[0]
        probabilities = torch.softmax(image_only[0], dim=-1)
        assert top["label"] == model.config.id2label[int(probabilities.argmax())]
        assert top["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_linear_mode_is_the_probe_on_the_same_frozen_features(synthetic):  # noqa: F811
    """--mode linear fits evaluate.py's probe on the classifier's own frozen inputs: its test scores rank
    lesions as a probe fitted on those features does, and its AUROC is within 0.01 of evaluate.py's probe on
    the embeddings of the same checkpoint (the image+metadata+context feature set, tower representation)."""
    from training.embeddings import predict_split

    model_dir = Path(synthetic.classifier_dir)
    classifier = AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = SLIMPProcessor.from_pretrained(model_dir)
    collator = DecodingCollator(processor, train=False)
    train, _ = load_slimp_dataset(synthetic.dataset_dir, "train")
    test, _ = load_slimp_dataset(synthetic.dataset_dir, "test")
    logits, labels, extras = predict_split(classifier, test, collator, return_features=True)
    _, train_labels, train_extras = predict_split(classifier, train, collator, return_features=True)
    inputs = lambda e: np.concatenate([e[p] for p in classifier.parts], axis=1)  # noqa: E731
    probe = fit_probe(inputs(train_extras), train_labels, seed=0, class_weight=dict(enumerate(classifier.config.class_weights)))
    scores = probe.predict_proba(inputs(extras))[:, 1]
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], np.log(scores / (1 - scores)), rtol=1e-4, atol=1e-4)
    head_auroc = classification_metrics(labels, logits)["auroc"]
    encoder = SLIMPModel.from_pretrained(synthetic.checkpoint_dir).eval()
    features = {name: embed_split(encoder, split, DecodingCollator(SLIMPProcessor.from_pretrained(synthetic.checkpoint_dir), train=False))
                for name, split in (("train", train), ("test", test))}
    reference = fit_probe(probe_inputs(features["train"], "image+metadata+context", "tower"), features["train"]["labels"])
    reference_auroc = roc_auc_score(features["test"]["labels"],
                                    reference.predict_proba(probe_inputs(features["test"], "image+metadata+context", "tower"))[:, 1])
    assert head_auroc == pytest.approx(reference_auroc, abs=0.01)


def test_the_best_validation_weights_are_restored_at_the_end(synthetic, tmp_path, monkeypatch):  # noqa: F811
    """Validation AUROC 0.9 at step 1, then worse: Trainer's load_best_model_at_end keeps the model of step 1."""
    scripted, snapshots = iter([0.9, 0.5, 0.3]), []

    def scripted_evaluation(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        snapshots.append(self.accelerator.unwrap_model(self.model).classifier.weight.detach().clone())
        metrics = {f"{metric_key_prefix}_auroc": next(scripted, 0.1)}
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    monkeypatch.setattr(finetune.SLIMPTrainer, "evaluate", scripted_evaluation)
    out = tmp_path / "best"
    result = finetune.main(["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir, "--output_dir",
                            str(out), "--mode", "full", "--max_steps", "3", "--eval_strategy", "steps", "--eval_steps", "1",
                            "--learning_rate", "0.01", *TRAIN_FAST, "--save_strategy", "steps", "--save_steps", "1",
                            "--load_best_model_at_end", "true", "--warmup_steps", "0"])
    assert not torch.equal(snapshots[2], snapshots[0]), "training went on after step 1"
    torch.testing.assert_close(result["model"].classifier.weight, snapshots[0], rtol=0, atol=0)
    checkpoints = sorted(p.name for p in out.with_name("best-checkpoints").iterdir())
    assert "checkpoint-1" in checkpoints and all((out.with_name("best-checkpoints") / c / "manifest.json").is_file()
                                                for c in checkpoints)


def test_auto_class_weights_are_inverse_train_frequencies(run, synthetic):  # noqa: F811
    train, _ = load_slimp_dataset(synthetic.dataset_dir, "train")
    counts = Counter(train["label"])
    assert len(counts) == 2 and counts[1] < counts[0]
    expected = [len(train) / (2 * counts[c]) for c in (0, 1)]
    saved = SLIMPConfig.from_pretrained(run["output_dir"]).class_weights
    assert saved == pytest.approx(expected) and run["result"]["class_weights"] == pytest.approx(expected)


def test_inverse_frequency_weights_and_explicit_weights():
    assert finetune.inverse_frequency_weights([0, 0, 0, 1], 2) == pytest.approx([4 / 6, 4 / 2])
    # An absent class counts as one lesion.
    assert finetune.inverse_frequency_weights([0, 0, 2, 2], 3) == pytest.approx([4 / 6, 4 / 3, 4 / 6])
    assert finetune.resolve_class_weights("1,3.5", [0, 1], 2) == [1.0, 3.5]
    assert finetune.resolve_class_weights("none", [0, 1], 2) is None
    with pytest.raises(ValueError, match="2 classes"):
        finetune.resolve_class_weights("1,2,3", [0, 1], 2)


def test_lora_targets_only_the_attention_projections_of_the_towers_in_use(synthetic):  # noqa: F811
    args = finetune.ModelArguments(model_dir=synthetic.checkpoint_dir, mode="lora", classifier_features="image")
    model = finetune.prepare_for_mode(finetune.load_classifier(args, ["benign", "malignant"], None), args)
    adapted = {name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for name, _ in model.named_modules() if name.endswith(".lora_A")}
    layers = model.base_model.model.config.vision_config.num_hidden_layers
    assert adapted == {f"slimp.vision_model.layers.{i}.attention.{p}" for i in range(layers) for p in ("q_proj", "v_proj")}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name or ".modules_to_save." in name for name in trainable), trainable


def test_lora_reaches_the_dinov2_attention_projections_too():
    vision = Dinov2Config(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          mlp_ratio=2)
    args = finetune.ModelArguments(model_dir="unused", mode="lora")
    model = finetune.prepare_for_mode(SLIMPForLesionClassification(tiny_config(vision_config=vision)), args)
    adapted = {name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for name, _ in model.named_modules() if name.endswith(".lora_A")}
    vision_adapted = {name for name in adapted if name.startswith("slimp.vision_model.")}
    assert vision_adapted == {f"slimp.vision_model.encoder.layer.{i}.attention.{p}"
                              for i in range(2) for p in ("q_proj", "v_proj")}
    assert any(name.startswith("slimp.lesion_metadata_model.") for name in adapted)
    assert any(name.startswith("slimp.patient_metadata_model.") for name in adapted)


def test_classification_metrics_binary_and_multiclass():
    labels = np.array([0, 0, 1, 1, 0, 1])
    logits = np.array([[2.0, 0.0], [0.5, 0.4], [0.0, 1.0], [1.0, 0.2], [0.0, 3.0], [0.0, 2.0]])
    scores = classification_metrics(labels, logits)
    assert scores["auroc"] == pytest.approx(roc_auc_score(labels, logits[:, 1] - logits[:, 0]))
    assert scores["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert 0 <= scores["pauc_80tpr"] <= 0.2
    three = classification_metrics(np.array([0, 1, 2, 1, 0, 2]), np.eye(3)[[0, 1, 2, 0, 0, 2]] * 3)
    assert all(math.isfinite(v) for v in three.values()) and three["balanced_accuracy"] == pytest.approx(5 / 6)


def test_a_checkpoint_missing_more_than_the_head_is_refused(synthetic, tmp_path):  # noqa: F811
    broken = tmp_path / "broken"
    shutil.copytree(synthetic.checkpoint_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights.pop("visual_projection.weight")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="visual_projection.weight"):
        finetune.load_classifier(finetune.ModelArguments(model_dir=str(broken)), ["benign", "malignant"], None)


def test_arguments_are_checked_before_any_data_is_read(tmp_path):
    base = ["--model_dir", "m", "--dataset_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")]
    for extra, message in ((["--mode", "sgd"], "--mode"), (["--merge", "true"], "--merge"),
                           (["--classifier_features", "image+patient"], "--classifier_features"),
                           (["--push_to_hub", "true"], "--hub_model_id"),
                           (["--checkpoint_dir", str(tmp_path / "out" / "ckpt")], "inside --output_dir")):
        with pytest.raises(finetune.ArgumentError, match=message):
            finetune.parse_args(base + extra)
