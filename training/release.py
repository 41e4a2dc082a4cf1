"""What a finished run leaves behind: the linear probe beside an untrained model, and the release folder
(the Hub repo): weights, code, processor, a model card (README.md rendered from MODEL_CARD.md with the
measured results) and results.json.

Nothing patient-level goes into the folder: the card and `results.json` hold aggregate metrics, the
dataset's name and split sizes, and the training arguments with local paths reduced to their last part.
Checkpoints, logs and evaluation outputs live beside the folder. `push_release` uploads an allow-list
(`release_files`: the model, processor, card, results and code files at the top of the folder), so data
put there by mistake (Arrow shards, a CSV, images) is never uploaded; `PUSH_IGNORE` is applied as well.
The folder holds the SLIMP marker (`training/safety.py`), so a later run may write into it again.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
import yaml

from modeling_slimp import SLIMPModel
from modeling_slimp.configuration_slimp import DEFAULT_CLASSIFIER_REPRESENTATION
from training.data.dataset import load_slimp_dataset
from training.embeddings import embed_split
from training.labels import LabelError, describe, positive_class
from training.probe import evaluate_features
from training.results import write_json
from training.safety import write_marker

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"
PROBE_FEATURE_SETS = ("image", "image+metadata", "image+metadata+context")
# The results key of a classifier's test split scored from images alone (what pipeline() and the Hub widget see).
IMAGES_ONLY_SPLIT = "test, images only"
# Never uploaded with a release folder, even if a user put them there (on top of the `release_files` allow-list):
# training state, logs, pickles, and data (Arrow shards, tables, image files, a converted dataset's own files).
PUSH_IGNORE = ["checkpoints/*", "checkpoint-*", "runs/*", "logs/*", "eval/*", "*.tfevents.*", "**/events.out.tfevents.*",
               "*.pt", "*.pth", "*.bin", "*.pkl", "*.ckpt", "bank/*", "*.parquet", "*.arrow", "*.csv", "*.hdf5", "*.h5",
               "*.jpg", "*.jpeg", "*.png", "train/*", "validation/*", "test/*", "dataset_dict.json", "schema.json",
               "summary.json", "*.lock", ".slimp-output.json"]
# What a release folder publishes: model, processor, card and results (plus the code files, `release_files`).
RELEASE_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                 "adapter_config.json", "preprocessor_config.json", "processor_config.json", "README.md", "results.json")
SHARDED_WEIGHTS = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
CODE_DIR = Path(__file__).resolve().parent.parent / "modeling_slimp"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(value: str | None) -> bool:
    """True for `org/name` that is not a local path (what the Hub accepts in `base_model` and `datasets`)."""
    return bool(value) and bool(HUB_ID.match(str(value))) and not Path(str(value)).exists()


def public_value(value):
    """An argument value fit to publish: absolute local paths become their last component."""
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(v) for v in value]
    return value


def probe_report(model: SLIMPModel, collator, dataset_dir: str, seed: int = 0,
                 representation: str = DEFAULT_CLASSIFIER_REPRESENTATION) -> dict:
    """Linear probe (train split -> test split) of `model` and of an untrained model of the same config, for the
    positive class of the label names (`training.labels`; class 1, said, when the names do not tell)."""
    train, schema = load_slimp_dataset(dataset_dir, "train")
    test, _ = load_slimp_dataset(dataset_dir, "test")
    names = list(schema["label"]["names"])
    try:
        positive = positive_class(names)
        logger.info("linear probe: %s", describe(names, positive))
    except LabelError:
        positive = 1
        logger.warning("linear probe: the labels %s do not tell which class is positive; its pAUC and top-15 rank class "
                       "1 ('%s')", names, names[1])
    torch.manual_seed(seed)
    untrained = SLIMPModel(model.config).to(model.device)
    rows = {}
    for name, candidate in (("untrained", untrained), ("SLIMP", model)):
        features = {split: embed_split(candidate, dataset, collator, desc=f"probe: embedding {split} ({name})")
                    for split, dataset in (("train", train), ("test", test))}
        # The protocol of every probe table, at its simplest: the full probe at C = 1, one seed, no k-shot.
        results, _ = evaluate_features(features, "train", ["test"], names, seeds=[seed], shots=[], C=1.0,
                                       positive_class=positive, feature_sets=PROBE_FEATURE_SETS,
                                       representation=representation, retrieval=False, progress=False)
        for feature_set, metrics in results["linear_probe"]["test"].items():
            rows[f"{name} / {feature_set}"] = {metric: summary["mean"] for metric, summary in metrics.items()}
    model.train()
    del untrained
    table = ("| model / features | AUROC | pAUC (TPR>80%) | top-15 sensitivity | balanced acc. |\n|---|---|---|---|---|\n"
             + "\n".join(f"| {name} | {m['auroc']:.3f} | {m['pauc_80tpr']:.4f} | {m['top15_sensitivity']:.3f} | "
                         f"{m['balanced_accuracy']:.3f} |" for name, m in rows.items()))
    return {"rows": rows, "table": table, "representation": representation, "train_lesions": len(train),
            "test_lesions": len(test), "positive_label": names[positive]}


def _dataset_summary(dataset_dir: str) -> dict:
    summary_file = Path(dataset_dir) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return {name: {k: v for k, v in split.items() if k in ("patients", "lesions", "labels")}
            for name, split in summary.get("splits", {}).items()}


def how_to_use(task: str, model_id: str, base_model: str | None = None) -> str:
    """The card's "How to use" block (Python) for a `pretraining` (encoder), `classification` or `adapter`
    (peft LoRA) folder; a test runs each with `model_id` (and `base_model`) pointing at local folders."""
    if task == "adapter":
        base = base_model or "path/to/the/pre-trained/checkpoint"
        return f'''This folder holds a LoRA adapter (`adapter_model.safetensors`, with the trained `classifier` head), the
classifier's `config.json` and code, not full weights. Load it onto the pre-trained SLIMP checkpoint it
was trained from ({f"`{base_model}`" if base_model else "give its folder or Hub id"}):

```python
from peft import PeftModel
from transformers import AutoConfig, AutoModelForImageClassification

adapter_id = "{model_id}"
base_id = "{base}"
config = AutoConfig.from_pretrained(adapter_id, trust_remote_code=True)   # labels, features, class weights
base = AutoModelForImageClassification.from_pretrained(base_id, config=config, trust_remote_code=True)
model = PeftModel.from_pretrained(base, adapter_id).eval()
merged = model.merge_and_unload()   # a plain SLIMPForLesionClassification, e.g. for `pipeline`
print(type(merged).__name__)
```'''
    if task == "classification":
        return f'''```python
from PIL import Image
from transformers import AutoModelForImageClassification, AutoProcessor, pipeline

model_id = "{model_id}"
classifier = pipeline("image-classification", model=model_id, trust_remote_code=True)  # image only
print(classifier(Image.new("RGB", (128, 128), (180, 120, 100))))

# With metadata and the patient's other lesions (the processor groups lesions by patient_id):
model = AutoModelForImageClassification.from_pretrained(model_id, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
rows = [{{"patient_id": "p1", "age_approx": 55, "sex": "male", "clin_size_long_diam_mm": 4.2}},
        {{"patient_id": "p1", "age_approx": 55, "sex": "male", "clin_size_long_diam_mm": 9.0}}]
images = [Image.new("RGB", (128, 128), (180, 120, 100)), Image.new("RGB", (128, 128), (90, 60, 50))]
logits = model(**processor(images=images, metadata=rows, return_tensors="pt")).logits
print(logits.softmax(-1))
```'''
    return f'''```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

model_id = "{model_id}"
model = AutoModel.from_pretrained(model_id, trust_remote_code=True).eval()   # SLIMPModel, an encoder
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)  # SLIMPProcessor
rows = [{{"patient_id": "p1", "age_approx": 55, "sex": "male", "anatom_site_general": "posterior torso",
         "clin_size_long_diam_mm": 4.2}}]                     # any subset of the columns; the rest is missing
batch = processor(images=[Image.new("RGB", (128, 128), (180, 120, 100))], metadata=rows, return_tensors="pt")
with torch.no_grad():
    out = model(**batch)
print(out.image_embeds.shape, out.phenotype_embeds.shape)     # (N, D) lesions, (P, D) patients
```'''


def render_model_card(config, schema: dict, dataset_dir: str, results: dict, task: str = "pretraining",
                      model_id: str | None = None, base_model: str | None = None) -> str:
    """MODEL_CARD.md with its YAML completed and its {{...}} filled; `task` is pretraining, classification or adapter.

    The YAML says what the folder is: `pipeline_tag: image-feature-extraction` for an encoder,
    `image-classification` for a classifier (`library_name: peft` for an adapter); the licence of the data
    actually used; `datasets` and `base_model` only when they are Hub ids; `model-index` with the measured
    results.
    """
    text = MODEL_CARD_TEMPLATE.read_text()
    _, header, body = text.split("---", 2)
    meta = yaml.safe_load(header)
    source = schema.get("source", "unknown")
    meta["pipeline_tag"] = "image-feature-extraction" if task == "pretraining" else "image-classification"
    if task == "adapter":
        meta["library_name"] = "peft"
    meta["license"] = str(schema.get("license") or meta.get("license", "other")).lower()
    hub_dataset = schema.get("hub_dataset_id")
    if is_hub_id(hub_dataset):
        meta["datasets"] = [hub_dataset]
    else:
        meta.pop("datasets", None)
    if is_hub_id(base_model):
        meta["base_model"] = base_model
    meta["metrics"] = ["roc_auc", "isic2024_pauc", "balanced_accuracy", "recall"]
    meta["model-index"] = _model_index(model_id or "slimp", source, results, task)
    splits = _dataset_summary(dataset_dir)
    fills = {
        "MODEL_KIND": {"classification": "SLIMPForLesionClassification (fine-tuned classifier)",
                       "adapter": "LoRA adapter of a SLIMPForLesionClassification",
                       "pretraining": "SLIMPModel (pre-trained encoder)"}[task],
        "ARCHITECTURE": _architecture(config),
        "HOW_TO_USE": how_to_use(task, model_id or "path/to/this/folder", base_model if is_hub_id(base_model) or task == "adapter" else None),
        "TRAINING_DATA": f"Source: `{source}` (licence {meta['license']}); splits (patients / lesions): "
        + ", ".join(f"{k}: {v.get('patients', '?')} / {v.get('lesions', '?')}" for k, v in splits.items())
        + ". Splits are patient-disjoint."
        + (" **The data is synthetic** (`training/data/synthetic.py`, calibrated to the published facts about the real "
           "ISIC 2024 train set, with a median of 40 lesions per patient instead of 241, so ~0.7% malignant instead of "
           "0.098%): this checkpoint is a software demonstration, not a skin model." if source == "synthetic" else ""),
        "METADATA_FEATURES": _features(config),
        "RESULTS": _results_table(results),
        "TRAINING_ARGS": "```yaml\n" + yaml.safe_dump(public_value(results.get("card_args", results.get("train_args", {}))),
                                                  sort_keys=False) + "```",
    }
    for key, value in fills.items():
        body = body.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{[A-Z_]+\}\}", body)
    if leftover:
        raise ValueError(f"{MODEL_CARD_TEMPLATE} has placeholders with no value: {leftover}")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---" + body


def _model_index(name: str, source: str, results: dict, task: str) -> list[dict]:
    metrics = []
    probe = (results.get("linear_probe") or {}).get("rows", {})
    for row, values in probe.items():
        if row.startswith("SLIMP"):
            feature_set = row.split(" / ")[1]
            metrics += [{"type": "roc_auc", "value": round(values["auroc"], 4), "name": f"linear probe AUROC ({feature_set})"},
                        {"type": "isic2024_pauc", "value": round(values["pauc_80tpr"], 4), "name": f"linear probe pAUC>80%TPR ({feature_set})"}]
    by_split = {"test": metrics} if metrics else {}
    for split, values in (results.get("classification") or {}).items():  # each under its own split ("test, images only": test)
        by_split.setdefault(split.split(",")[0], []).extend([
            {"type": "roc_auc", "value": round(values["auroc"], 4), "name": f"{split} AUROC"},
            {"type": "isic2024_pauc", "value": round(values["pauc_80tpr"], 4), "name": f"{split} pAUC>80%TPR"}])
    task = {"type": "image-feature-extraction" if task == "pretraining" else "image-classification", "name": "malignancy classification"}
    entries = [{"task": task, "dataset": {"type": source, "name": source, "split": split}, "metrics": split_metrics}
               for split, split_metrics in by_split.items()]
    return [{"name": name, "results": entries or [{"task": task, "dataset": {"type": source, "name": source, "split": "test"},
                                                   "metrics": [{"type": "roc_auc", "value": None, "name": "not measured"}]}]}]


def _architecture(config) -> str:
    vision = config.vision_config
    return (f"image tower `{type(vision).__name__}` ({getattr(vision, 'image_size', '?')} px); metadata towers: FT-Transformer "
            f"{config.lesion_metadata_config.hidden_size}x{config.lesion_metadata_config.num_hidden_layers} (lesion), "
            f"{config.patient_metadata_config.hidden_size}x{config.patient_metadata_config.num_hidden_layers} (patient); "
            f"projection {config.projection_dim}; λ = {config.lesion_loss_weight}; aggregation `{config.patient_aggregation}`; "
            f"image SSL weight {config.image_ssl_weight}; classifier features `{config.classifier_features}` "
            f"({config.classifier_representation}).")


def _features(config) -> str:
    parts = []
    for level, schema in (("lesion", config.lesion_metadata_config), ("patient", config.patient_metadata_config)):
        parts.append(f"- {level}: numerical {', '.join(f'`{f}`' for f in schema.numerical_features) or 'none'}; "
                     f"categorical {', '.join(f'`{f}`' for f in schema.categorical_features) or 'none'}")
    return "\n".join(parts)


def _results_table(results: dict) -> str:
    lines = []
    if results.get("linear_probe"):
        positive = results["linear_probe"].get("positive_label")
        lines += [f"Linear probe (logistic regression on frozen features ({results['linear_probe'].get('representation', 'tower')} "
                  "representation), train split -> patient-disjoint test split"
                  + (f"; positive class **{positive}**" if positive else "") + "):", "", results["linear_probe"]["table"], ""]
    if results.get("classification"):
        if results.get("positive_label"):
            lines += [f"Positive class: **{results['positive_label']}** (`positive_label` in `config.json`): the class whose "
                      "score pAUC, top-15 sensitivity and, for two classes, AUROC rank.", ""]
        lines += ["| split | AUROC | pAUC (TPR>80%) | top-15 sensitivity | balanced acc. |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {m['auroc']:.3f} | {m['pauc_80tpr']:.4f} | {m.get('top15_sensitivity', float('nan')):.3f} | "
                  f"{m['balanced_accuracy']:.3f} |" for s, m in results["classification"].items()]
        lines.append("")
        if IMAGES_ONLY_SPLIT in results["classification"]:
            lines += [f"**Images only.** This classifier was fitted on metadata and the patient context. "
                      f"`pipeline(\"image-classification\")` and the Hub widget give it images only (every metadata "
                      f"value missing, each lesion its own patient): the `{IMAGES_ONLY_SPLIT}` row is what they score. "
                      "Give it metadata and the patient's other lesions through the processor (below), or fine-tune "
                      "an image-only classifier (`--classifier_features image`) for image-only use.", ""]
    if results.get("validation"):
        lines += ["Validation (retrieval recall@k and contrastive losses): " + ", ".join(
            f"{k.removeprefix('val/')} {v:.3f}" for k, v in results["validation"].items())]
    return "\n".join(lines) or "No evaluation was run for this checkpoint."


def save_release(model, processor, output_dir: str, schema: dict, dataset_dir: str, results: dict, task: str = "pretraining",
                 hub_model_id: str | None = None, base_model: str | None = None, card_only: bool = False) -> Path:
    """save_pretrained (safetensors + code + auto_map), the processor, README.md and results.json.

    `card_only`: rewrite README.md and results.json only (e.g. once the probe has run). An adapter's card loads
    it onto `base_model`, by default the base checkpoint its `adapter_config.json` names."""
    output = Path(output_dir)
    if not card_only:
        output.mkdir(parents=True, exist_ok=True)
        write_marker(output, "release")
        model.save_pretrained(output)
        processor.save_pretrained(output)
        normal_permissions(output)
    if task == "adapter" and base_model is None and (output / "adapter_config.json").is_file():
        base_model = json.loads((output / "adapter_config.json").read_text()).get("base_model_name_or_path")
    (output / "README.md").write_text(render_model_card(model.config, schema, dataset_dir, results, task, hub_model_id, base_model))
    write_json(output / "results.json", public_value(results))
    if not card_only:
        logger.info("saved %s to %s", type(model).__name__, output)
    return output


def normal_permissions(folder: Path) -> None:
    """Files that a save wrote through a private temporary file (transformers' model.safetensors: mode 0600) get
    the mode of any new file, 0666 less the umask (0644 with the usual 022), so others can read a release."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600:
            path.chmod(0o666 & ~umask)


def release_files(folder: str | Path) -> list[str]:
    """The files `push_release` uploads: at the top of `folder` only, the model (`RELEASE_FILES`, sharded
    safetensors), the processor, the card, results.json and the `modeling_slimp` code files. Nothing else,
    whatever else the folder holds (a dataset, images, a CSV)."""
    code = {path.name for path in CODE_DIR.glob("*.py") if path.name != "__init__.py"}
    names = sorted(path.name for path in Path(folder).iterdir() if path.is_file())
    return [name for name in names if name in RELEASE_FILES or name in code or SHARDED_WEIGHTS.match(name)]


def push_release(folder: str | Path, repo_id: str, private: bool = False) -> list[str]:
    """Upload the allow-listed files of a release folder (`release_files`) to the Hub model repo `repo_id`;
    returns their names."""
    from huggingface_hub import create_repo, upload_folder

    files = release_files(folder)
    if "config.json" not in files:
        raise ValueError(f"{folder} holds no config.json: not a release folder, nothing pushed")
    create_repo(repo_id, exist_ok=True, private=private)
    upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=files, ignore_patterns=PUSH_IGNORE)
    return files


__all__ = ["probe_report", "render_model_card", "save_release", "push_release", "release_files", "how_to_use",
           "PUSH_IGNORE", "RELEASE_FILES", "is_hub_id", "public_value"]
