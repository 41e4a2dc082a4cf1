"""SLIMP Hub Space: one patient's lesions in, a malignancy score per lesion out, ranked as the ISIC 2024
patient-level metric ranks them (the 15 highest-scored lesions are what a dermatologist looks at first).

    pip install "gradio>=5"                      # or: pip install -e ".[demo]" in the SLIMP repository
    python examples/space/app.py --model_dir outputs/slimp-synthetic-linear [--bank_dir banks/synthetic-train]
    SLIMP_MODEL=your-org/slimp-classifier python app.py          # on a Hub Space (this folder is the Space repo)

Upload the patient's lesion images, optionally a CSV with one row per image (a `file` column with the image's
file name, then any metadata columns with the dataset's own names: `clin_size_long_diam_mm`,
`anatom_site_general`, ...) and the patient's age and sex. Every image is one lesion of the same patient,
so the classifier's patient context (how a lesion differs from the patient's other lesions) is computed
over all of them. The table shows, per lesion, the score, its rank, whether it is among the patient's 15
highest, and what drove the score: the part of the logit from the lesion itself, from the patient's
metadata, and from the patient context. With a reference bank (`training/extrapolate.py --save_bank`),
the nearest reference lesions by image are listed too.

The model is a `SLIMPForLesionClassification` folder loaded with `trust_remote_code=True` (the Space does
not install the SLIMP package). Research software, not a medical device.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, AutoProcessor

TOP_K = 15
COLUMNS = ["rank", "file", "malignancy score", f"top {TOP_K}", "from the lesion", "from the patient's metadata",
           "from the patient context", "nearest reference lesions"]


class Scorer:
    """A SLIMP classifier (+ its processor, + an optional reference bank) that scores one patient's lesions."""

    def __init__(self, model_dir: str, bank_dir: str | None = None):
        self.model = AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
        self.positive = 1 if self.model.config.num_labels > 1 else 0
        self.bank = load_bank(bank_dir) if bank_dir else None

    @torch.no_grad()
    def score(self, images: list[Image.Image], names: list[str], rows: list[dict], age: float | None, sex: str | None) -> list[list]:
        """Table rows (see COLUMNS), highest score first."""
        patient = {"patient_id": "the patient", **({"age_approx": age} if age else {}), **({"sex": sex} if sex else {})}
        metadata = [{**patient, **row} for row in rows]
        batch = self.processor(images=images, metadata=metadata, return_tensors="pt")
        model = self.model
        features = model.lesion_features(**batch)
        context = model.batch_context(features)  # every lesion here is the one patient's: context over all of them
        logits = model.classify(features, context)  # (N, C)
        scores = logits.softmax(-1)[:, self.positive].tolist() if logits.shape[1] > 1 else logits.sigmoid()[:, 0].tolist()
        parts = self.contributions(features, context)
        neighbours = self.neighbours(batch["pixel_values"]) if self.bank else [""] * len(images)
        order = np.argsort(-np.asarray(scores), kind="stable")
        table = []
        for rank, i in enumerate(order, start=1):
            table.append([rank, names[i], round(scores[i], 4), "yes" if rank <= TOP_K else "",
                          round(parts["lesion"][i], 3), round(parts["patient"][i], 3), round(parts["context"][i], 3), neighbours[i]])
        return table

    def contributions(self, features: dict, context) -> dict[str, list[float]]:
        """The positive class's logit minus the others' mean, split by the head's input parts."""
        weight = self.model.classifier.weight
        direction = weight[self.positive] - torch.cat([weight[:self.positive], weight[self.positive + 1:]]).mean(0)
        sizes, start, out = self.model.part_sizes(), 0, {"lesion": 0.0, "patient": 0.0, "context": 0.0}
        n = next(iter(features.values())).shape[0]
        out = {key: torch.zeros(n) for key in out}
        for part in self.model.parts:
            block = direction[start:start + sizes[part]]
            value = context if part == "context" else features[part]
            key = "lesion" if part in ("image", "lesion") else part
            out[key] += value @ block
            start += sizes[part]
        return {key: value.tolist() for key, value in out.items()}

    def neighbours(self, pixel_values: torch.Tensor, k: int = 3) -> list[str]:
        features = self.model.slimp.get_image_features(pixel_values, return_dict=True).pooler_output  # projected (N, D)
        embeds = torch.nn.functional.normalize(features, dim=-1)
        similarity = embeds @ self.bank["embeddings"].T  # (N, M)
        top = similarity.topk(min(k, similarity.shape[1]), dim=1)
        lines = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            lines.append("; ".join(f"{v:.2f}: " + ", ".join(f"{key} {self.bank['metadata'][key][j]}" for key in self.bank["shown"])
                                   for v, j in zip(values, indices)))
        return lines


def load_bank(folder: str) -> dict:
    """A reference bank written by `training/extrapolate.py --save_bank` (safetensors + parquet, no pickle)."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    embeddings = torch.nn.functional.normalize(load_file(str(Path(folder) / "embeddings.safetensors"))["image_embeds"], dim=-1)
    metadata = pq.read_table(Path(folder) / "metadata.parquet").to_pydict()
    shown = [c for c in ("clin_size_long_diam_mm", "anatom_site_general", "age_approx") if c in metadata]
    return {"embeddings": embeddings, "metadata": metadata, "shown": shown,
            "info": json.loads((Path(folder) / "bank.json").read_text())}


def read_rows(csv_file: str | None, names: list[str]) -> list[dict]:
    """Metadata rows in image order, from a CSV whose `file` column names the images (others: missing)."""
    if not csv_file:
        return [{} for _ in names]
    with open(csv_file, newline="") as handle:
        by_file = {Path(row.pop("file", "")).name: row for row in csv.DictReader(handle)}
    return [dict(by_file.get(name, {})) for name in names]


def build_demo(model_dir: str, bank_dir: str | None = None):
    import gradio as gr

    scorer = Scorer(model_dir, bank_dir)

    def run(files, metadata_csv, age, sex):
        if not files:
            raise gr.Error("Upload the patient's lesion images first.")
        paths = [f if isinstance(f, str) else f.name for f in files]
        names = [Path(p).name for p in paths]
        images = [Image.open(p).convert("RGB") for p in paths]
        rows = read_rows(metadata_csv if isinstance(metadata_csv, (str, type(None))) else metadata_csv.name, names)
        return scorer.score(images, names, rows, float(age) if age else None, sex or None)

    with gr.Blocks(title="SLIMP: one patient's lesions, ranked", analytics_enabled=False) as demo:
        gr.Markdown("# SLIMP: one patient's lesions, ranked\nUpload every lesion image of **one** patient. Each "
                    "lesion is scored next to the patient's other lesions (the ugly-duckling comparison). "
                    "Research software, not a medical device.")
        with gr.Row():
            files = gr.File(label="lesion images", file_count="multiple", file_types=["image"], elem_id="lesion-images")
            metadata_csv = gr.File(label="metadata CSV (optional: a `file` column + metadata columns)", file_types=[".csv"])
        with gr.Row():
            age = gr.Number(label="age (optional; 0 = unknown)", value=0)
            sex = gr.Dropdown(label="sex (optional)", choices=["", "female", "male"], value="")
        button = gr.Button("Score the lesions", variant="primary", elem_id="score")
        table = gr.Dataframe(headers=COLUMNS, label="lesions, highest score first", elem_id="ranking", interactive=False)
        button.click(run, inputs=[files, metadata_csv, age, sex], outputs=table)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default=os.environ.get("SLIMP_MODEL"), help="a SLIMPForLesionClassification folder or Hub id")
    parser.add_argument("--bank_dir", default=os.environ.get("SLIMP_BANK"), help="a reference bank (training/extrapolate.py --save_bank)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    args = parser.parse_args(argv)
    if not args.model_dir:
        parser.error("give --model_dir (or set SLIMP_MODEL)")
    build_demo(args.model_dir, args.bank_dir).launch(server_name="0.0.0.0", server_port=args.port)


if __name__ == "__main__":
    main()
