"""Embed one lesion image with its metadata, and classify it with and without the metadata.

    python examples/embed_and_classify.py --model_dir outputs/slimp-synthetic-linear \
        --image lesion.jpg --metadata '{"patient_id": "IP_0001", "age_approx": 60, "sex": "male",
            "anatom_site_general": "posterior torso", "clin_size_long_diam_mm": 5.2, "tbp_lv_areaMM2": 14.0}'

`--model_dir` is any SLIMP folder: a pre-trained encoder (`training/pretrain.py`) gives the embeddings, a
fine-tuned classifier (`training/finetune.py`) also gives the class probabilities (or name one with
`--classifier_dir`). Metadata keys are the dataset's own column names (ISIC names for the ISIC and
synthetic checkpoints); absent keys are treated as missing. Without `--image`, a synthetic lesion and
its metadata are generated, so the script runs offline on the synthetic checkpoints.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
from PIL import Image


from modeling_slimp import SLIMPConfig, SLIMPForLesionClassification, SLIMPModel, SLIMPProcessor
from modeling_slimp.schema_slimp import leaks_label
from training.arguments import require_paths
from training.labels import LabelError, positive_class


def synthetic_lesion(seed: int) -> tuple[Image.Image, dict]:
    """The first lesion of the synthetic generator: image and ISIC-named metadata (label columns dropped)."""
    from training.data.synthetic import generate_records

    record = next(generate_records(1, seed=seed, image_size=64))
    image = Image.open(io.BytesIO(record.pop("image_bytes")))
    return image, {key: value for key, value in record.items() if not leaks_label(key)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="a SLIMP checkpoint folder (encoder or classifier)")
    parser.add_argument("--classifier_dir", help="a fine-tuned SLIMP classifier (default: --model_dir if it is one)")
    parser.add_argument("--image", help="a lesion image (default: a generated synthetic lesion)")
    parser.add_argument("--metadata", default="{}", help="JSON object of metadata, or a path to a JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated lesion")
    args = parser.parse_args(argv)
    require_paths(parser, args, "model_dir", "image")

    if args.image:
        image = Image.open(args.image)
        text = args.metadata if args.metadata.lstrip().startswith("{") else Path(args.metadata).read_text()
        metadata = json.loads(text)
    else:
        image, metadata = synthetic_lesion(args.seed)
        print(f"no --image: using a synthetic lesion ({metadata['isic_id']})")

    classifier_dir = args.classifier_dir
    architectures = SLIMPConfig.from_pretrained(args.model_dir).architectures or []
    if classifier_dir is None and "SLIMPForLesionClassification" in architectures:
        classifier_dir = args.model_dir
    classifier = SLIMPForLesionClassification.from_pretrained(classifier_dir).eval() if classifier_dir else None
    # The encoder: the classifier's own SLIMPModel, else the pre-trained one.
    model = classifier.slimp if classifier is not None else SLIMPModel.from_pretrained(args.model_dir).eval()
    processor = SLIMPProcessor.from_pretrained(classifier_dir or args.model_dir)
    inputs = processor(images=[image], metadata=[metadata], return_tensors="pt")

    with torch.no_grad():
        out = model(**inputs)
    for name in ("image_embeds", "lesion_metadata_embeds", "patient_metadata_embeds", "phenotype_embeds"):
        print(f"{name}: {tuple(getattr(out, name).shape)}")  # L2-normalised, (lesions or patients, projection_dim)
    print(f"image-metadata similarity: {float(out.image_embeds @ out.lesion_metadata_embeds.T):+.3f}")

    if classifier is None:
        print("no classifier head in --model_dir: fine-tune one with training/finetune.py, or pass --classifier_dir")
        return
    with torch.no_grad():
        with_metadata = classifier(**inputs).logits.softmax(-1)[0]
        image_only = classifier(pixel_values=inputs["pixel_values"]).logits.softmax(-1)[0]  # metadata all missing
    labels = classifier.config.id2label
    for name, probabilities in (("image + metadata", with_metadata), ("image only", image_only)):
        print(f"{name}: " + ", ".join(f"{labels[i]} {p:.3f}" for i, p in enumerate(probabilities.tolist())))
    names = [labels[i] for i in range(len(labels))]
    try:  # what training/finetune.py wrote in config.json, else the rule it applies to the label names
        positive = getattr(classifier.config, "positive_label", None) or names[positive_class(names)]
        print(f"positive class: {positive} (its probability is the malignancy score)")
    except LabelError as error:
        print(f"positive class: not named ({error})")


if __name__ == "__main__":
    main()
