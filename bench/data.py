"""Data path speed and memory: the ISIC 2024 converter, the loader beside the model it feeds, the metadata
encoding, one loader worker, and what one GPU would need.

    python bench/data.py                                      # the README numbers (about 30 min on 2 cores)
    python bench/data.py --output bench/results/data.json
    python bench/data.py --data_dir /tmp/slimp-bench --keep   # keep the synthetic layout; a rerun reuses it
    python bench/data.py --quick                              # ~400 images, seconds per section: the smoke test

What it measures (JSON to stdout or `--output`, Markdown tables to stderr; the machines are shared, so
read the ratios, each measured side by side in alternating rounds of one run, not the absolute numbers):

1. **Synthetic data** (`bench/data_converter.py`): `--images` images of a synthetic ISIC 2024 Kaggle layout (`train-metadata.csv` +
   `train-image.hdf5`, 130 px JPEGs) from `training.data.synthetic.write_kaggle_layout`. Larger converter
   sizes repeat the layout with new ids (new patients, same JPEGs).
2. **Converter** (`bench/data_converter.py`): `python -m training.prepare_data isic2024 ...` as a subprocess at each of `--sizes`
   (default 5,000, 20,000 and 100,000 rows): rows/s and the subprocess's own peak RSS (VmHWM), split
   into anonymous (heap) and file-backed (memory-mapped Arrow) parts by sampling. Target: the peak at the
   largest size within 10% of the smallest's (flat memory); growth per 1,000 rows is extrapolated to
   ISIC 2024's 401,059.
3. **Loader vs model (tiny preset)**: lesions/s of pretrain.py's input pipeline with 0 and 1 workers
   beside the tiny model's training throughput (the README main job): is the loader the bottleneck?
4. **Metadata encoding** (one thread, as in a worker): pretrain.py's loader (the split encoded once by
   `EncodedMetadata`, per batch a gather and a patient grouping) beside the processor given an Arrow table
   and given row dicts; outputs checked equal.
5. **One loader worker** (one thread) at each of `--worker_resolutions` (130 px: the crops' own size;
   224 px: the release model): decode, one resize, uint8 stack, augmentation parameters, column-wise
   metadata. Also the device half (`BatchTransform`) run on this CPU, the cost a CPU-only run pays in its
   main process.
6. **Release architecture** (ViT-S/16 at 224 px): a training step's lesions/s on this CPU, its FLOPs per
   lesion (torch's `FlopCounterMode`), and a projection for one GPU (`--gpu_peak_tflops` x
   `--gpu_utilization` / FLOPs per lesion): the loader workers it would need at each resolution, and the
   SLICE-3D epoch time with `--gpu_cpu_cores` workers.

The old data path these sections were first compared with (per-value metadata, PIL augmentation in the
worker) is in the git history; `bench/results/data.md` keeps that comparison.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench._common import emit, environment, markdown_table
from bench.data_converter import ISIC2024_ROWS, converter_section, synthetic_layout


@dataclass
class DataBenchArguments:
    images: int = field(default=20000, metadata={"help": "Synthetic images to generate; converter sizes above it tile the layout with new ids."})
    sizes: list[int] = field(default_factory=lambda: [5000, 20000, 100000], metadata={"help": "Converter runs: layouts of N rows (the first N, or the layout tiled)."})
    image_size: int = field(default=130, metadata={"help": "Synthetic image side in pixels (ISIC 2024 crops are ~130 px)."})
    worker_resolutions: list[int] = field(default_factory=lambda: [130, 224], metadata={"help": "Model input sizes of the per-worker loader comparison (130: the crops' own size; 224: the release ViT-S/16)."})
    encode_rows: list[int] = field(default_factory=lambda: [128, 4096], metadata={"help": "Rows per call of the metadata-encoding comparison (128: one training batch)."})
    release_batch: int = field(default=16, metadata={"help": "Lesions per step of the release-architecture training step on this machine."})
    release_steps: int = field(default=3, metadata={"help": "Timed steps of the release-architecture training step."})
    gpu_peak_tflops: float = field(default=790.0, metadata={"help": "Dense bf16 peak of the projected GPU, TFLOP/s (H200: about 790 usable of 989 nominal)."})
    gpu_utilization: float = field(default=0.4, metadata={"help": "Share of the peak a ViT-S training step reaches (model FLOP utilisation) in the projection."})
    gpu_cpu_cores: int = field(default=16, metadata={"help": "CPU cores beside the projected GPU (loader workers available): the H200 machine lent to this project has 16."})
    data_dir: str | None = field(default=None, metadata={"help": "Work folder; default a temporary one, deleted at the end."})
    keep: bool = field(default=False, metadata={"help": "Keep the synthetic layout in the work folder (a rerun with --data_dir and the same --images/--seed/--image_size reuses it)."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic data and the model."})
    model_size: str = field(default="tiny", metadata={"help": "Preset of the model whose training throughput the loader is compared with."})
    vision_model_type: str = field(default="vit", metadata={"help": "vit | dinov2 | resnet | convnext"})
    patients_per_batch: int = field(default=16, metadata={"help": "pretrain.py's default."})
    max_lesions_per_patient: int = field(default=8, metadata={"help": "pretrain.py's default."})
    batches: int = field(default=6, metadata={"help": "Timed batches per contender per round."})
    rounds: int = field(default=3, metadata={"help": "Alternating rounds of the loader/model comparison."})
    threads: int = field(default=1, metadata={"help": "torch threads of the main process (0: torch's default); DataLoader workers use 1."})
    quick: bool = field(default=False, metadata={"help": "~500 images, one round: the smoke test's run."})
    output: str | None = field(default=None, metadata={"help": "Write the JSON here instead of stdout."})

    def __post_init__(self):
        if self.quick:
            self.images, self.sizes = 400, [250, 400, 1000]
            self.batches, self.rounds, self.patients_per_batch = 2, 1, 8
            self.worker_resolutions, self.encode_rows, self.release_batch, self.release_steps = [32, 64], [32, 256], 2, 1
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError(f"--sizes needs at least two positive sizes, got {self.sizes}")


# ----- 3. loader vs model -----
class Contender:
    """Produces `batches` batches per call and returns (lesions, wall s, CPU s of this process)."""

    def __call__(self, batches: int) -> tuple[int, float, float]:
        raise NotImplementedError


class LoaderContender(Contender):
    """A fresh DataLoader iterator per call (a new epoch); the first batch (worker start) is not timed."""

    def __init__(self, dataset, sampler, collator, num_workers: int, consume=None):
        from torch.utils.data import DataLoader

        self.sampler, self.collator, self.consume = sampler, collator, consume
        self.loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers)
        self.epoch = 0

    def __call__(self, batches: int) -> tuple[int, float, float]:
        self.epoch += 1
        self.sampler.set_epoch(self.epoch)
        self.collator.set_epoch(self.epoch)
        iterator = iter(self.loader)
        first = next(iterator)
        if self.consume:
            self.consume(first)
        lesions, wall, cpu = 0, time.perf_counter(), time.process_time()
        for _ in range(batches):
            batch = next(iterator)
            lesions += batch["pixels"].shape[0]
            if self.consume:
                self.consume(batch)
        result = lesions, time.perf_counter() - wall, time.process_time() - cpu
        del iterator  # shuts the worker down
        return result


class TrainContender(Contender):
    """Training steps on batches collated beforehand: the model's own throughput."""

    def __init__(self, step, batches: list[dict]):
        self.step, self.batches, self.position = step, batches, 0

    def __call__(self, batches: int) -> tuple[int, float, float]:
        lesions, wall, cpu = 0, time.perf_counter(), time.process_time()
        for _ in range(batches):
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            self.step(batch)
            lesions += batch["pixels"].shape[0]
        return lesions, time.perf_counter() - wall, time.process_time() - cpu


def training_step(model_size: str, vision_model_type: str, schema: dict, train_split, seed: int):
    """The tiny SLIMP of pretrain.py (preset, schema fitted on the train split) and one AdamW step on a batch."""
    import torch
    from transformers import ViTImageProcessorPil

    from modeling_slimp import SLIMPModel, SLIMPProcessor
    from training.data.collate import BatchTransform
    from training.presets import build_slimp_config

    config = build_slimp_config(schema, train_split, model_size, vision_model_type)
    torch.manual_seed(seed)
    model = SLIMPModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    image_size = getattr(config.vision_config, "image_size", 224)
    processor = SLIMPProcessor(ViTImageProcessorPil(size={"height": image_size, "width": image_size}), config)

    transform = BatchTransform(processor)

    def step(batch: dict) -> None:
        inputs = {k: v for k, v in transform(batch).items() if k != "labels"}  # augmentation on the device
        model(**inputs, return_loss=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, processor


def loader_section(args: DataBenchArguments, dataset_dir: str) -> dict:
    import torch

    from training.data.collate import DecodingCollator
    from training.data.dataset import load_slimp_dataset
    from training.data.sampler import PatientBatchSampler

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    train_split, schema = load_slimp_dataset(dataset_dir, "train")
    step, processor = training_step(args.model_size, args.vision_model_type, schema, train_split, args.seed)

    def sampler():
        return PatientBatchSampler(train_split["patient_id"], args.patients_per_batch, args.max_lesions_per_patient,
                                   seed=args.seed)

    def collator():
        return DecodingCollator(processor, train=True, seed=args.seed)

    warm_collator = collator()
    ready = [warm_collator([train_split[i] for i in rows]) for rows in list(iter(sampler()))[: max(4, args.batches)]]
    contenders = {
        "loader_workers_0": LoaderContender(train_split, sampler(), collator(), 0),
        "loader_workers_1": LoaderContender(train_split, sampler(), collator(), 1),
        "train_precollated": TrainContender(step, ready),
        "train_fed_by_1_worker": LoaderContender(train_split, sampler(), collator(), 1, consume=step),
    }
    names = list(contenders)
    for name in names:  # warm-up: first calls load kernels and caches
        contenders[name](1)
    measured = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            measured[name].append(contenders[name](args.batches))
    result = {"dataset_rows": len(train_split), "patients_per_batch": args.patients_per_batch,
              "max_lesions_per_patient": args.max_lesions_per_patient, "batches_per_round": args.batches,
              "rounds": args.rounds, "torch_threads_main": torch.get_num_threads()}
    for name, calls in measured.items():
        lesions = sum(c[0] for c in calls)
        rates = [c[0] / c[1] for c in calls]
        result[name] = {"lesions": lesions, "lesions_per_s": lesions / sum(c[1] for c in calls),
                        "lesions_per_s_rounds": rates, "lesions_per_cpu_s_main": lesions / max(sum(c[2] for c in calls), 1e-9)}
    train = result["train_precollated"]
    result["ratios"] = {
        "loader_w0_over_train": result["loader_workers_0"]["lesions_per_s"] / train["lesions_per_s"],
        "loader_w0_over_train_cpu": result["loader_workers_0"]["lesions_per_cpu_s_main"] / train["lesions_per_cpu_s_main"],
        "loader_w1_over_train": result["loader_workers_1"]["lesions_per_s"] / train["lesions_per_s"],
        "fed_by_1_worker_over_precollated": result["train_fed_by_1_worker"]["lesions_per_s"] / train["lesions_per_s"],
        "median_round_loader_w1_over_train": statistics.median(
            a / b for a, b in zip(result["loader_workers_1"]["lesions_per_s_rounds"], train["lesions_per_s_rounds"])),
    }
    result["loader_is_bottleneck"] = result["ratios"]["loader_w1_over_train"] < 1.0
    return result


# ----- 4. metadata encoding: encoded once and gathered, or by the processor per batch -----
def alternate(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each contender's call, in alternating rounds (the order rotates each round)."""
    names, times = list(contenders), {name: [] for name in contenders}
    for name in names:  # warm-up
        contenders[name]()
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def metadata_section(args: DataBenchArguments, dataset_dir: str) -> dict:
    """Rows/s of the metadata encoding, one thread, same rows, same output (checked): pretrain.py's loader
    way (the split encoded once by `EncodedMetadata`, then per batch a gather and a patient grouping), an
    Arrow table given to the processor, and row dicts given to the processor."""
    import torch

    from modeling_slimp import SLIMPProcessor
    from training.data.collate import EncodedMetadata
    from training.data.dataset import load_slimp_dataset
    from training.presets import build_slimp_config

    torch.set_num_threads(1)  # a loader worker's
    train_split, schema = load_slimp_dataset(dataset_dir, "train")
    processor = SLIMPProcessor(config=build_slimp_config(schema, train_split))
    table = train_split.remove_columns([c for c in ("image",) if c in train_split.column_names])
    start = time.perf_counter()
    encoded = EncodedMetadata(processor, table)
    out = {"split_rows": len(table), "split_encoded_once_rows_per_s": len(table) / (time.perf_counter() - start)}
    for rows in args.encode_rows:
        positions = list(range(min(rows, len(table))))
        batch = table.select(positions)
        records, arrow = list(batch), batch.with_format("arrow")[:]
        reference = processor.encode_metadata(records)
        for new in (processor.encode_metadata(arrow), encoded.batch(positions)):
            assert all(torch.equal(reference[k].nan_to_num(-7), new[k].nan_to_num(-7)) for k in new), "the encoders disagree"
        repeats = max(1, 20000 // len(records))
        times = alternate({
            "now_encoded_once": lambda: [encoded.batch(positions) for _ in range(repeats)],
            "now_arrow_table": lambda: [processor.encode_metadata(arrow) for _ in range(repeats)],
            "now_row_dicts": lambda: [processor.encode_metadata(records) for _ in range(repeats)],
        }, args.rounds)
        rates = {name: len(records) * repeats / statistics.median(t) for name, t in times.items()}
        # Keyed by the rows asked for; a split smaller than that encodes all its rows (`rows`).
        out[str(rows)] = {"rows": len(records), "rows_per_s": rates,
                          "encoded_once_over_row_dicts": rates["now_encoded_once"] / rates["now_row_dicts"],
                          "arrow_table_over_row_dicts": rates["now_arrow_table"] / rates["now_row_dicts"]}
    return out


# ----- 5. one loader worker: decode + resize + uint8 stack, and the device half on this CPU -----
def worker_section(args: DataBenchArguments, dataset_dir: str) -> dict:
    """Lesions/s one loader worker (one thread) delivers at each model resolution (decode, one resize to the
    model size, uint8 stack, augmentation parameters, column-wise metadata), and the device half it leaves
    to a CPU (`BatchTransform`: the augmentation and normalisation, batched), for CPU-only training."""
    import torch
    from transformers import ViTImageProcessorPil

    from modeling_slimp import SLIMPProcessor
    from training.data.collate import BatchTransform, ColumnBatches, DecodingCollator
    from training.data.dataset import load_slimp_dataset
    from training.data.sampler import PatientBatchSampler
    from training.presets import build_slimp_config

    torch.set_num_threads(1)
    train_split, schema = load_slimp_dataset(dataset_dir, "train")
    batches = list(iter(PatientBatchSampler(train_split["patient_id"], args.patients_per_batch, args.max_lesions_per_patient,
                                            seed=args.seed)))[: args.batches]
    # The batches as the DataLoader fetches them, an Arrow table each (`ColumnBatches.__getitems__`): timed too.
    table = ColumnBatches(train_split)
    lesions = sum(len(b) for b in batches)
    out = {"batches": len(batches), "lesions_per_round": lesions}
    for resolution in args.worker_resolutions:
        config = build_slimp_config(schema, train_split, "small" if resolution >= 128 else "tiny", image_size=resolution)
        processor = SLIMPProcessor(ViTImageProcessorPil(size={"height": resolution, "width": resolution}), config)
        new, transform = DecodingCollator(processor, train=True, seed=args.seed), BatchTransform(processor)
        collated = [new(table.__getitems__(b)) for b in batches]
        times = alternate({"now": lambda: [new(table.__getitems__(b)) for b in batches],
                           "now_device_half_on_cpu": lambda: [transform(b) for b in collated]}, args.rounds)
        rates = {name: lesions / statistics.median(t) for name, t in times.items()}
        out[str(resolution)] = {"lesions_per_s": rates,
                                "now_including_device_half_on_cpu": 1 / (1 / rates["now"] + 1 / rates["now_device_half_on_cpu"])}
    return out


# ----- 6. the release architecture's training step, its FLOPs, and what one GPU would need -----
def release_section(args: DataBenchArguments, dataset_dir: str, workers: dict) -> dict:
    """A training step of the release preset (ViT-S/16 at 224 px, forward + backward + AdamW) on this CPU,
    its FLOPs per lesion (torch's FlopCounterMode: matrix products and attention, 2 FLOPs per multiply-add),
    and the projection for one GPU: lesions/s = peak x utilisation / FLOPs per lesion, the loader workers
    that rate needs at each resolution (today's per-worker rate), and SLICE-3D epoch times."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import ViTImageProcessorPil

    from modeling_slimp import SLIMPModel, SLIMPProcessor
    from training.data.collate import BatchTransform, DecodingCollator
    from training.data.dataset import load_slimp_dataset
    from training.data.sampler import PatientBatchSampler
    from training.presets import build_slimp_config

    torch.set_num_threads(args.threads if args.threads > 0 else os.cpu_count())
    train_split, schema = load_slimp_dataset(dataset_dir, "train")
    resolution = 224 if not args.quick else 32
    config = build_slimp_config(schema, train_split, "small" if not args.quick else "tiny", image_size=resolution)
    torch.manual_seed(args.seed)
    model = SLIMPModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    processor = SLIMPProcessor(ViTImageProcessorPil(size={"height": resolution, "width": resolution}), config)
    collator, transform = DecodingCollator(processor, train=True, seed=args.seed), BatchTransform(processor)
    per_patient = max(1, args.release_batch // 4)
    indices = next(iter(PatientBatchSampler(train_split["patient_id"], 4, per_patient, seed=args.seed)))
    batch = transform(collator([train_split[i] for i in indices]))
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step() -> None:
        model(**inputs, return_loss=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        model(**inputs, return_loss=True).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    n = inputs["pixel_values"].shape[0]
    flops_per_lesion = counter.get_total_flops() / n
    step()  # warm-up
    times = []
    for _ in range(args.release_steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    cpu_rate = n / statistics.median(times)
    gpu_rate = args.gpu_peak_tflops * 1e12 * args.gpu_utilization / flops_per_lesion
    out = {"architecture": f"{config.vision_config.model_type}, hidden {config.vision_config.hidden_size}, "
                           f"{config.vision_config.num_hidden_layers} layers, {resolution} px",
           "parameters": sum(p.numel() for p in model.parameters()), "lesions_per_step": n,
           "cpu_lesions_per_s": cpu_rate, "cpu_threads": torch.get_num_threads(),
           "flops_per_lesion": flops_per_lesion, "gflops_per_lesion": flops_per_lesion / 1e9,
           "cpu_achieved_gflops_per_s": cpu_rate * flops_per_lesion / 1e9,
           "gpu": {"peak_tflops": args.gpu_peak_tflops, "utilization": args.gpu_utilization,
                   "projected_lesions_per_s": gpu_rate, "cpu_cores": args.gpu_cpu_cores}}
    for resolution_name, measured in workers.items():
        if not isinstance(measured, dict) or "lesions_per_s" not in measured:
            continue
        per_worker = measured["lesions_per_s"]["now"]
        needed = math.ceil(gpu_rate / per_worker)
        fed = min(gpu_rate, per_worker * args.gpu_cpu_cores)
        out["gpu"][f"workers_needed_at_{resolution_name}px"] = needed
        out["gpu"][f"lesions_per_s_with_{args.gpu_cpu_cores}_workers_at_{resolution_name}px"] = fed
        out["gpu"][f"slice3d_epoch_minutes_at_{resolution_name}px"] = ISIC2024_ROWS / fed / 60
    out["cpu_loader_over_step"] = {k: v["lesions_per_s"]["now"] / cpu_rate for k, v in workers.items()
                                   if isinstance(v, dict) and "lesions_per_s" in v}
    return out


# ----- report -----
def tables(result: dict) -> str:
    env, arguments = result["environment"], result["arguments"]
    parts = [f"# bench/data.py ({env['date']}, {env['cpu_count']} CPUs, load {env['load_average_1m']}, "
             f"total {result['total_seconds']:.0f} s)"]
    g = result["synthetic"]
    parts.append(f"\n## Synthetic layout: {g['lesions']} images of {arguments['image_size']} px, {g['patients']} patients, "
                 f"{g['hdf5_mib']:.0f} MiB HDF5: {g['seconds']:.0f} s ({g['images_per_s']:.0f} images/s)"
                 + (" [reused from an earlier run]" if g["reused"] else ""))
    c = result["converter"]
    parts.append(f"\n## Converter `python -m training.prepare_data isic2024` (one subprocess per size, its own peak RSS; "
                 f"`--help` alone: {c['import_only']['seconds']:.1f} s, {c['import_only']['peak_rss_mib']:.0f} MiB)\n")
    parts.append(markdown_table(["rows", "wall s", "rows/s", "rows per CPU s", "peak RSS MiB",
                                 "peak above import MiB", "sampled peak anon MiB", "sampled peak file-backed MiB"],
                                [[r["rows"], r["seconds"], r["rows_per_s"], r["rows_per_cpu_s"],
                                  r["peak_rss_mib"], r["peak_above_import_mib"], r["sampled_peak_anon_mib"],
                                  r["sampled_peak_file_mib"]] for r in c["runs"]]))
    parts.append(f"\n{c['rows_ratio']:.0f}x the rows: peak RSS x{c['peak_ratio_largest_over_smallest']:.3f} "
                 f"(above the import baseline: x{c['peak_above_import_ratio']:.2f})")
    growth = [f"{name} {c[f'{name}_growth_kib_per_1000_rows']:.0f} KiB per 1000 rows (linear extrapolation to "
              f"{ISIC2024_ROWS} rows: {c[f'{name}_extrapolated_mib_at_{ISIC2024_ROWS}_rows']:.0f} MiB)"
              for name in ("rss", "anon", "file") if f"{name}_growth_kib_per_1000_rows" in c]
    if growth:
        parts.append("Peak growth: " + "; ".join(growth))
    lo = result["loader"]
    parts.append(f"\n## Loader vs model ({arguments['model_size']} preset, {lo['patients_per_batch']} patients x up to "
                 f"{lo['max_lesions_per_patient']} lesions, {lo['rounds']} alternating rounds of {lo['batches_per_round']} batches)\n")
    parts.append(markdown_table(["contender", "lesions/s (wall)", "lesions per CPU s of the main process"],
                                [[name, lo[name]["lesions_per_s"], "n/a (idle)" if name == "loader_workers_1" else lo[name]["lesions_per_cpu_s_main"]]
                                 for name in ("loader_workers_0", "loader_workers_1", "train_precollated", "train_fed_by_1_worker")]))
    parts.append("\n" + markdown_table(["ratio", "value"], [[k, v] for k, v in lo["ratios"].items()]))
    parts.append(f"\nLoader the bottleneck with 1 worker: {'yes' if lo['loader_is_bottleneck'] else 'no'}")
    m = result["metadata_encoding"]
    parts.append("\n## Metadata encoding, one thread, rows/s\n")
    parts.append(markdown_table(["rows per call", "encoded once, gathered (pretrain.py)", "processor, Arrow table",
                                 "processor, row dicts", "encoded once / row dicts"],
                                [[v["rows"], v["rows_per_s"]["now_encoded_once"], v["rows_per_s"]["now_arrow_table"],
                                  v["rows_per_s"]["now_row_dicts"], v["encoded_once_over_row_dicts"]]
                                 for v in m.values() if isinstance(v, dict)]))
    parts.append(f"\nThe whole train split ({m['split_rows']} rows) encoded once: {m['split_encoded_once_rows_per_s']:.0f} rows/s.")
    w = result["worker"]
    parts.append(f"\n## One loader worker (one thread), lesions/s, {w['batches']} batches of {arguments['patients_per_batch']} "
                 f"patients x up to {arguments['max_lesions_per_patient']} lesions\n")
    parts.append(markdown_table(["model input", "decode + resize + uint8", "device half run on this CPU",
                                 "both on this CPU"],
                                [[f"{k} px", v["lesions_per_s"]["now"], v["lesions_per_s"]["now_device_half_on_cpu"],
                                  v["now_including_device_half_on_cpu"]] for k, v in w.items() if isinstance(v, dict)]))
    r = result["release_step"]
    g = r["gpu"]
    parts.append(f"\n## Release architecture ({r['architecture']}, {r['parameters'] / 1e6:.1f} M parameters): training step and a GPU projection\n")
    rows = [["measured FLOPs per lesion (forward + backward)", f"{r['gflops_per_lesion']:.3g} GFLOP"],
            [f"this CPU ({r['cpu_threads']} threads), lesions/s", r["cpu_lesions_per_s"]],
            ["this CPU, achieved GFLOP/s", r["cpu_achieved_gflops_per_s"]],
            [f"projected GPU lesions/s ({g['peak_tflops']:.0f} TFLOP/s x {g['utilization']:.0%})", g["projected_lesions_per_s"]]]
    for key, value in g.items():
        if key.startswith(("workers_needed", "lesions_per_s_with", "slice3d")):
            rows.append([key.replace("_", " "), value])
    parts.append(markdown_table(["quantity", "value"], rows))
    return "\n".join(parts)


def cleanup(work: Path, temporary: bool, keep_layout: bool) -> None:
    """Delete what this script wrote (all of a temporary folder); with `keep_layout` keep the synthetic layout."""
    if temporary and not keep_layout:
        shutil.rmtree(work, ignore_errors=True)
        return
    for path in work.glob("*"):
        ours = path.name.startswith(("subset-", "converted-")) or path.name.endswith((".log", ".peak.json"))
        if path.is_dir() and (ours or (path.name == "kaggle" and not keep_layout)):
            shutil.rmtree(path, ignore_errors=True)
        elif ours:
            path.unlink()
    if keep_layout:
        print(f"kept the synthetic layout in {work / 'kaggle'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DataBenchArguments).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    work = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="slimp-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = {"environment": environment(args.threads if args.threads > 0 else None), "arguments": asdict(args)}
        result["synthetic"] = synthetic_layout(args, work)
        result["converter"] = converter_section(args, result["synthetic"], work)
        converted = result["converter"]["runs"][1 if len(result["converter"]["runs"]) > 2 else -1]["output_dir"]
        result["loader"] = loader_section(args, converted)
        result["metadata_encoding"] = metadata_section(args, converted)
        result["worker"] = worker_section(args, converted)
        result["release_step"] = release_section(args, converted, result["worker"])
        result["total_seconds"] = time.perf_counter() - start
    finally:
        cleanup(work, temporary=not args.data_dir, keep_layout=args.keep)
    emit(result, tables(result), args.output)
    return result


if __name__ == "__main__":
    main()
