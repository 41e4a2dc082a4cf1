"""Export a SLIMP classifier's image-only path to a built-in transformers image classifier (Hub widget).

    python -m training.export_widget --model_dir CLS --output_dir OUT [--atol 1e-4] [--base_model ORG/SLIMP-CLS]

The Hub inference widget runs no custom code, and `pipeline("image-classification")` passes only
`pixel_values`: all metadata missing, each lesion its own patient. On that path the SLIMP classifier is
affine in the backbone's pooled image feature f (N, F):

    logits = W · concat(P f + b, c_lesion, c_patient) + b_cls = A f + c
    A = W[:, :D] @ P                                              (L, F)
    c = W[:, :D] @ b + W[:, D:2D] @ c_lesion + W[:, 2D:] @ c_patient + b_cls   (L,)

where c_lesion / c_patient are the eval-mode features of all-missing metadata (present only when
`config.classifier_features` names them); the patient context of a lesion without other lesions is zero; with
`classifier_representation="tower"` the image block reads f itself (no P, b). So the export is the SLIMP backbone with a single linear head
(A, c): `ViTForImageClassification`, `Dinov2ForImageClassification`, `ResNetForImageClassification` or
`ConvNextForImageClassification`, loadable with `AutoModelForImageClassification.from_pretrained(OUT)` and
no `trust_remote_code`. OUT holds `config.json` (no `auto_map`), `model.safetensors`, the SLIMP folder's
built-in `preprocessor_config.json` and a model card; no code files. The CLI then reloads OUT and checks
its logits against the SLIMP classifier's image-only logits on random pixels (non-zero exit beyond atol).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from modeling_slimp import SLIMPForLesionClassification, SLIMPProcessor
from modeling_slimp.modeling_slimp import vision_feature_size
from training.arguments import ArgumentError, check_source, parse_dataclasses, run_cli
from training.release import is_hub_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WidgetTarget:
    """A built-in classifier that can hold the export.

    model_class: the transformers class; its `base_model` (vit/dinov2/resnet/convnext) takes the SLIMP backbone.
    head: the classifier's `nn.Linear`.
    feature_blocks: how many F-wide blocks the head reads; only the first is the pooled image feature
        (DINOv2's head reads concat(CLS, mean of patch tokens), so its second block gets zero weight).
    """

    model_class: type[PreTrainedModel]
    head: Callable[[PreTrainedModel], nn.Linear]
    feature_blocks: int = 1


# Checked against transformers 5.24: ViT's classifier reads `last_hidden_state[:, 0]` (final-norm CLS, built
# with add_pooling_layer=False); DINOv2's reads cat(CLS, patch mean); ResNet's is Sequential(Flatten, Linear)
# on the average pool; ConvNeXt's is a Linear on the layer-normed average pool. SLIMP reads the same features.
WIDGET_TARGETS: dict[type, WidgetTarget] = {
    ViTConfig: WidgetTarget(ViTForImageClassification, head=lambda model: model.classifier),
    Dinov2Config: WidgetTarget(Dinov2ForImageClassification, head=lambda model: model.classifier, feature_blocks=2),
    ResNetConfig: WidgetTarget(ResNetForImageClassification, head=lambda model: model.classifier[1]),
    ConvNextConfig: WidgetTarget(ConvNextForImageClassification, head=lambda model: model.classifier),
}

# The only weights allowed to differ between the two backbones: poolers the classifiers never read
# (SLIMP removes the ViT pooler; the built-in ViT classifier is built without one).
_POOLER_PREFIX = "pooler."


def widget_target(vision_config) -> WidgetTarget:
    """The export target for a vision config class; a clear error for other backbones."""
    target = WIDGET_TARGETS.get(type(vision_config))
    if target is None:
        supported = ", ".join(cls.__name__ for cls in WIDGET_TARGETS)
        raise ValueError(
            f"Cannot export a SLIMP classifier with a {type(vision_config).__name__} image tower to a built-in "
            f"image classifier; supported vision configs: {supported}."
        )
    return target


@torch.no_grad()
def image_only_head(model: SLIMPForLesionClassification) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (L, F), c (L,)) with image-only logits = f @ Aᵀ + c, f the backbone's pooled feature. Float64.

    Without metadata and without other lesions of the patient (the pipeline's input), the lesion and
    patient parts are the constant features of all-missing metadata and the context part is zero."""
    was_training = model.training
    model.eval()  # metadata feature dropout and classifier dropout off: the constants are the eval-mode ones
    try:
        slimp, sizes = model.slimp, model.part_sizes()
        weight, bias = model.classifier.weight.double(), model.classifier.bias.double()  # (L, sum of parts)
        projected = model.config.classifier_representation == "projection"
        blocks, start = {}, 0
        for part in model.parts:
            blocks[part] = weight[:, start:start + sizes[part]]
            start += sizes[part]
        if projected:
            head_weight = blocks["image"] @ slimp.visual_projection.weight.double()  # (L, F)
            head_bias = bias + blocks["image"] @ slimp.visual_projection.bias.double()
        else:
            head_weight, head_bias = blocks["image"], bias.clone()
        constants = {  # the projected features are the pooler_output of get_*_features, as CLIP's
            "lesion": lambda: slimp.get_lesion_metadata_features(num_lesions=1, return_dict=True).pooler_output
            if projected else slimp.lesion_metadata_tower(num_lesions=1),
            "patient": lambda: slimp.get_patient_metadata_features(num_patients=1, return_dict=True).pooler_output
            if projected else slimp.patient_metadata_tower(num_patients=1),
        }
        for part in ("lesion", "patient"):
            if part in blocks:
                head_bias = head_bias + blocks[part] @ constants[part]()[0].double()  # all-missing metadata
    finally:
        model.train(was_training)
    return head_weight, head_bias


def build_widget_model(model: SLIMPForLesionClassification) -> PreTrainedModel:
    """The built-in classifier with SLIMP's backbone and the folded image-only head (in memory)."""
    target = widget_target(model.config.vision_config)
    config = copy.deepcopy(model.config.vision_config)
    config.id2label = {int(index): label for index, label in model.config.id2label.items()}
    config.label2id = {label: index for index, label in config.id2label.items()}
    config.architectures = [target.model_class.__name__]
    for key in ("auto_map", "problem_type"):  # built-in code only; the softmax/sigmoid choice follows num_labels
        if getattr(config, key, None) is not None:
            setattr(config, key, None)
    dtype = model.classifier.weight.dtype
    widget = target.model_class(config).to(dtype).eval()

    state = model.slimp.vision_model.state_dict()
    missing, unexpected = widget.base_model.load_state_dict(state, strict=False)
    stray = [key for key in missing + unexpected if not key.startswith(_POOLER_PREFIX)]
    if stray:
        raise RuntimeError(f"SLIMP's image tower and {target.model_class.__name__} disagree on weights: {stray[:10]}")
    if missing:  # a built-in pooler SLIMP does not have: the classifier never reads it, keep it defined
        logger.info("Keeping the freshly initialised %s (unused by the classifier).", missing)

    head_weight, head_bias = image_only_head(model)
    features = vision_feature_size(model.config)
    head = target.head(widget)
    with torch.no_grad():
        weight = torch.zeros(model.config.num_labels, target.feature_blocks * features, dtype=torch.float64)
        weight[:, :features] = head_weight  # e.g. DINOv2: CLS half = A, patch-mean half = 0
        head.weight.copy_(weight.to(dtype))
        head.bias.copy_(head_bias.to(dtype))
    return widget


def model_card(model: SLIMPForLesionClassification, widget: PreTrainedModel, base_model: str | None,
               license: str = "other", datasets: list[str] | None = None) -> ModelCard:
    """The export's card: the licence and datasets of the SLIMP classifier it comes from (its own card's),
    `base_model` only when it is a Hub id."""
    labels = ", ".join(f"`{label}`" for label in widget.config.id2label.values())
    base_model = base_model if is_hub_id(base_model) else None
    data = ModelCardData(
        license=license, library_name="transformers", pipeline_tag="image-classification", base_model=base_model,
        datasets=datasets or None, tags=["slimp", "dermatology", "skin-lesion", "medical"],
    )
    source = f"SLIMP lesion classifier `{base_model}`" if base_model else "SLIMP lesion classifier"
    reads = model.config.classifier_features
    caveat = "" if reads == "image" else (
        f"\n\n**Its head was fitted on `{reads}`**, and this export gets the image alone (metadata missing, no patient "
        "context), which it was not fitted on: the classifier card's `test, images only` row scores that use. For a "
        "widget, export a classifier fine-tuned with `--classifier_features image`.")
    content = f"""---
{data.to_yaml()}
---

# SLIMP lesion classifier: image-only export

This is the **image-only export** of the {source}, as a built-in
`{type(widget).__name__}` so that the Hub inference widget and `pipeline("image-classification")` run it
without custom code. Its logits equal the SLIMP classifier's when no metadata is given (every lesion its own
patient, all lesion and patient metadata missing): the SLIMP head and projections are folded into one linear
layer on the `{type(model.config.vision_config).__name__}` backbone. Labels: {labels}.

For predictions that use lesion and patient metadata, load the full {source} with
`trust_remote_code=True` and its `SLIMPProcessor`.{caveat}

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="path/to/this/folder")
print(classifier(Image.new("RGB", (128, 128), (180, 120, 100))))
```

Licence: `{license}`, the licence of the classifier's training data. Not a medical device; research use only.
Exported with `python -m training.export_widget` from the SLIMP repository.
"""
    return ModelCard(content.replace("from transformers import pipeline\n", "from PIL import Image\nfrom transformers import pipeline\n"))


def export_widget(model: SLIMPForLesionClassification, output_dir: str | os.PathLike, image_processor=None,
                  base_model: str | None = None, license: str = "other", datasets: list[str] | None = None) -> PreTrainedModel:
    """Write the built-in image-only classifier, its image processor and a model card to `output_dir`.

    image_processor: a built-in transformers image processor (default: SLIMPProcessor's default for this
        config). base_model: what the card names as base model (default: `model.name_or_path`; give the Hub
        id of the SLIMP classifier before pushing, the Hub expects a model id there).
    Returns the exported model (in memory, eval mode).
    """
    widget = build_widget_model(model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    widget.save_pretrained(output_dir, safe_serialization=True)
    if image_processor is None:
        image_processor = SLIMPProcessor(config=model.config).image_processor
    image_processor.save_pretrained(output_dir)
    base_model = base_model if base_model is not None else (model.name_or_path or None)
    model_card(model, widget, base_model, license, datasets).save(output_dir / "README.md")
    return widget


@torch.no_grad()
def max_logit_difference(model: SLIMPForLesionClassification, widget: PreTrainedModel, batches: int = 3,
                         batch_size: int = 2, seed: int = 0) -> float:
    """Largest |SLIMP image-only logits − widget logits| over random pixel batches."""
    generator = torch.Generator().manual_seed(seed)
    size = getattr(model.config.vision_config, "image_size", 224)
    channels = getattr(model.config.vision_config, "num_channels", 3)
    model.eval()
    widget.eval()
    worst = 0.0
    for _ in range(batches):
        pixel_values = torch.randn(batch_size, channels, size, size, generator=generator)
        # patient_index: each lesion its own patient, the pipeline's path, stated (this script has warned already)
        expected = model(pixel_values=pixel_values.to(model.dtype), patient_index=torch.arange(batch_size)).logits.double()
        actual = widget(pixel_values=pixel_values.to(widget.dtype)).logits.double()
        worst = max(worst, (expected - actual).abs().max().item())
    return worst


def card_metadata(folder: str) -> dict:
    """The YAML front matter of a model folder's README.md ({} when there is none)."""
    card = Path(folder) / "README.md"
    if not card.is_file() or not card.read_text().startswith("---"):
        return {}
    return yaml.safe_load(card.read_text().split("---", 2)[1]) or {}


@dataclass
class ExportWidgetArguments:
    model_dir: str = field(metadata={"help": "Folder (or Hub id) of the saved SLIMPForLesionClassification."})
    output_dir: str = field(metadata={"help": "Where to write the built-in image-only classifier."})
    atol: float = field(default=1e-4, metadata={"help": "Largest allowed logit difference in the check."})
    base_model: str | None = field(
        default=None, metadata={"help": "Hub id of the SLIMP classifier, named in the card as base_model (a local path is left out)."}
    )

    def __post_init__(self):
        if not Path(self.model_dir).is_dir() and not is_hub_id(self.model_dir):
            raise ArgumentError(f"--model_dir {self.model_dir} is neither a folder nor a Hub id (org/name)")
        if not self.atol > 0:
            raise ArgumentError(f"--atol must be > 0, got {self.atol}")


def main(args: ExportWidgetArguments | list[str] | None = None) -> float:
    """Export, reload without SLIMP code, verify; returns the max logit difference. Exits with status 1 beyond atol."""
    if not isinstance(args, ExportWidgetArguments):
        (args,) = parse_dataclasses((ExportWidgetArguments,), args)
    check_source(args.model_dir, "--model_dir", "model")
    model = SLIMPForLesionClassification.from_pretrained(args.model_dir).eval()
    if model.config.classifier_features != "image":
        logger.warning("%s reads %s; the widget gets images only (metadata missing, no patient context), which its head "
                       "was not fitted on: see the 'test, images only' row of its model card. For a widget, export a "
                       "classifier fine-tuned with --classifier_features image.", args.model_dir, model.config.classifier_features)
    image_processor = AutoImageProcessor.from_pretrained(args.model_dir)
    card = card_metadata(args.model_dir)
    export_widget(model, args.output_dir, image_processor=image_processor, base_model=args.base_model or args.model_dir,
                  license=card.get("license", "other"), datasets=card.get("datasets"))

    reloaded = AutoModelForImageClassification.from_pretrained(args.output_dir)
    difference = max_logit_difference(model, reloaded)
    if not difference <= args.atol:  # also catches NaN
        raise SystemExit(  # exit status 1, the message on stderr
            f"Export check failed: {args.output_dir} ({type(reloaded).__name__}) differs from the SLIMP classifier "
            f"{args.model_dir}: max |logit difference| = {difference:.3g} > atol {args.atol:.3g}."
        )
    logger.info("Exported %s to %s; max |Δlogit| = %.3g (atol %.3g).",
                type(reloaded).__name__, args.output_dir, difference, args.atol)
    return difference


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main)
