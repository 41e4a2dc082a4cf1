"""Speed and memory of SLIMP next to its image backbone alone (bench/README.md has the measured tables).

    python bench/speed.py --profile                         # tiny and small, CPU, fp32: the README numbers
    python bench/speed.py --model_size small --sections train --repeats 15 --output speed.json
    python bench/speed.py --model_size tiny --vision_model_type resnet --lesions_per_step 128
    python bench/speed.py --device cuda --dtype bfloat16 --lesions_per_step 256 --threads 0
    python bench/speed.py --quick                           # seconds: the smoke test's run

Sections (`--sections`, default all but `profile`):

- `train`: one optimizer step (forward + backward + AdamW) of full SLIMP (image tower, both metadata
  towers, aggregation, nested loss) vs the image tower alone with a plain CLIP-style loss (same backbone
  + a projection, symmetric InfoNCE against a learned embedding table: the cheapest image-only
  contrastive step), same lesions per step, alternating. Ratio = SLIMP step time / backbone step time,
  beside the ratio of their FLOPs (load-independent). On CUDA, also the host syncs of each step.
- `inference`: embedding throughput under `torch.inference_mode` of the backbone alone, SLIMP
  `get_image_features`, SLIMP `forward` (all features, no loss) and SLIMP `forward(return_loss=True)`
  (what inference cost before the loss moved behind `return_loss`), alternating.
- `memory`: one subprocess per contender; its peak RSS is reset once the model and batch are built
  (`bench._common.reset_peak_rss`), so peak - resident = what two steps need (activations, gradients,
  optimizer state); on CUDA `torch.cuda.max_memory_allocated`.
- `scaling`: the loss + aggregation alone (no towers; random embeddings with requires_grad), forward +
  backward, against lesions per batch (fixed ~8 lesions per patient) and patients per batch (fixed
  lesions), for mean and attention pooling, plus a skewed batch (one patient with 3/4 of the lesions)
  against equal patients; aggregation alone beside it. All cases alternate in one loop.
- `profile` (`--profile`): torch.profiler of the SLIMP training step: top ops by self time and the time
  spent in each SLIMP module's forward.

JSON goes to stdout (or `--output`), Markdown tables to stderr. Times are medians of wall and CPU time;
on a shared CPU read the ratios (CPU time is the headline there), not the absolute times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


from bench._common import (
    alternate,
    emit,
    environment,
    maxrss_mib,
    ratio,
    reset_peak_rss,
    run_json_subprocess,
    summary,
)
from bench.speed_report import INFERENCE_CONTENDERS, SECTIONS, TRAIN_CONTENDERS, tables
from modeling_slimp import SLIMPConfig, SLIMPModel
from modeling_slimp import modeling_slimp as modeling
from modeling_slimp.losses import clamped_logit_scale, nested_contrastive_loss, symmetric_infonce
from modeling_slimp.modeling_slimp import pooled_image_feature, uses_cls_token, vision_feature_size
from training.presets import build_slimp_config
from training.data.sources import ISIC2024



@dataclass
class SpeedArguments:
    model_size: list[str] = field(default_factory=lambda: ["tiny", "small"], metadata={"help": "Presets to measure: tiny and/or small (the release architecture, 224 px)."})
    vision_model_type: str = field(default="vit", metadata={"help": "vit | dinov2 | resnet | convnext"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 (autocast)"})
    lesions_per_step: int | None = field(default=None, metadata={"help": "N, lesions per training/inference batch; default 64 for tiny (pretrain.py's batches hold 16 patients x up to 8), 16 for small."})
    patients_per_step: int | None = field(default=None, metadata={"help": "P; default N // 4 (ragged: 1 to many lesions each)."})
    repeats: int | None = field(default=None, metadata={"help": "Timed rounds per contender (after warmup); default 15 for tiny, 9 for small."})
    warmup: int = field(default=1, metadata={"help": "Untimed calls per contender first."})
    threads: int = field(default=1, metadata={"help": "torch threads (0: torch's default). 1 is steadier on a shared CPU."})
    sections: list[str] = field(default_factory=lambda: ["train", "inference", "memory", "scaling"], metadata={"help": f"Any of {SECTIONS}."})
    profile: bool = field(default=False, metadata={"help": "Also profile the SLIMP training step (same as adding 'profile' to --sections)."})
    scaling_lesions: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096], metadata={"help": "Lesions per batch for the scaling table (8 lesions per patient)."})
    scaling_patients: list[int] = field(default_factory=lambda: [8, 64, 256, 1024], metadata={"help": "Patients per batch at a fixed 1024 lesions."})
    scaling_projection_dim: int = field(default=256, metadata={"help": "D of the scaling section (release: 256)."})
    scaling_repeats: int = field(default=5, metadata={"help": "Timed repeats per scaling point (median reported)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and inputs."})
    quick: bool = field(default=False, metadata={"help": "A seconds-long run of every section (smoke test)."})
    output: str | None = field(default=None, metadata={"help": "Write the JSON here instead of stdout."})
    memory_worker: str | None = field(default=None, metadata={"help": "Internal: measure one contender's peak memory and print JSON."})

    def __post_init__(self):
        if self.quick:
            self.model_size = ["tiny"]
            self.lesions_per_step = self.lesions_per_step or 8
            self.repeats, self.warmup, self.scaling_repeats = self.repeats or 2, 1, 2
            self.scaling_lesions, self.scaling_patients = [64, 256], [8, 64]
        if self.profile and "profile" not in self.sections:
            self.sections = [*self.sections, "profile"]
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise ValueError(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype}")


# ----- models and batches -----
def preset_config(model_size: str, vision_model_type: str, seed: int = 0, **overrides) -> SLIMPConfig:
    """The preset SLIMPConfig of `training.presets`, with the ISIC 2024 metadata schema fitted on random rows."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = 64
    frame = {"patient_id": [f"p{i}" for i in range(rows)]}  # a patient per row: 5+ patients per category (k)
    for column in ISIC2024.lesion_numerical + ISIC2024.patient_numerical:
        frame[column] = rng.normal(10.0, 3.0, rows)
    for column in ISIC2024.lesion_categorical + ISIC2024.patient_categorical:
        frame[column] = [f"{column}-{k}" for k in rng.integers(0, 5, rows)]
    schema = {"lesion": {"numerical": list(ISIC2024.lesion_numerical), "categorical": list(ISIC2024.lesion_categorical)},
              "patient": {"numerical": list(ISIC2024.patient_numerical), "categorical": list(ISIC2024.patient_categorical)},
              "label": {"names": ["benign", "malignant"]}}
    return build_slimp_config(schema, pd.DataFrame(frame), model_size, vision_model_type, **overrides)


def ragged_patient_index(num_lesions: int, num_patients: int, generator: torch.Generator) -> torch.Tensor:
    """(N,) patient of each lesion: every patient has >= 1 lesion, heavy-tailed counts, shuffled order."""
    if not 1 <= num_patients <= num_lesions:
        raise ValueError(f"need 1 <= patients ({num_patients}) <= lesions ({num_lesions})")
    weights = torch.empty(num_patients).log_normal_(0.0, 1.0, generator=generator)
    extra = torch.multinomial(weights, num_lesions - num_patients, replacement=True, generator=generator) \
        if num_lesions > num_patients else torch.zeros(0, dtype=torch.long)
    index = torch.cat([torch.arange(num_patients), extra])
    return index[torch.randperm(num_lesions, generator=generator)]


def random_batch(config: SLIMPConfig, num_lesions: int, num_patients: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs of N lesions from P patients; 10% of metadata values missing."""
    generator = torch.Generator().manual_seed(seed)

    def metadata(metadata_config, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = torch.tensor(metadata_config.numerical_mean), torch.tensor(metadata_config.numerical_std)
        numerical = torch.randn(rows, metadata_config.num_numerical, generator=generator) * std + mean
        numerical[torch.rand(numerical.shape, generator=generator) < 0.1] = float("nan")
        sizes = [len(v) + 1 for v in metadata_config.categorical_features.values()]
        categorical = torch.stack([torch.randint(0, s, (rows,), generator=generator) for s in sizes], dim=1)
        return numerical, categorical

    size = getattr(config.vision_config, "image_size", 224)
    lesion_numerical, lesion_categorical = metadata(config.lesion_metadata_config, num_lesions)
    patient_numerical, patient_categorical = metadata(config.patient_metadata_config, num_patients)
    return {
        "pixel_values": torch.randn(num_lesions, 3, size, size, generator=generator),
        "lesion_numerical_values": lesion_numerical, "lesion_categorical_ids": lesion_categorical,
        "patient_numerical_values": patient_numerical, "patient_categorical_ids": patient_categorical,
        "patient_index": ragged_patient_index(num_lesions, num_patients, generator),
    }


class BackboneCLIP(nn.Module):
    """The baseline: SLIMP's image tower alone (same config, same pooled feature) + a projection, trained
    with symmetric InfoNCE against a learned embedding table (one row per lesion of the batch)."""

    def __init__(self, config: SLIMPConfig, num_targets: int):
        super().__init__()
        from transformers import AutoModel

        self.vision_model = AutoModel.from_config(config.vision_config)
        if uses_cls_token(config.vision_config) and getattr(self.vision_model, "pooler", None) is not None:
            self.vision_model.pooler = None  # as in SLIMPModel: the feature is the final-norm [CLS]
        self.vision_config, self.max_logit_scale = config.vision_config, config.max_logit_scale
        self.visual_projection = nn.Linear(vision_feature_size(config), config.projection_dim)
        self.targets = nn.Embedding(num_targets, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.vision_model(pixel_values=pixel_values)
        return self.visual_projection(pooled_image_feature(self.vision_config, output))  # (N, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)
        targets = F.normalize(self.targets.weight[: pixel_values.shape[0]], dim=-1)
        return symmetric_infonce(image, targets, clamped_logit_scale(self.logit_scale, self.max_logit_scale))[0]


def autocast(args: SpeedArguments):
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)


DEFAULT_LESIONS_PER_STEP = {"tiny": 64, "small": 16, "base": 16}
DEFAULT_REPEATS = {"tiny": 15, "small": 9, "base": 5}


def lesions_per_step(args: SpeedArguments, model_size: str) -> int:
    return args.lesions_per_step or DEFAULT_LESIONS_PER_STEP[model_size]


def repeats(args: SpeedArguments, model_size: str) -> int:
    return args.repeats or DEFAULT_REPEATS[model_size]


def step_flops(step) -> int:
    """Matmul/conv/attention FLOPs of one call of `step` (forward + backward; elementwise ops and the
    optimizer are not counted): a machine-independent cost, unlike the timings. Attention runs on the
    math backend here, whose matmuls the counter sees (it does not know the fused CPU kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def num_patients(args: SpeedArguments, num_lesions: int) -> int:
    return args.patients_per_step or max(2, num_lesions // 4)


def build_train_step(name: str, config: SLIMPConfig, batch: dict, args: SpeedArguments):
    """A closure running one optimizer step of contender `name`, and its model."""
    torch.manual_seed(args.seed)
    model = SLIMPModel(config) if name == "slimp" else BackboneCLIP(config, batch["pixel_values"].shape[0])
    model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        with autocast(args):
            loss = model(**batch, return_loss=True).loss if name == "slimp" else model(batch["pixel_values"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def build_inference_step(name: str, config: SLIMPConfig, batch: dict, args: SpeedArguments, models: dict | None = None):
    """A closure embedding the batch under inference_mode; `models` shares built models between contenders."""
    models = models if models is not None else {}
    kind = "backbone" if name == "backbone" else "slimp"
    if kind not in models:
        torch.manual_seed(args.seed)
        model = BackboneCLIP(config, 1) if kind == "backbone" else SLIMPModel(config)
        models[kind] = model.to(args.device).eval()
    model = models[kind]

    def step():
        with torch.inference_mode(), autocast(args):
            if name == "slimp_full":
                return model(**batch)
            if name == "slimp_full_with_loss":
                return model(**batch, return_loss=True)
            return model.get_image_features(batch["pixel_values"])

    return step


def primary_measure(args: SpeedArguments) -> str:
    """CPU time on the CPU (steadier on a shared machine, see bench/_common.py), wall time on a GPU."""
    return "cpu" if args.device == "cpu" else "wall"


def primary_ratio(ratios: dict, args: SpeedArguments) -> float:
    return ratios["ratio_of_medians_cpu" if primary_measure(args) == "cpu" else "ratio_of_medians"]


def with_throughput(timing: dict, lesions: int) -> dict:
    return {**timing, "lesions_per_s": lesions / timing["median_s"], "lesions_per_cpu_s": lesions / timing["median_cpu_s"]}


def to_device(batch: dict, device: str) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


# ----- sections -----
def train_section(args: SpeedArguments, model_size: str) -> dict:
    config = preset_config(model_size, args.vision_model_type, args.seed)
    n = lesions_per_step(args, model_size)
    batch = to_device(random_batch(config, n, num_patients(args, n), args.seed), args.device)
    steps, parameters = {}, {}
    for name in TRAIN_CONTENDERS:
        steps[name], model = build_train_step(name, config, batch, args)
        parameters[name] = sum(p.numel() for p in model.parameters())
    flops = {name: step_flops(steps[name]) for name in TRAIN_CONTENDERS}
    times = alternate(steps, repeats(args, model_size), args.warmup, args.device)
    result = {"lesions_per_step": n, "patients_per_step": num_patients(args, n), "parameters": parameters,
              "flops": flops, "flop_ratio": flops["slimp"] / flops["backbone"], "primary_measure": primary_measure(args)}
    for name in TRAIN_CONTENDERS:
        result[name] = with_throughput(summary(times[name]), n)
    result["slimp_over_backbone"] = ratio(times["slimp"], times["backbone"])
    result["primary_ratio"] = primary_ratio(result["slimp_over_backbone"], args)
    if args.device.startswith("cuda"):
        result["host_syncs_per_step"] = {name: count_host_syncs(steps[name]) for name in TRAIN_CONTENDERS}
    result["overhead_target_met"] = result["primary_ratio"] <= 1.10
    return result


def count_host_syncs(step) -> int:
    """Synchronizing CUDA calls (e.g. `.item()`, CUDA `bincount`) in one call of `step`, as counted by
    torch's sync debug mode. The backbone contender's count is the reference for SLIMP's."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def inference_section(args: SpeedArguments, model_size: str) -> dict:
    config = preset_config(model_size, args.vision_model_type, args.seed)
    n = lesions_per_step(args, model_size)
    batch = to_device(random_batch(config, n, num_patients(args, n), args.seed), args.device)
    models: dict = {}
    steps = {name: build_inference_step(name, config, batch, args, models) for name in INFERENCE_CONTENDERS}
    times = alternate(steps, repeats(args, model_size), args.warmup, args.device)
    result = {"lesions_per_step": n, "primary_measure": primary_measure(args)}
    for name in INFERENCE_CONTENDERS:
        result[name] = with_throughput(summary(times[name]), n)
    for name in ("slimp_image", "slimp_full"):
        result[f"{name}_over_backbone"] = ratio(times[name], times["backbone"])
        result[f"{name}_over_backbone"]["primary"] = primary_ratio(result[f"{name}_over_backbone"], args)
    result["slimp_full_over_with_loss"] = ratio(times["slimp_full"], times["slimp_full_with_loss"])
    result["slimp_full_over_with_loss"]["primary"] = primary_ratio(result["slimp_full_over_with_loss"], args)
    result["inference_no_slower_than_before"] = result["slimp_full_over_with_loss"]["primary"] <= 1.0
    return result


def measure_step_memory(step, device: str, calls: int = 2) -> dict:
    """Peak memory of `calls` calls of `step` above what is resident before them (see the module docstring)."""
    import gc

    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        reset = reset_peak_rss()
        before = maxrss_mib()
    for _ in range(calls):
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = maxrss_mib()
    measure = "cuda_max_memory_allocated" if cuda else ("VmHWM after reset" if reset else "maxrss")
    return {"measure": measure, "before_step_mib": before, "peak_mib": peak, "step_mib": peak - before}


def memory_worker(args: SpeedArguments) -> dict:
    """In a fresh process: peak memory of one contender's steps."""
    model_size, name = args.model_size[0], args.memory_worker
    config = preset_config(model_size, args.vision_model_type, args.seed)
    n = lesions_per_step(args, model_size)
    batch = to_device(random_batch(config, n, num_patients(args, n), args.seed), args.device)
    if name.startswith("train_"):
        step, _ = build_train_step(name.removeprefix("train_"), config, batch, args)
    else:
        step = build_inference_step(name.removeprefix("infer_"), config, batch, args)
    return {"contender": name, **measure_step_memory(step, args.device)}


def worker_command(args: SpeedArguments, model_size: str, worker: str, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--model_size", model_size, "--memory_worker", worker,
            "--vision_model_type", args.vision_model_type, "--device", args.device, "--dtype", args.dtype,
            "--lesions_per_step", str(lesions_per_step(args, model_size)), "--threads", str(args.threads), "--seed", str(args.seed),
            *(["--patients_per_step", str(args.patients_per_step)] if args.patients_per_step else []), *(extra or [])]


def memory_section(args: SpeedArguments, model_size: str) -> dict:
    workers = [f"train_{c}" for c in TRAIN_CONTENDERS] + [f"infer_{c}" for c in INFERENCE_CONTENDERS]
    if args.quick:  # in-process (the high-water mark is reset before each): seconds instead of a minute of imports
        result = {name: memory_worker(dataclasses.replace(args, model_size=[model_size], memory_worker=name))
                  for name in workers}
    else:
        result = {name: run_json_subprocess(worker_command(args, model_size, name)) for name in workers}
    result["train_slimp_over_backbone_step_mib"] = result["train_slimp"]["step_mib"] / max(result["train_backbone"]["step_mib"], 1e-9)
    result["train_slimp_over_backbone_peak_mib"] = result["train_slimp"]["peak_mib"] / result["train_backbone"]["peak_mib"]
    result["infer_full_over_backbone_peak_mib"] = result["infer_slimp_full"]["peak_mib"] / result["infer_backbone"]["peak_mib"]
    return result


# ----- scaling of the loss + aggregation alone -----
class LossAggregationStep:
    """Forward + backward of SLIMP's aggregation (and loss) on random projected embeddings (N, D), (P, D)."""

    def __init__(self, model: SLIMPModel, num_lesions: int, num_patients: int, seed: int, device: str,
                 with_loss: bool = True, patient_index: torch.Tensor | None = None):
        generator = torch.Generator().manual_seed(seed)
        dim = model.config.projection_dim
        self.model, self.with_loss, self.num_patients = model, with_loss, num_patients
        self.image = torch.randn(num_lesions, dim, generator=generator).to(device).requires_grad_()
        self.lesion = torch.randn(num_lesions, dim, generator=generator).to(device).requires_grad_()
        self.patient = torch.randn(num_patients, dim, generator=generator).to(device).requires_grad_()
        if patient_index is None:
            patient_index = ragged_patient_index(num_lesions, num_patients, generator)
        self.patient_index = patient_index.to(device)

    def __call__(self) -> None:
        model = self.model
        image, lesion = F.normalize(self.image, dim=-1), F.normalize(self.lesion, dim=-1)
        phenotype = model.aggregate_phenotype(image, lesion, self.patient_index, self.num_patients)  # (P, D)
        if self.with_loss:
            lesion_scale, patient_scale = model.logit_scales()
            loss = nested_contrastive_loss(image, lesion, F.normalize(phenotype, dim=-1), F.normalize(self.patient, dim=-1),
                                           lesion_scale, patient_scale, lesion_loss_weight=model.config.lesion_loss_weight).loss
        else:
            loss = phenotype.sum()
        loss.backward()
        for tensor in (self.image, self.lesion, self.patient, *model.parameters()):
            tensor.grad = None


def scaling_models(args: SpeedArguments) -> dict[str, SLIMPModel]:
    models = {}
    for aggregation in ("mean", "attention"):
        config = preset_config("tiny", "vit", args.seed, patient_aggregation=aggregation)
        config.projection_dim = args.scaling_projection_dim  # only D matters here; the towers are unused
        torch.manual_seed(args.seed)
        models[aggregation] = SLIMPModel(config).to(args.device).train()
    return models


def scaling_cases(args: SpeedArguments) -> list[dict]:
    """(sweep, lesions, patients, skewed) of every measured batch shape."""
    cases = [{"sweep": "lesions", "lesions": n, "patients": max(2, n // 8)} for n in args.scaling_lesions]
    fixed = 1024 if not args.quick else 256
    cases += [{"sweep": "patients", "lesions": fixed, "patients": p} for p in args.scaling_patients if p <= fixed]
    # One patient with 3/4 of the lesions, the rest singletons: padding to the largest patient would cost
    # patients x 768 rows here instead of 1024. Compared with the uniform batch of the same P.
    skew_patients = fixed // 4 + 1
    cases.append({"sweep": "skewed", "lesions": fixed, "patients": skew_patients})
    cases.append({"sweep": "uniform", "lesions": fixed, "patients": skew_patients})
    return cases


def case_patient_index(case: dict) -> torch.Tensor | None:
    n, p = case["lesions"], case["patients"]
    if case["sweep"] == "skewed":
        return torch.cat([torch.zeros(n - p + 1, dtype=torch.long), torch.arange(1, p)])
    if case["sweep"] == "uniform":
        return torch.arange(n) * p // n  # near-equal contiguous groups
    return None


def scaling_section(args: SpeedArguments) -> dict:
    models = scaling_models(args)
    cases = scaling_cases(args)
    steps, keys = {}, []
    for i, case in enumerate(cases):
        for aggregation, model in models.items():
            for part in ("aggregation", "loss+aggregation"):
                key = f"{case['sweep']}/N={case['lesions']}/P={case['patients']}/{aggregation}/{part}"
                steps[key] = LossAggregationStep(model, case["lesions"], case["patients"], args.seed + i, args.device,
                                                 with_loss=part == "loss+aggregation", patient_index=case_patient_index(case))
                keys.append((key, case, aggregation, part))
    times = alternate(steps, args.scaling_repeats, warmup=1, device=args.device)
    rows = []
    for key, case, aggregation, part in keys:
        timing = summary(times[key])
        median = timing["median_cpu_s" if primary_measure(args) == "cpu" else "median_s"]
        rows.append({**case, "aggregation": aggregation, "part": part, "median_s": timing["median_s"],
                     "median_cpu_s": timing["median_cpu_s"], "us_per_lesion": 1e6 * median / case["lesions"],
                     "measure": primary_measure(args)})
    memory_rows = []
    if "memory" in args.sections:  # one fresh process for all cases, the peak reset before each
        memory_rows = (scaling_memory_worker(args) if args.quick
                       else run_json_subprocess(worker_command(args, "tiny", "scaling",
                                                               ["--scaling_projection_dim", str(args.scaling_projection_dim)]))["cases"])
    growth = []  # time(4x lesions) / time(lesions), per aggregation and part: 4 = linear, 16 = quadratic
    lesion_rows = [r for r in rows if r["sweep"] == "lesions"]
    for aggregation in models:
        for part in ("aggregation", "loss+aggregation"):
            series = sorted((r for r in lesion_rows if r["aggregation"] == aggregation and r["part"] == part),
                            key=lambda r: r["lesions"])
            for small, large in zip(series, series[1:]):
                growth.append({"aggregation": aggregation, "part": part, "from_lesions": small["lesions"],
                               "to_lesions": large["lesions"], "lesion_factor": large["lesions"] / small["lesions"],
                               "time_factor": large["us_per_lesion"] * large["lesions"] / (small["us_per_lesion"] * small["lesions"])})
    skew = {}
    for aggregation in models:
        for part in ("aggregation", "loss+aggregation"):
            pick = {r["sweep"]: r["us_per_lesion"] for r in rows if r["sweep"] in ("skewed", "uniform")
                    and r["aggregation"] == aggregation and r["part"] == part}
            skew[f"{aggregation}/{part}"] = pick["skewed"] / pick["uniform"]
    return {"projection_dim": args.scaling_projection_dim, "rows": rows, "growth": growth,
            "skewed_over_uniform": skew, "memory": memory_rows}


def scaling_memory_worker(args: SpeedArguments) -> list[dict]:
    """Peak memory of the loss + aggregation step of every scaling case, the peak reset before each."""
    models = scaling_models(args)
    rows = []
    for case in scaling_cases(args):
        for aggregation, model in models.items():
            LossAggregationStep(model, 8, 2, args.seed, args.device)()  # load kernels before the baseline
            step = LossAggregationStep(model, case["lesions"], case["patients"], args.seed, args.device,
                                       patient_index=case_patient_index(case))
            rows.append({**case, "aggregation": aggregation, **measure_step_memory(step, args.device)})
            del step
    return rows


# ----- profile -----
def profile_section(args: SpeedArguments, model_size: str, top: int = 25) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    config = preset_config(model_size, args.vision_model_type, args.seed)
    n = lesions_per_step(args, model_size)
    batch = to_device(random_batch(config, n, num_patients(args, n), args.seed), args.device)
    step, model = build_train_step("slimp", config, batch, args)
    ranges = {}

    def enter(label):
        def hook(module, inputs):
            ranges[label] = record_function(f"slimp::{label}")
            ranges[label].__enter__()
        return hook

    def leave(label):
        def hook(module, inputs, output):
            ranges.pop(label).__exit__(None, None, None)
        return hook

    modules = {"vision_model": model.vision_model, "lesion_metadata_model": model.lesion_metadata_model,
               "patient_metadata_model": model.patient_metadata_model, "phenotype_projection": model.phenotype_projection}
    if model.patient_pooling is not None:
        modules["patient_pooling"] = model.patient_pooling
    handles = []
    for label, module in modules.items():
        handles += [module.register_forward_pre_hook(enter(label)), module.register_forward_hook(leave(label))]

    def timed_loss(*args, **kwargs):  # the loss is a function, not a module: a range around its calls
        with record_function("slimp::contrastive_loss"):
            return nested_contrastive_loss(*args, **kwargs)

    modeling.nested_contrastive_loss = timed_loss
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    steps = max(2, min(repeats(args, model_size), 3))
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("slimp::train_step"):
                step()
    for handle in handles:
        handle.remove()
    modeling.nested_contrastive_loss = nested_contrastive_loss
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=top)
    ops = sorted((e for e in events if not e.key.startswith("slimp::")), key=lambda e: -e.self_cpu_time_total)[:top]
    step_us = next(e.cpu_time_total for e in events if e.key == "slimp::train_step") / steps
    modules_ms = {e.key.removeprefix("slimp::"): e.cpu_time_total / steps / 1000 for e in events if e.key.startswith("slimp::")}
    print(f"\n## torch.profiler: SLIMP training step, {model_size}, N={n} ({steps} steps)\n\n{table}", file=sys.stderr)
    return {
        "steps": steps, "step_ms": step_us / 1000,
        "forward_ms_by_module": modules_ms,
        "forward_share_by_module": {k: v / (step_us / 1000) for k, v in modules_ms.items() if k != "train_step"},
        "top_ops": [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total / steps / 1000,
                     "cpu_total_ms": e.cpu_time_total / steps / 1000, "calls": e.count // steps} for e in ops],
    }


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    (args,) = HfArgumentParser(SpeedArguments).parse_args_into_dataclasses(args=argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.memory_worker:
        measured = {"cases": scaling_memory_worker(args)} if args.memory_worker == "scaling" else memory_worker(args)
        print(json.dumps(measured))
        return measured
    result = {"environment": environment(), "arguments": asdict(args), "results": {}}
    for model_size in args.model_size:
        sections = result["results"].setdefault(model_size, {})
        if "train" in args.sections:
            sections["train"] = train_section(args, model_size)
        if "inference" in args.sections:
            sections["inference"] = inference_section(args, model_size)
        if "memory" in args.sections:
            sections["memory"] = memory_section(args, model_size)
        if "profile" in args.sections:
            sections["profile"] = profile_section(args, model_size)
    if "scaling" in args.sections:
        result["scaling"] = scaling_section(args)
    emit(result, tables(result), args.output)
    return result


if __name__ == "__main__":
    main()
