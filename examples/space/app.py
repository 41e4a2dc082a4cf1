"""SLIMP Hub Space: one patient's lesions in, each lesion's probability of being malignant out, ranked as the
ISIC 2024 patient-level metric ranks them (the 15 highest-scored lesions are what a dermatologist looks at first).

    pip install "gradio>=5"                      # or: pip install -e ".[demo]" in the SLIMP repository
    python examples/space/app.py --model_dir outputs/slimp-synthetic-linear [--bank_dir banks/synthetic-train]
    SLIMP_MODEL=your-org/slimp-classifier python app.py          # on a Hub Space (this folder is the Space repo)

Upload the patient's lesion images, optionally a CSV with one row per image (a `file` column with the image's
file name, then any metadata columns with the dataset's own names: `clin_size_long_diam_mm`,
`anatom_site_general`, ...) and the patient's age and sex. Every image is one lesion of the same patient, so the
classifier's patient context (how a lesion differs from the patient's other lesions) is computed over all of them.

The ranked list shows each lesion's thumbnail, its probability of the positive class (the class `positive_label`
in the classifier's config.json names, e.g. 'malignant'), and a small chart of what drove it: the log-odds
contributed by the lesion itself (image and lesion metadata), by the patient's metadata, and by the patient
context, which add up, with the head's constant, to the lesion's log-odds. The patient's most suspicious lesions
are highlighted: the 15 highest-scored when the patient has more than 15 lesions (the ISIC 2024 cut-off), else
the 3 highest (a top 15 would hold them all). With a reference bank (`training/extrapolate.py --save_bank`), the
most similar reference lesions by image are listed too; without one that column is not shown.

The model is a `SLIMPForLesionClassification` folder loaded with `trust_remote_code=True` (the Space does not
install the SLIMP package). Research software, not a medical device.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoModelForImageClassification, AutoProcessor

TOP_K = 15            # the ISIC 2024 patient metric looks at each patient's 15 highest-scored lesions
HIGHLIGHT_SMALL = 3   # lesions highlighted for a patient with no more than TOP_K lesions
PARTS = {  # contribution -> (legend label, colour)
    "lesion": ("the lesion itself (image + lesion metadata)", "#3b6fb6"),
    "patient": ("the patient's metadata (age, sex, ...)", "#e08a2c"),
    "context": ("the patient context (how it differs from the patient's other lesions)", "#3c9a5f"),
}
THUMBNAIL_PX = 72


@dataclass
class ScoredLesion:
    """One lesion of the ranking: `probability` of the positive class, `contributions` in log-odds of it."""

    rank: int
    file: str
    probability: float
    highlighted: bool
    contributions: dict[str, float]
    neighbours: list[str] = field(default_factory=list)
    thumbnail: str = ""  # a data: URI


class Scorer:
    """A SLIMP classifier (+ its processor, + an optional reference bank) that scores one patient's lesions."""

    def __init__(self, model_dir: str, bank_dir: str | None = None):
        self.model = AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
        self.positive = positive_index(self.model.config)
        self.positive_label = self.model.config.id2label[self.positive]
        self.bank = load_bank(bank_dir) if bank_dir else None

    @torch.no_grad()
    def score(self, images: list[Image.Image], names: list[str], rows: list[dict], age: float | None,
              sex: str | None) -> list[ScoredLesion]:
        """The patient's lesions, highest probability first."""
        patient = {"patient_id": "the patient", **({"age_approx": age} if age else {}), **({"sex": sex} if sex else {})}
        metadata = [{**patient, **row} for row in rows]
        batch = self.processor(images=images, metadata=metadata, return_tensors="pt")
        features = self.model.lesion_features(**batch)
        context = self.model.batch_context(features)  # every lesion here is the one patient's: context over all of them
        logits = self.model.classify(features, context)  # (N, C)
        probabilities = logits.softmax(-1)[:, self.positive] if logits.shape[1] > 1 else logits.sigmoid()[:, 0]
        parts = self.contributions(features, context)
        neighbours = self.neighbours(batch["pixel_values"]) if self.bank else [[] for _ in images]
        order = np.argsort(-probabilities.numpy(), kind="stable")
        shown = highlight_count(len(images))
        return [ScoredLesion(rank, names[i], float(probabilities[i]), rank <= shown,
                             {key: float(value[i]) for key, value in parts.items()}, neighbours[i], thumbnail(images[i]))
                for rank, i in enumerate(order.tolist(), start=1)]

    def contributions(self, features: dict, context) -> dict[str, torch.Tensor]:
        """(N,) log-odds of the positive class (its logit minus the others' mean) from each part of the head's input."""
        direction = self.direction()
        sizes, start = self.model.part_sizes(), 0
        n = next(iter(features.values())).shape[0]
        out = {key: torch.zeros(n) for key in PARTS}
        for part in self.model.parts:
            block = direction[start:start + sizes[part]]
            value = context if part == "context" else features[part]
            out["lesion" if part in ("image", "lesion") else part] += value @ block
            start += sizes[part]
        return out

    def direction(self) -> torch.Tensor:
        weight = self.model.classifier.weight
        return weight[self.positive] - torch.cat([weight[:self.positive], weight[self.positive + 1:]]).mean(0)

    @torch.no_grad()
    def constant(self) -> float:
        """The head's bias in the same log-odds units (what the contributions add to)."""
        bias = self.model.classifier.bias
        return float(bias[self.positive] - torch.cat([bias[:self.positive], bias[self.positive + 1:]]).mean())

    def neighbours(self, pixel_values: torch.Tensor, k: int = 3) -> list[list[str]]:
        features = self.model.slimp.get_image_features(pixel_values, return_dict=True).pooler_output  # projected (N, D)
        similarity = torch.nn.functional.normalize(features, dim=-1) @ self.bank["embeddings"].T  # (N, M) cosines
        top = similarity.topk(min(k, similarity.shape[1]), dim=1)
        return [[f"cosine {v:.3f}: " + " · ".join(describe_reference(self.bank["metadata"], j, self.bank["shown"]))
                 for v, j in zip(values, indices)] for values, indices in zip(top.values.tolist(), top.indices.tolist())]


def describe_reference(metadata: dict, row: int, keys: list[str]) -> list[str]:
    """A reference lesion in a few words: its size, body site and the patient's age (missing values left out)."""
    words = []
    for key in keys:
        value = metadata[key][row]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        if key == "clin_size_long_diam_mm":
            words.append(f"{float(value):.1f} mm")
        elif key == "age_approx":
            words.append(f"age {float(value):.0f}")
        else:
            words.append(str(value))
    return words or ["no metadata"]


def positive_index(config) -> int:
    """The positive class: `positive_label` of the config (written by training/finetune.py), else a label named
    'malignant', else class 1."""
    names = {str(name).casefold(): int(i) for i, name in config.id2label.items()}
    wanted = str(getattr(config, "positive_label", "malignant")).casefold()
    return names.get(wanted, names.get("malignant", 1 if config.num_labels > 1 else 0))


def highlight_count(num_lesions: int) -> int:
    return TOP_K if num_lesions > TOP_K else min(HIGHLIGHT_SMALL, num_lesions)


def thumbnail(image: Image.Image) -> str:
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def percent(probability: float) -> str:
    """A probability as a readable percentage, never '0': 42.3%, 0.42%, 0.0042%, <0.001%."""
    value = 100.0 * probability
    if value >= 99.95:
        return ">99.9%" if probability < 1.0 else "100%"
    if value >= 1.0:
        return f"{value:.1f}%"
    if value >= 0.001:
        return f"{value:.2g}%"
    return "<0.001%"


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
        by_file = {Path(row.pop("file", "") or "").name: row for row in csv.DictReader(handle)}
    return [dict(by_file.get(name, {})) for name in names]


# ----- the page -----
def contribution_chart(contributions: dict[str, float], scale: float) -> str:
    """Three horizontal bars from a centre line: right raises the log-odds, left lowers it (one scale per patient)."""
    width, height, bar = 180, 46, 12
    middle, parts = width / 2, []
    for row, (key, value) in enumerate(contributions.items()):
        length = (width / 2 - 4) * abs(value) / scale
        x = middle if value >= 0 else middle - length
        parts.append(f'<rect x="{x:.1f}" y="{2 + row * (bar + 3)}" width="{max(length, 0.5):.1f}" height="{bar}" '
                     f'fill="{PARTS[key][1]}"><title>{html.escape(PARTS[key][0])}: {value:+.2f}</title></rect>')
    parts.append(f'<line x1="{middle}" y1="0" x2="{middle}" y2="{height}" stroke="#555" stroke-width="1"/>')
    values = " ".join(f'<span style="color:{PARTS[k][1]}">{v:+.2f}</span>' for k, v in contributions.items())
    return (f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="contributions">{"".join(parts)}'
            f'</svg><div class="values">{values}</div>')


def legend(positive_label: str, constant: float, scale: float) -> str:
    items = "".join(f'<li><span class="swatch" style="background:{colour}"></span>{html.escape(label)}</li>'
                    for label, colour in PARTS.values())
    return (f'<div id="legend"><b>How to read the chart.</b> Each bar is what one part of the model\'s input adds to '
            f'the lesion\'s <i>log-odds</i> of being {html.escape(positive_label)} (natural log of p / (1 − p); '
            f'+0.69 doubles the odds, −0.69 halves them). Bars to the right raise the probability, to the left lower '
            f'it; the three numbers under the chart are the same values. They add up, with the model\'s constant '
            f'{constant:+.2f}, to the lesion\'s log-odds. Full bar width = {scale:.2f} log-odds.<ul>{items}</ul></div>')


def render_ranking(lesions: list[ScoredLesion], positive_label: str, constant: float, with_bank: bool) -> str:
    """The ranked list as HTML: a note on the highlight, the legend, then one row per lesion."""
    n = len(lesions)
    shown = sum(lesion.highlighted for lesion in lesions)
    if n > TOP_K:
        note = (f"This patient has {n} lesions. The {TOP_K} highest-scored (the cut-off of the ISIC 2024 patient "
                f"metric) are highlighted.")
    else:
        note = (f"This patient has {n} lesion{'s' if n != 1 else ''}: a top {TOP_K} would include every one of them, "
                f"so the {shown} highest-scored {'are' if shown != 1 else 'is'} highlighted instead.")
    scale = max([abs(v) for lesion in lesions for v in lesion.contributions.values()] + [1e-6])
    header = ("<tr><th>rank</th><th>lesion</th><th>file</th>"
              f"<th>probability {html.escape(positive_label)}</th><th>what drove it (log-odds)</th>"
              + ("<th>nearest reference lesions (by image)</th>" if with_bank else "") + "</tr>")
    rows = []
    for lesion in lesions:
        neighbours = "<br>".join(html.escape(line) for line in lesion.neighbours)
        rows.append(
            f'<tr class="lesion{" top" if lesion.highlighted else ""}" data-rank="{lesion.rank}" '
            f'data-file="{html.escape(lesion.file)}" data-probability="{lesion.probability:.6g}">'
            f'<td class="rank">{lesion.rank}</td><td><img class="thumbnail" src="{lesion.thumbnail}" '
            f'alt="{html.escape(lesion.file)}"></td><td class="file">{html.escape(lesion.file)}</td>'
            f'<td class="probability">{percent(lesion.probability)}</td>'
            f'<td>{contribution_chart(lesion.contributions, scale)}</td>'
            + (f'<td class="neighbours">{neighbours}</td>' if with_bank else "") + "</tr>")
    return (f'<style>{CSS}</style><p class="note">{note}</p>{legend(positive_label, constant, scale)}'
            f'<table class="ranking">{header}{"".join(rows)}</table>')


CSS = """
.ranking { border-collapse: collapse; width: 100%; font-size: 14px; }
.ranking th, .ranking td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
.ranking tr.top { background: #fdecea; }
.ranking tr.top td.rank { border-left: 5px solid #c0392b; font-weight: bold; }
.ranking td.probability { font-size: 18px; font-weight: bold; }
.ranking img.thumbnail { width: 72px; height: 72px; object-fit: cover; border-radius: 4px; }
.ranking .values { font-size: 12px; } .ranking .values span { margin-right: 8px; }
#legend { font-size: 13px; margin: 8px 0; } #legend ul { list-style: none; padding: 0; margin: 4px 0; }
#legend .swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: middle; }
"""


def build_demo(model_dir: str, bank_dir: str | None = None):
    import gradio as gr

    scorer = Scorer(model_dir, bank_dir)

    def run(files, metadata_csv, age, sex):
        """(ranking HTML, status): a user error (no image, a file that is not one, an unreadable CSV) is a message
        in the status line under the button, never an exception (no traceback in the Space's log, no toast that
        outlives it); the next success clears it."""
        try:
            if not files:
                raise UserError("Upload the patient's lesion images first.")
            paths = [f if isinstance(f, str) else f.name for f in files]
            names = [Path(p).name for p in paths]
            images = [open_image(p) for p in paths]
            rows = read_rows(metadata_csv if isinstance(metadata_csv, (str, type(None))) else metadata_csv.name, names)
            lesions = scorer.score(images, names, rows, float(age) if age else None, sex or None)
        except (UserError, csv.Error, UnicodeDecodeError, ValueError) as error:
            return gr.update(), (f'<p id="error-message" style="color:#b00020;font-weight:bold">⚠ '
                                 f'{html.escape(str(error))}</p>')
        return render_ranking(lesions, scorer.positive_label, scorer.constant(), scorer.bank is not None), ""

    with gr.Blocks(title="SLIMP: one patient's lesions, ranked", analytics_enabled=False) as demo:
        gr.Markdown("# SLIMP: one patient's lesions, ranked\nUpload every lesion image of **one** patient. Each "
                    "lesion is scored next to the patient's other lesions (the ugly-duckling comparison). "
                    f"The score is the probability of **{scorer.positive_label}**. Research software, not a medical device.")
        with gr.Row():
            files = gr.File(label="lesion images", file_count="multiple", file_types=["image"], elem_id="lesion-images")
            metadata_csv = gr.File(label="metadata CSV (optional: a `file` column + metadata columns)", file_types=[".csv"])
        with gr.Row():
            age = gr.Number(label="age (optional; 0 = unknown)", value=0)
            sex = gr.Dropdown(label="sex (optional)", choices=["", "female", "male"], value="")
        button = gr.Button("Score the lesions", variant="primary", elem_id="score")
        status = gr.HTML("", elem_id="status")
        ranking = gr.HTML("", elem_id="ranking")
        button.click(run, inputs=[files, metadata_csv, age, sex], outputs=[ranking, status])
    return demo


class UserError(ValueError):
    """Input the user can fix: shown in the page, not logged as a crash."""


def open_image(path: str) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{Path(path).name} is not an image that can be read") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--model_dir", default=os.environ.get("SLIMP_MODEL"), help="a SLIMPForLesionClassification folder or Hub id")
    parser.add_argument("--bank_dir", default=os.environ.get("SLIMP_BANK"), help="a reference bank (training/extrapolate.py --save_bank)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)), help="the server's port")
    args = parser.parse_args(argv)
    if not args.model_dir:
        parser.error("give --model_dir (or set SLIMP_MODEL)")
    build_demo(args.model_dir, args.bank_dir).launch(server_name="0.0.0.0", server_port=args.port)


if __name__ == "__main__":
    main()
