"""What a finished run leaves behind: the linear probe beside an untrained model, and the Hub-ready
checkpoint folder with its model card (README.md rendered from MODEL_CARD.md with measured results).

Nothing patient-level goes into the folder: the card and `results.json` hold aggregate metrics, the
dataset's name and split sizes, and the training arguments only.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import yaml

from modeling_slimp import SLIMPModel
from training.cli import to_jsonable
from training.data import load_slimp_dataset
from training.features import FEATURE_SETS, extract_features, linear_probe, probe_inputs

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"


def probe_report(model: SLIMPModel, collator, dataset_dir: str, seed: int = 0) -> dict:
    """Linear probe (train split -> test split) of `model` and of an untrained model of the same config."""
    train, _ = load_slimp_dataset(dataset_dir, "train")
    test, _ = load_slimp_dataset(dataset_dir, "test")
    torch.manual_seed(seed)
    untrained = SLIMPModel(model.config).to(model.device)
    rows = {}
    for name, candidate in (("untrained", untrained), ("SLIMP", model)):
        train_features = extract_features(candidate, collator, train)
        test_features = extract_features(candidate, collator, test)
        for feature_set in FEATURE_SETS:
            rows[f"{name} / {feature_set}"] = linear_probe(
                probe_inputs(train_features, feature_set), train_features["labels"],
                probe_inputs(test_features, feature_set), test_features["labels"], seed=seed)
    del untrained
    table = "| model / features | AUROC | pAUC (TPR>80%) | balanced acc. |\n|---|---|---|---|\n" + "\n".join(
        f"| {name} | {m['auroc']:.3f} | {m['pauc_80tpr']:.4f} | {m['balanced_accuracy']:.3f} |" for name, m in rows.items())
    return {"rows": rows, "table": table, "train_lesions": len(train), "test_lesions": len(test)}


def _dataset_summary(dataset_dir: str) -> dict:
    summary_file = Path(dataset_dir) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    splits = {name: {k: v for k, v in split.items() if k in ("patients", "lesions", "labels")}
              for name, split in summary.get("splits", {}).items()}
    return {"splits": splits}


def render_model_card(config, schema: dict, dataset_dir: str, results: dict, task: str = "pretraining",
                      model_id: str | None = None) -> str:
    """MODEL_CARD.md with its YAML completed (datasets, metrics, model-index) and its {{...}} filled."""
    text = MODEL_CARD_TEMPLATE.read_text()
    _, header, body = text.split("---", 2)
    meta = yaml.safe_load(header)
    source = schema.get("source", "unknown")
    # The weights inherit the data's licence (ISIC data is CC-BY-NC-4.0); Hub licence ids are lower case.
    meta["license"] = str(schema.get("license") or meta.get("license", "other")).lower()
    meta["datasets"] = [schema.get("hub_dataset_id") or f"{source} (converted with training/prepare_data.py)"]
    meta["metrics"] = ["roc_auc", "isic2024_pauc", "balanced_accuracy", "recall"]
    meta["model-index"] = _model_index(model_id or "slimp", source, results, task)
    summary = _dataset_summary(dataset_dir)
    fills = {
        "MODEL_KIND": "SLIMPForLesionClassification (fine-tuned classifier)" if task == "classification" else "SLIMPModel (pre-trained encoder)",
        "ARCHITECTURE": _architecture(config),
        "TRAINING_DATA": f"Source: `{source}`; splits (patients / lesions): "
        + ", ".join(f"{k}: {v.get('patients', '?')} / {v.get('lesions', '?')}" for k, v in summary["splits"].items())
        + ". Splits are patient-disjoint.",
        "METADATA_FEATURES": _features(config),
        "RESULTS": _results_table(results),
        "TRAINING_ARGS": "```json\n" + json.dumps(results.get("train_args", {}), indent=1, default=str) + "\n```",
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
    for split, values in (results.get("classification") or {}).items():
        metrics += [{"type": "roc_auc", "value": round(values["auroc"], 4), "name": f"{split} AUROC"},
                    {"type": "isic2024_pauc", "value": round(values["pauc_80tpr"], 4), "name": f"{split} pAUC>80%TPR"}]
    return [{"name": name, "results": [{"task": {"type": "image-classification", "name": "malignancy classification"},
                                         "dataset": {"type": source, "name": source, "split": "test"},
                                         "metrics": metrics or [{"type": "roc_auc", "value": None, "name": "not measured"}]}]}]


def _architecture(config) -> str:
    vision = config.vision_config
    return (f"image tower `{type(vision).__name__}` ({getattr(vision, 'image_size', '?')} px); metadata towers: FT-Transformer "
            f"{config.lesion_metadata_config.hidden_size}x{config.lesion_metadata_config.num_hidden_layers} (lesion), "
            f"{config.patient_metadata_config.hidden_size}x{config.patient_metadata_config.num_hidden_layers} (patient); "
            f"projection {config.projection_dim}; λ = {config.lesion_loss_weight}; aggregation `{config.patient_aggregation}`; "
            f"image SSL weight {config.image_ssl_weight}.")


def _features(config) -> str:
    parts = []
    for level, schema in (("lesion", config.lesion_metadata_config), ("patient", config.patient_metadata_config)):
        parts.append(f"- {level}: numerical {', '.join(f'`{f}`' for f in schema.numerical_features) or 'none'}; "
                     f"categorical {', '.join(f'`{f}`' for f in schema.categorical_features) or 'none'}")
    return "\n".join(parts)


def _results_table(results: dict) -> str:
    lines = []
    if results.get("linear_probe"):
        lines += ["Linear probe (logistic regression on frozen features, train split -> patient-disjoint test split):", "",
                  results["linear_probe"]["table"], ""]
    if results.get("classification"):
        lines += ["| split | AUROC | pAUC (TPR>80%) | balanced acc. |", "|---|---|---|---|"]
        lines += [f"| {s} | {m['auroc']:.3f} | {m['pauc_80tpr']:.4f} | {m['balanced_accuracy']:.3f} |" for s, m in results["classification"].items()]
        lines.append("")
    if results.get("validation"):
        lines += ["Validation (retrieval recall@k and contrastive losses): " + ", ".join(
            f"{k.removeprefix('val/')} {v:.3f}" for k, v in results["validation"].items())]
    return "\n".join(lines) or "No evaluation was run for this checkpoint."


def save_release(model, processor, output_dir: str, schema: dict, dataset_dir: str, results: dict, task: str = "pretraining",
                 push_to_hub: bool = False, hub_model_id: str | None = None) -> Path:
    """save_pretrained (safetensors + code + auto_map), the processor, README.md and results.json; push if asked."""
    output = Path(output_dir)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    (output / "README.md").write_text(render_model_card(model.config, schema, dataset_dir, results, task, hub_model_id))
    (output / "results.json").write_text(json.dumps(to_jsonable(results), indent=1, default=str))
    logger.info("saved %s to %s", type(model).__name__, output)
    if push_to_hub:
        if not hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-org/slimp-isic2024)")
        from huggingface_hub import create_repo, upload_folder

        create_repo(hub_model_id, exist_ok=True)
        upload_folder(repo_id=hub_model_id, folder_path=str(output), ignore_patterns=["checkpoints/*", "runs/*"])
    return output


__all__ = ["probe_report", "render_model_card", "save_release"]
