"""Pre-train SLIMP with the nested contrastive loss, through Accelerate.

The README's main job (no arguments): builds the embedded synthetic SLICE-3D dataset if absent
(cached under data/), pre-trains a tiny SLIMP on the CPU, saves a Hub-ready checkpoint folder, and
prints a linear probe of the trained model beside the untrained one's:

    accelerate launch training/pretrain.py                     # or: python training/pretrain.py
    python training/pretrain.py configs/pretrain_tiny.yaml     # a YAML/JSON config-file shortcut
    python training/pretrain.py --dataset_dir data/isic2024 --model_size small --max_steps 20000 \
        --patients_per_batch 32 --max_lesions_per_patient 16 --mixed_precision bf16

Multi-process: `torchrun --nproc_per_node 2 training/pretrain.py ...` (CPU: ACCELERATE_USE_CPU=1,
gloo), `accelerate launch --multi_gpu --num_processes 8 training/pretrain.py ...`. Each process gets
whole, different patients; the loss is the global-batch loss (embeddings gathered with gradients).
Resume: `--resume_from_checkpoint latest` continues with the same data order, no batch repeated or
skipped. Images are decoded and resized by the loader workers; augmentation runs on the training
device (`training/data/augment.py`).

Layout of `--output_dir`: the release folder (what `--push_to_hub` uploads: config, weights, code,
processor, card, results.json, and nothing else). Checkpoints go to `--checkpoint_dir` (default
`OUTPUT_DIR-checkpoints`), beside it, never inside it.

Safety: the release and checkpoint folders are locked for the whole run (a second run on them stops at
once, naming the first's pid); no output folder may be, hold or lie inside the dataset or the checkpoint
it starts from; a release folder holding files SLIMP did not write is refused. The metadata schema stored
in the checkpoint keeps only categories and statistics shared by 5+ patients, and a train split of fewer
patients is refused. A resume with another batch geometry (patients per batch, lesions per patient,
processes, seed, train data) is refused unless `--allow_inexact_resume`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from modeling_slimp import SLIMPModel
from modeling_slimp.schema_slimp import MIN_PATIENTS_PER_VALUE
from training.arguments import ArgumentError, DatasetError, parse_dataclasses, run_cli
from training.checkpointing import CheckpointError, checkpoint_dirs, find_checkpoint, load_checkpoint, save_checkpoint
from training.data.augment import AUGMENTATIONS
from training.data.collate import BatchTransform, ColumnBatches, EncodedMetadata, DecodingCollator
from training.data.dataset import class_counts, column_list, load_slimp_dataset, split_fingerprint
from training.data.sampler import PatientBatchSampler
from training.embeddings import embed_split
from training.optim import build_optimizer
from training.precision import SLOW_BF16_HELP, warn_if_slow_bf16
from training.presets import ModelArguments, build_processor, schema_columns, seeded_model
from training.probe import retrieval_metrics
from training.release import RELEASE_FILES, probe_report, save_release
from training.safety import check_apart, check_writable_release, locked

logger = get_logger(__name__)

DEFAULT_DATASET = "data/synthetic"
DEFAULT_SYNTHETIC_PATIENTS = 250  # patients of the synthetic dataset built into DEFAULT_DATASET when it is absent
# (~40 lesions each: ~12,000 lesions, ~95 malignant; minutes on a laptop CPU)
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORTERS = ("none", "tensorboard")


@dataclass
class DataArguments:
    dataset_dir: str = field(default=DEFAULT_DATASET, metadata={"help": "A dataset from `python -m training.prepare_data`. The default is built (synthetic) if absent."})
    synthetic_patients: int = field(default=DEFAULT_SYNTHETIC_PATIENTS, metadata={"help": "Patients of the synthetic dataset built when dataset_dir is the default and absent."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of that synthetic dataset."})
    patients_per_batch: int = field(default=16, metadata={"help": "P: distinct patients per batch and process."})
    max_lesions_per_patient: int = field(default=8, metadata={"help": "K: most lesions of one patient in a batch."})
    include_malignant: bool = field(default=False, metadata={"help": "Label-aware batches that always hold a patient's malignant lesions (off: pre-training is label-free)."})
    num_workers: int = field(default=1, metadata={"help": "DataLoader workers per process (they decode and resize images)."})
    augmentation: str = field(default="default", metadata={"help": f"Augmentation preset: one of {tuple(AUGMENTATIONS)} (training/data/augment.py)."})
    exclude_features: list[str] = field(default_factory=list, metadata={"help": "Metadata columns (fnmatch patterns, e.g. '*ext*') left out of the model's inputs."})

    def __post_init__(self):
        for name in ("patients_per_batch", "max_lesions_per_patient", "synthetic_patients"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ArgumentError(f"--num_workers must be >= 0, got {self.num_workers}")
        if self.augmentation not in AUGMENTATIONS:
            raise ArgumentError(f"--augmentation must be one of {tuple(AUGMENTATIONS)}, got '{self.augmentation}'")


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/slimp-synthetic", metadata={"help": "The release folder: the model, its processor, card and results (what --push_to_hub uploads)."})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "Where training checkpoints go (default: OUTPUT_DIR-checkpoints, beside the release folder)."})
    logging_dir: str | None = field(default=None, metadata={"help": "Where --report_to tensorboard writes (default: OUTPUT_DIR-logs, beside the release folder)."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps; <= 0 uses num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs when --max_steps <= 0."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate (cosine schedule)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms, biases, embeddings, logit scales)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps (at most half of the run)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    mixed_precision: str = field(default="no", metadata={"help": f"One of {MIXED_PRECISION}. " + SLOW_BF16_HELP})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward (less memory)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order, augmentations and dropout."})
    logging_steps: int = field(default=20, metadata={"help": "Log the loss terms every this many steps."})
    eval_steps: int = field(default=100, metadata={"help": "Validate (retrieval recall@k, losses) every this many steps (0: only at the end)."})
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every this many steps (0: never)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints (None: all)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "latest | a checkpoint folder"})
    allow_inexact_resume: bool = field(default=False, metadata={"help": "Resume even from a checkpoint written with another batch geometry (patients per batch, lesions per patient, processes, seed, train data) or whose random-number state is lost (the run is then not an exact continuation)."})
    stop_after_steps: int | None = field(default=None, metadata={"help": "Stop after this many steps, keeping the max_steps schedule (time-boxed jobs)."})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "Consecutive non-finite losses that stop the run."})
    report_to: str = field(default="none", metadata={"help": f"One of {REPORTERS}."})
    linear_probe: bool = field(default=True, metadata={"help": "After training, print a linear probe beside the untrained model's."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the release folder to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (e.g. your-org/slimp-isic2024) for --push_to_hub."})

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ArgumentError(f"--mixed_precision must be one of {MIXED_PRECISION}, got '{self.mixed_precision}'")
        if self.report_to not in REPORTERS:
            raise ArgumentError(f"--report_to must be one of {REPORTERS}, got '{self.report_to}'")
        if self.push_to_hub and not self.hub_model_id:
            raise ArgumentError("--push_to_hub needs --hub_model_id (e.g. your-org/slimp-isic2024)")
        if self.gradient_accumulation_steps < 1 or self.logging_steps < 1:
            raise ArgumentError("--gradient_accumulation_steps and --logging_steps must be at least 1")
        if self.learning_rate <= 0:
            raise ArgumentError(f"--learning_rate must be > 0, got {self.learning_rate}")
        release = Path(self.output_dir)
        self.checkpoint_dir = self.checkpoint_dir or str(release.with_name(release.name + "-checkpoints"))
        self.logging_dir = self.logging_dir or str(release.with_name(release.name + "-logs"))
        for name in ("checkpoint_dir", "logging_dir"):
            if Path(getattr(self, name)).resolve().is_relative_to(release.resolve()):
                raise ArgumentError(f"--{name} {getattr(self, name)} is inside --output_dir {self.output_dir}, the folder "
                                    "that is published; put it beside it")


def parse_args(argv: list[str] | None = None) -> tuple[DataArguments, ModelArguments, TrainArguments]:
    return parse_dataclasses((DataArguments, ModelArguments, TrainArguments), argv)


def check_outputs(data_args: DataArguments, model_args: ModelArguments, args: TrainArguments) -> None:
    """No output folder is, holds or lies inside an input (the dataset, a local checkpoint to start from), and
    the release folder holds no file of a release's names that SLIMP did not write (`training.safety`)."""
    inputs = {"the --dataset_dir": data_args.dataset_dir}
    for option in ("init_from", "init_vision_from"):
        if getattr(model_args, option) and Path(getattr(model_args, option)).exists():  # not a Hub id
            inputs[f"the --{option} checkpoint"] = getattr(model_args, option)
    for option in ("output_dir", "checkpoint_dir", "logging_dir"):
        check_apart(getattr(args, option), f"--{option}", inputs)
    check_writable_release(args.output_dir, "--output_dir", RELEASE_FILES)


def hyperparameters(*arguments) -> dict[str, int | float | str | bool]:
    """The options as tracker hyper-parameters: TensorBoard takes scalars and strings only (a list is
    written comma-separated, None as "none")."""
    config = {}
    for group in arguments:
        for key, value in asdict(group).items():
            if value is None:
                value = "none"
            elif isinstance(value, (list, tuple)):
                value = ",".join(map(str, value))
            config[key] = value
    return config


def ensure_dataset(data_args: DataArguments, accelerator: Accelerator) -> None:
    """Build the synthetic dataset into the default folder when it is missing (main process first)."""
    if Path(data_args.dataset_dir).exists():
        summary = Path(data_args.dataset_dir) / "summary.json"
        if data_args.dataset_dir == DEFAULT_DATASET and summary.is_file():
            patients = sum(split["patients"] for split in json.loads(summary.read_text())["splits"].values())
            if patients != data_args.synthetic_patients:
                logger.warning("%s (cached) holds %d patients, not --synthetic_patients %d: delete it to rebuild.",
                               data_args.dataset_dir, patients, data_args.synthetic_patients, main_process_only=True)
        return
    if data_args.dataset_dir != DEFAULT_DATASET:
        raise ArgumentError(f"--dataset_dir {data_args.dataset_dir} does not exist; convert a dataset with "
                            "`python -m training.prepare_data`")
    with accelerator.main_process_first():
        if accelerator.is_main_process and not Path(data_args.dataset_dir).exists():
            from training.data import convert

            logger.info("building the synthetic dataset in %s", data_args.dataset_dir, main_process_only=True)
            convert.run(convert.ConvertArguments("synthetic", data_args.dataset_dir, patients=data_args.synthetic_patients,
                                                 seed=data_args.synthetic_seed))


def model_schema(schema: dict, exclude_features: list[str]) -> dict:
    """The dataset's schema.json without the excluded metadata columns (fnmatch patterns)."""
    if not exclude_features:
        return schema
    from modeling_slimp.schema_slimp import matches_any

    trimmed = {**schema}
    for level in ("lesion", "patient"):
        trimmed[level] = {kind: [c for c in schema[level][kind] if not matches_any(c, exclude_features)] for kind in schema[level]}
    dropped = sorted(set(schema_columns(schema)) - set(schema_columns(trimmed)))
    if not dropped:
        raise ArgumentError(f"--exclude_features {exclude_features} matches no metadata column of the dataset")
    logger.info("metadata columns left out (--exclude_features): %s", ", ".join(dropped), main_process_only=True)
    return trimmed


def build_loader(train_split, collator, data_args: DataArguments, args: TrainArguments, accelerator: Accelerator):
    """(sampler, loader, batches per epoch) for the train split: batches of whole patients (`PatientBatchSampler`)."""
    common = dict(patients_per_batch=data_args.patients_per_batch, max_lesions_per_patient=data_args.max_lesions_per_patient,
                  seed=args.seed)
    # Warn about absent schema columns here, once, not in every worker copy of the processor each epoch.
    collator.processor.check_columns(train_split.column_names)
    sampler = PatientBatchSampler(column_list(train_split, "patient_id"), labels=column_list(train_split, "label") if data_args.include_malignant else None,
                                  num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                  include_malignant=data_args.include_malignant, **common)
    # The sampler shards by rank itself: the loader is not passed through accelerator.prepare. Its own
    # generator: creating an iterator (each epoch, and on resume) must not consume the global RNG that
    # feature dropout draws from, or a resumed run would diverge from an uninterrupted one.
    # Non-persistent workers copy the collator each epoch, so they see its epoch (seeded augmentations).
    # The metadata of the split is encoded once here; a batch's metadata is then a gather, in the worker.
    collator.encoded_metadata = EncodedMetadata(collator.processor, train_split)
    loader = DataLoader(ColumnBatches(train_split, columns=collator.row_columns), batch_sampler=sampler, collate_fn=collator,
                        num_workers=data_args.num_workers,
                        generator=torch.Generator().manual_seed(args.seed), pin_memory=torch.cuda.is_available())
    return sampler, loader, len(sampler)


def validate(model: SLIMPModel, collator: DecodingCollator, dataset, batch_size: int = 256) -> dict[str, float]:
    """The model's own contrastive losses (eval mode: per whole-patient batch, never gathered) and retrieval
    recall@k over the split, in one pass (`embed_split`). Called on the main process only."""
    features = embed_split(model, dataset, collator, batch_size=batch_size, losses=True, desc="validation")
    model.train()
    metrics = {"lesion_loss": features["lesion_loss"], "patient_loss": features["patient_loss"], **retrieval_metrics(features)}
    return {f"val/{k}": v for k, v in metrics.items()}


def batch_geometry(data_args: DataArguments, args: TrainArguments, accelerator: Accelerator) -> dict:
    """What the order and content of the batches depend on, stored with each checkpoint: a resume that changes
    it would repeat or skip batches (`checkpointing.check_geometry`)."""
    return {"patients_per_batch": data_args.patients_per_batch, "max_lesions_per_patient": data_args.max_lesions_per_patient,
            "processes": accelerator.num_processes, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "seed": args.seed, "include_malignant": data_args.include_malignant,
            "train_data": split_fingerprint(data_args.dataset_dir, "train")}


def check_train_patients(rows, dataset_dir: str) -> None:
    """The schema stored in every checkpoint keeps only values shared by MIN_PATIENTS_PER_VALUE patients: a
    train split of fewer patients could only describe individual ones, so it is refused."""
    patients = len(set(column_list(rows, "patient_id")))
    if patients < MIN_PATIENTS_PER_VALUE:
        raise DatasetError(f"split 'train' of {dataset_dir} holds {patients} patient(s): the metadata schema stored in "
                           f"the checkpoint only keeps values that {MIN_PATIENTS_PER_VALUE}+ patients share, so it would "
                           "describe individual patients; convert more patients into the train split")


def warn_without_negatives(data_args: DataArguments, model_args: ModelArguments, accelerator: Accelerator) -> bool:
    """Warns (once, returns True) when no batch can hold 2 patients: the patient loss then has no negatives."""
    if model_args.lesion_loss_weight < 1 and data_args.patients_per_batch * accelerator.num_processes < 2:
        logger.warning("--patients_per_batch %d on %d process(es): every batch holds one patient, so the patient-level "
                       "loss has no negatives and is 0 at every step (only the lesion loss trains). Use "
                       "--patients_per_batch 2 or more, or --lesion_loss_weight 1 for the flat loss.",
                       data_args.patients_per_batch, accelerator.num_processes, main_process_only=True)
        return True
    return False


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, args = parse_args(argv)
    check_outputs(data_args, model_args, args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The schedule counts optimizer steps of the global batch: accelerate's default would advance it once
    # per process per step (it assumes each process adds a batch), ending a 2-process run's schedule early.
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
                              step_scheduler_with_optimizer=False,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=args.logging_dir)
    if args.mixed_precision == "bf16" and accelerator.is_local_main_process:
        warn_if_slow_bf16("--mixed_precision bf16", accelerator.device.type == "cpu", logger)
    with locked({"release folder (--output_dir)": args.output_dir, "checkpoint folder (--checkpoint_dir)": args.checkpoint_dir},
                enabled=accelerator.is_main_process):
        check_outputs(data_args, model_args, args)  # again, now that no other run can write them
        return pretrain(data_args, model_args, args, accelerator)


def pretrain(data_args: DataArguments, model_args: ModelArguments, args: TrainArguments, accelerator: Accelerator) -> dict:
    """The run itself (`main` holds the locks of its folders)."""
    ensure_dataset(data_args, accelerator)
    train_split, schema = load_slimp_dataset(data_args.dataset_dir, "train")
    validation_split, _ = load_slimp_dataset(data_args.dataset_dir, "validation")
    if len(validation_split) == 0:
        logger.warning("%s has an empty validation split: validation is skipped (convert with more patients, or a "
                       "larger --validation-fraction)", data_args.dataset_dir, main_process_only=True)
        validation_split = None
    schema = model_schema(schema, data_args.exclude_features)
    check_train_patients(train_split, data_args.dataset_dir)
    model = seeded_model(model_args, schema, train_split, args.seed)  # every generator seeded, then built
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    processor = build_processor(model, model_args)
    train_collator = DecodingCollator(processor, train=True, two_views=model.config.image_ssl_weight > 0, seed=args.seed,
                                   augmentation=AUGMENTATIONS[data_args.augmentation])
    eval_collator = DecodingCollator(processor, train=False)

    sampler, loader, batches_per_epoch = build_loader(train_split, train_collator, data_args, args, accelerator)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * max(1, batches_per_epoch // args.gradient_accumulation_steps))
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, max_steps // 2), max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("slimp-pretrain", config=hyperparameters(data_args, model_args, args))

    geometry = batch_geometry(data_args, args, accelerator)
    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "geometry": geometry}
    resume = find_checkpoint(args.checkpoint_dir, args.resume_from_checkpoint)
    earlier = checkpoint_dirs(args.checkpoint_dir) if resume is None else []
    if earlier:
        logger.warning("a fresh run, but %s holds checkpoints of an earlier run (newest %s): until this run saves a later "
                       "step, --resume_from_checkpoint latest would continue that run, not this one", args.checkpoint_dir,
                       earlier[-1].name, main_process_only=True)
    if resume is not None:
        state = load_checkpoint(accelerator, resume, allow_inexact_resume=args.allow_inexact_resume, geometry=geometry)
        state["geometry"] = geometry
        logger.info("resumed from %s at step %d", resume, state["global_step"], main_process_only=True)
    warned = warn_without_negatives(data_args, model_args, accelerator)

    logger.info("%s lesions, %s batches/epoch/process, %d steps, %d processes",
                len(train_split), batches_per_epoch, max_steps,
                accelerator.num_processes, main_process_only=True)
    history = train_loop(model, optimizer, scheduler, loader, sampler, BatchTransform(processor), accelerator, args, state,
                         max_steps, validation_split, eval_collator, warned_without_negatives=warned)
    accelerator.wait_for_everyone()
    result = {"global_step": state["global_step"], "history": history, "data_args": asdict(data_args)}
    if state["global_step"] >= max_steps and accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        final_validation = validate(unwrapped, eval_collator, validation_split) if validation_split is not None else None
        results = {"validation": final_validation, "linear_probe": None, "train_args": asdict(args),
                   "data_args": asdict(data_args), "model_args": asdict(model_args)}
        # The release is saved before anything that could still fail (the probe), so a finished run is never lost.
        save_release(unwrapped, processor, args.output_dir, schema, data_args.dataset_dir, results)
        if args.linear_probe and probe_possible(data_args.dataset_dir, schema["label"]["names"]):
            results["linear_probe"] = probe_report(unwrapped, eval_collator, data_args.dataset_dir, args.seed)
            save_release(unwrapped, processor, args.output_dir, schema, data_args.dataset_dir, results, card_only=True)
        if args.push_to_hub:
            from training.release import push_release

            push_release(args.output_dir, args.hub_model_id)
        result.update(validation=final_validation, linear_probe=results["linear_probe"])
    accelerator.end_training()
    return result


def probe_possible(dataset_dir: str, label_names: list[str]) -> bool:
    """The linear probe fits on the train split and scores the test split: each needs two classes. Warns and
    returns False (the probe is skipped) naming the split that has one."""
    for split in ("train", "test"):
        dataset, _ = load_slimp_dataset(dataset_dir, split)
        present = [name for name, count in class_counts(dataset, label_names).items() if count]
        if len(present) < 2:
            logger.warning("split '%s' of %s holds %s: the linear probe cannot be fitted or scored and is skipped",
                           split, dataset_dir, f"one class only ('{present[0]}')" if present else "no lesion",
                           main_process_only=True)
            return False
    return True


def train_loop(model, optimizer, scheduler, loader, sampler, transform: BatchTransform, accelerator, args: TrainArguments,
               state: dict, max_steps: int, validation_split, eval_collator, warned_without_negatives: bool = False
               ) -> list[dict]:
    """Run until `max_steps` (or `stop_after_steps`), checkpointing every `save_steps`. Mutates `state`."""
    history: list[dict] = []
    progress = tqdm(total=max_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process, desc="pre-training")
    stop_at = min(max_steps, args.stop_after_steps) if args.stop_after_steps else max_steps
    nonfinite, lesions_seen, window_start = 0, 0, time.perf_counter()
    model.train()
    while state["global_step"] < stop_at:
        sampler.set_epoch(state["epoch"])
        loader.collate_fn.set_epoch(state["epoch"])
        sampler.set_start_batch(state["batches_in_epoch"])
        for batch in loader:
            batch = transform(batch, accelerator.device)  # augmentation and normalisation on the device
            batch.pop("labels", None)
            state["batches_in_epoch"] += 1
            with accelerator.accumulate(model):
                out = model(**batch, return_loss=True)
                # One collective: how many processes have a finite loss, and how many patients the global batch holds.
                local = torch.tensor([float(torch.isfinite(out.loss)), float(batch["patient_numerical_values"].shape[0])],
                                     device=out.loss.device)
                finite_processes, patients = accelerator.reduce(local, "sum").tolist()
                finite = finite_processes == accelerator.num_processes
                if patients < 2 and not warned_without_negatives and model_config(model).lesion_loss_weight < 1:
                    warned_without_negatives = True
                    logger.warning("step %d: a batch of %d patient(s): its patient loss has no negatives and is 0 (said "
                                   "once per run)", state["global_step"] + 1, int(patients), main_process_only=True)
                if not finite:
                    nonfinite += 1
                    optimizer.zero_grad()
                    logger.warning("non-finite loss at step %d (%d in a row): step skipped", state["global_step"], nonfinite, main_process_only=True)
                    if nonfinite >= args.max_nonfinite_steps:
                        raise RuntimeError(f"{nonfinite} consecutive non-finite losses at step {state['global_step']}: stopping. "
                                           "Lower the learning rate, use fp32, or check the data for extreme values.")
                    continue
                nonfinite = 0
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            lesions_seen += batch["pixel_values"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            progress.update(1)
            step = state["global_step"]
            if step % args.logging_steps == 0 or step == stop_at:
                elapsed = time.perf_counter() - window_start
                record = log_step(accelerator, accelerator.unwrap_model(model), out, scheduler, step, lesions_seen / max(elapsed, 1e-9))
                history.append(record)
                progress.set_postfix(loss=f"{record['train/loss']:.3f}")
                lesions_seen, window_start = 0, time.perf_counter()
            if args.eval_steps > 0 and step % args.eval_steps == 0 and step < max_steps and validation_split is not None:
                if accelerator.is_main_process:
                    metrics = validate(accelerator.unwrap_model(model), eval_collator, validation_split)
                    accelerator.log(metrics, step=step)
                    logger.info("step %d validation %s", step, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
                accelerator.wait_for_everyone()
            if args.save_steps > 0 and (step % args.save_steps == 0 or step == stop_at):
                save_checkpoint(accelerator, args.checkpoint_dir, state, args.save_total_limit)
            if step >= stop_at:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    progress.close()
    return history


def model_config(model):
    return getattr(model, "module", model).config


def log_step(accelerator, model: SLIMPModel, out, scheduler, step: int, lesions_per_second: float) -> dict:
    lesion_scale, patient_scale = model.logit_scales()
    record = {
        "train/loss": out.loss.item(), "train/lesion_loss": out.lesion_loss.item(), "train/patient_loss": out.patient_loss.item(),
        "train/lesion_logit_scale": lesion_scale.item(), "train/patient_logit_scale": patient_scale.item(),
        "train/learning_rate": scheduler.get_last_lr()[0], "train/lesions_per_second": lesions_per_second, "step": step,
    }
    if out.image_ssl_loss is not None:
        record["train/image_ssl_loss"] = out.image_ssl_loss.item()
    accelerator.log(record, step=step)
    logger.info("step %d %s", step, json.dumps({k: round(v, 4) for k, v in record.items() if k != "step"}), main_process_only=True)
    return record


if __name__ == "__main__":
    outcome = run_cli(main, errors=(ArgumentError, CheckpointError, DatasetError))
    if outcome.get("linear_probe"):
        print(outcome["linear_probe"]["table"])
