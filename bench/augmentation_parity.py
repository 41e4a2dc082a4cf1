"""Is the quality benchmark no worse with the data path of this round? The same SLIMP pre-training run twice,
side by side, differing only in where and how the images are augmented:

- `before`: the old worker-side PIL augmentation (`bench/_legacy.py`: random-resized crop and resize to the
  model size per image, flips, quarter turns, rotation, PIL colour jitter, then the image processor's
  second resize and normalisation), fed to the model as normalised floats;
- `now`: today's path (decode, one resize, uint8 stack in the worker; batched augmentation and
  normalisation on the training device, `training/data/augment.py`).

Everything else is the same: dataset, seed, batches, metadata encoding (equal by `tests/test_bench.py`),
model, schedule. Each checkpoint then goes through `training/evaluate.py` (whole patients, probe C picked on
validation) and the test AUROC / pAUC of its probes are printed side by side.

    python bench/augmentation_parity.py --output bench/results/augmentation_parity.json
    python bench/augmentation_parity.py --dataset_dir outputs/bench-quality/data/synthetic-p1000-seed0 ...   # the quality bench's data
    python bench/augmentation_parity.py --max_steps 2 --patients 24 --output /tmp/parity.json   # seconds
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._legacy import LegacyTrainCollator, legacy_augment  # noqa: E402
from modeling_slimp.processing_slimp import to_rgb  # noqa: E402
from training import evaluate, prepare_data, pretrain  # noqa: E402
from training.data.collate import PARAMETERS, PIXELS, SSL_PARAMETERS, ArrowBatch, BatchTransform, SLIMPCollator  # noqa: E402

FEATURE_SETS = ["image", "image+context", "image+metadata", "image+metadata+context"]


class LegacyPixelCollator:
    """Today's train collator for everything but the pixels, which are the old PIL-augmented, processor-
    normalised floats (one view; the SimCLR variants are not compared here)."""

    def __init__(self, inner: SLIMPCollator):
        self.inner, self.legacy = inner, LegacyTrainCollator(inner.processor, inner.seed)

    def __getattr__(self, name):  # row_columns, processor, ... of the real collator
        return getattr(self.inner, name)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)
        self.legacy.set_epoch(epoch)

    def __call__(self, rows):
        batch = self.inner(rows)
        table = rows.table if isinstance(rows, ArrowBatch) else rows
        images, ids = table.column("image").to_pylist(), table.column("image_id").to_pylist()
        views = []
        for value, image_id in zip(images, ids):
            image = Image.open(io.BytesIO(value["bytes"])) if isinstance(value, dict) else value
            image.load()
            views.append(legacy_augment(to_rgb(image), self.legacy.size, self.legacy._generator(image_id)))
        batch[PIXELS] = self.inner.processor.image_processor(images=views, return_tensors="pt")["pixel_values"]
        batch.pop(PARAMETERS, None)
        batch.pop(SSL_PARAMETERS, None)
        return batch


class LegacyAwareTransform(BatchTransform):
    """Float pixels (already augmented and normalised in the worker) pass through; uint8 batches (validation)
    take today's device half."""

    def __call__(self, batch, device=None):
        if batch[PIXELS].is_floating_point():
            batch = {key: value.to(device) if device is not None else value for key, value in batch.items()}
            batch["pixel_values"] = batch.pop(PIXELS)
            return batch
        return super().__call__(batch, device)


def legacy_collator(processor, train: bool = False, **kwargs):
    collator = SLIMPCollator(processor, train=train, **kwargs)
    return LegacyPixelCollator(collator) if train else collator


def run(name: str, argv: list[str], legacy: bool) -> float:
    original = pretrain.SLIMPCollator, pretrain.BatchTransform
    if legacy:
        pretrain.SLIMPCollator, pretrain.BatchTransform = legacy_collator, LegacyAwareTransform
    try:
        start = time.perf_counter()
        pretrain.main(argv)
        return time.perf_counter() - start
    finally:
        pretrain.SLIMPCollator, pretrain.BatchTransform = original


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="outputs/bench-parity", help="datasets and checkpoints")
    parser.add_argument("--dataset_dir", default=None, help="a converted dataset (default: build the synthetic one)")
    parser.add_argument("--patients", type=int, default=1000, help="patients of the synthetic dataset (the quality bench's)")
    parser.add_argument("--max_steps", type=int, default=300, help="pre-training steps (the quality bench's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset and of both runs")
    parser.add_argument("--output", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    dataset = Path(args.dataset_dir) if args.dataset_dir else work / f"synthetic-p{args.patients}-seed{args.seed}"
    if not args.dataset_dir and not (dataset / "dataset_dict.json").is_file():
        prepare_data.main(["synthetic", "--patients", str(args.patients), "--seed", str(args.seed), "--output-dir", str(dataset)])
    results = {"arguments": vars(args), "runs": {}}
    for name, legacy in (("before", True), ("now", False)):
        model_dir = work / f"{name}-seed{args.seed}"
        seconds = run(name, ["--dataset_dir", str(dataset), "--output_dir", str(model_dir), "--model_size", "tiny",
                             "--image_size", "64", "--max_steps", str(args.max_steps), "--warmup_steps", str(min(50, args.max_steps // 2)),
                             "--learning_rate", "0.0005", "--patients_per_batch", "16", "--max_lesions_per_patient", "8",
                             "--num_workers", "1", "--seed", str(args.seed), "--eval_steps", "0", "--save_steps", "0",
                             "--linear_probe", "false", "--lesion_loss_weight", "0.5", "--patient_aggregation", "mean"], legacy)
        evaluated = evaluate.main(["--model_dir", str(model_dir), "--dataset_dir", str(dataset), "--output_dir",
                                   str(model_dir / "eval"), "--seeds", str(args.seed), "--shots", "10",
                                   "--feature_sets", *FEATURE_SETS])
        probe = evaluated["linear_probe"]["test"]
        results["runs"][name] = {"pretrain_seconds": seconds, **{
            f"{feature_set}/{metric}": probe[feature_set][metric]["mean"]
            for feature_set in FEATURE_SETS for metric in ("auroc", "pauc_80tpr")}}
    before, now = results["runs"]["before"], results["runs"]["now"]
    results["now_minus_before"] = {key: now[key] - before[key] for key in now if key != "pretrain_seconds"}
    lines = ["| probe (test) | before (PIL, in the worker) | now (batched, on the device) | now − before |", "|---|---|---|---|"]
    lines += [f"| {key} | {before[key]:.4f} | {now[key]:.4f} | {results['now_minus_before'][key]:+.4f} |"
              for key in results["now_minus_before"]]
    print("\n".join(lines), file=sys.stderr)
    text = json.dumps(results, indent=1)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    else:
        print(text)
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
