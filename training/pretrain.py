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
skipped.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import ViTImageProcessorPil, get_cosine_schedule_with_warmup

if __package__ in (None, ""):  # `accelerate launch training/pretrain.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_slimp import SLIMPModel, SLIMPProcessor  # noqa: E402
from training.cli import parse_dataclasses  # noqa: E402
from training.checkpointing import checkpoint_dirs, find_checkpoint, rotate_checkpoints  # noqa: E402
from training.collate import SLIMPCollator  # noqa: E402
from training.configs import MODEL_SIZES, VISION_MODEL_TYPES, build_slimp_config  # noqa: E402
from training.continual import freeze_for_continual, replace_metadata_schema  # noqa: E402
from training.data import load_slimp_dataset  # noqa: E402
from training.features import retrieval_metrics  # noqa: E402
from training.reporting import probe_report, save_release  # noqa: E402
from training.sampler import PatientBatchSampler  # noqa: E402
from training.streaming import StreamingPatientBatches  # noqa: E402

logger = get_logger(__name__)

DEFAULT_DATASET = "data/synthetic"


@dataclass
class DataArguments:
    dataset_dir: str = field(default=DEFAULT_DATASET, metadata={"help": "A dataset from `python -m training.prepare_data`. The default is built (synthetic) if absent."})
    synthetic_patients: int = field(default=500, metadata={"help": "Patients of the synthetic dataset built when dataset_dir is the default and absent."})
    synthetic_seed: int = 0
    patients_per_batch: int = field(default=16, metadata={"help": "P: distinct patients per batch and process."})
    max_lesions_per_patient: int = field(default=8, metadata={"help": "K: most lesions of one patient in a batch."})
    include_malignant: bool = field(default=False, metadata={"help": "Label-aware batches that always hold a patient's malignant lesions (off: pre-training is label-free)."})
    num_workers: int = field(default=1, metadata={"help": "DataLoader workers per process."})
    streaming: bool = field(default=False, metadata={"help": "Stream the train split (datasets IterableDataset, shards split by process) instead of sampling it; needs --max_steps."})
    stream_shards: int = field(default=16, metadata={"help": "Shards of the train stream (a multiple of the processes)."})
    schema_rows: int = field(default=50_000, metadata={"help": "With --streaming: rows of the stream the metadata schema is fitted on."})


@dataclass
class ModelArguments:
    model_size: str = field(default="tiny", metadata={"help": f"One of {MODEL_SIZES}."})
    vision_model_type: str = field(default="vit", metadata={"help": f"One of {VISION_MODEL_TYPES}."})
    image_size: int | None = field(default=None, metadata={"help": "Override the preset's image resolution."})
    init_vision_from: str | None = field(default=None, metadata={"help": "A transformers vision checkpoint to initialise the image tower."})
    init_from: str | None = field(default=None, metadata={"help": "A SLIMP checkpoint to start from (with --continual: continual pre-training)."})
    continual: bool = field(default=False, metadata={"help": "Train only embedding layers, projections and logit scales; attention frozen."})
    lesion_loss_weight: float = field(default=0.5, metadata={"help": "λ: L = λ·L_lesion + (1 − λ)·L_patient."})
    patient_aggregation: str = field(default="mean", metadata={"help": "mean | attention"})
    image_ssl_weight: float = field(default=0.0, metadata={"help": "Weight of the SimCLR term (1 = image-only SimCLR baseline)."})
    feature_dropout: float = field(default=0.1, metadata={"help": "Probability of hiding a present metadata value in training."})


@dataclass
class TrainArguments:
    output_dir: str = "outputs/slimp-synthetic"
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps; <= 0 uses num_train_epochs."})
    num_train_epochs: float = 1.0
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16"})
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 20
    eval_steps: int = 100
    save_steps: int = 100
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "latest | a checkpoint folder"})
    stop_after_steps: int | None = field(default=None, metadata={"help": "Stop after this many steps, keeping the max_steps schedule (time-boxed jobs)."})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "Consecutive non-finite losses that stop the run."})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard"})
    linear_probe: bool = field(default=True, metadata={"help": "After training, print a linear probe beside the untrained model's."})
    push_to_hub: bool = False
    hub_model_id: str | None = None


def parse_args(argv: list[str] | None = None) -> tuple[DataArguments, ModelArguments, TrainArguments]:
    return parse_dataclasses((DataArguments, ModelArguments, TrainArguments), argv)


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
        raise FileNotFoundError(f"--dataset_dir {data_args.dataset_dir} does not exist; convert a dataset with `python -m training.prepare_data`.")
    with accelerator.main_process_first():
        if accelerator.is_main_process and not Path(data_args.dataset_dir).exists():
            from training import prepare_data

            logger.info("building the synthetic dataset in %s", data_args.dataset_dir, main_process_only=True)
            prepare_data.main(["synthetic", "--patients", str(data_args.synthetic_patients),
                               "--seed", str(data_args.synthetic_seed), "--output-dir", data_args.dataset_dir])


def build_model(model_args: ModelArguments, schema: dict, train_split) -> SLIMPModel:
    overrides = dict(lesion_loss_weight=model_args.lesion_loss_weight, patient_aggregation=model_args.patient_aggregation,
                     image_ssl_weight=model_args.image_ssl_weight)
    if model_args.init_from:
        model = SLIMPModel.from_pretrained(model_args.init_from)
        for key, value in overrides.items():
            setattr(model.config, key, value)
        model.contrastive_loss.lesion_loss_weight = model_args.lesion_loss_weight
        model.contrastive_loss.image_ssl_weight = model_args.image_ssl_weight
        target = build_slimp_config(schema, train_split, vision=model.config.vision_config)
        replace_metadata_schema(model, "lesion", target.lesion_metadata_config)
        replace_metadata_schema(model, "patient", target.patient_metadata_config)
        model.config.id2label, model.config.label2id = target.id2label, target.label2id
    else:
        config = build_slimp_config(schema, train_split, model_args.model_size, model_args.vision_model_type,
                                    model_args.image_size, **overrides)
        model = (SLIMPModel.from_vision_pretrained(model_args.init_vision_from, config)
                 if model_args.init_vision_from else SLIMPModel(config))
    for tower in (model.config.lesion_metadata_config, model.config.patient_metadata_config):
        tower.feature_dropout = model_args.feature_dropout
    if model_args.continual:
        if not model_args.init_from:
            raise ValueError("--continual needs --init_from: continual pre-training adapts a pre-trained checkpoint.")
        freeze_for_continual(model)
    return model


def schema_rows(train_split, schema: dict, data_args: DataArguments):
    """What the metadata schema is fitted on: the train split, or the first rows of its stream."""
    if not data_args.streaming:
        return train_split
    import pandas as pd

    columns = ["patient_id"] + [c for level in ("lesion", "patient") for kind in ("numerical", "categorical") for c in schema[level][kind]]
    return pd.DataFrame(list(train_split.select_columns(columns).take(data_args.schema_rows)))


def build_loader(train_split, collator, data_args: DataArguments, args: "TrainArguments", accelerator: Accelerator):
    """(sampler, loader, batches per epoch or None) for the train split: patient-batch sampling of the
    map-style split, or patient-grouped batches of its stream."""
    common = dict(patients_per_batch=data_args.patients_per_batch, max_lesions_per_patient=data_args.max_lesions_per_patient,
                  seed=args.seed)
    if data_args.streaming:
        if args.max_steps <= 0:
            raise ValueError("--streaming has no epoch length: give --max_steps.")
        batches = StreamingPatientBatches(train_split, collator, rank=accelerator.process_index,
                                          world_size=accelerator.num_processes, **common)
        return batches, DataLoader(batches, batch_size=None, num_workers=min(1, data_args.num_workers)), None
    sampler = PatientBatchSampler(train_split["patient_id"], labels=train_split["label"] if data_args.include_malignant else None,
                                  num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                  include_malignant=data_args.include_malignant, **common)
    # The sampler shards by rank itself: the loader is not passed through accelerator.prepare. Its own
    # generator: creating an iterator (each epoch, and on resume) must not consume the global RNG that
    # feature dropout draws from, or a resumed run would diverge from an uninterrupted one.
    # Non-persistent workers copy the collator each epoch, so they see its epoch (seeded augmentations).
    loader = DataLoader(train_split, batch_sampler=sampler, collate_fn=collator, num_workers=data_args.num_workers,
                        generator=torch.Generator().manual_seed(args.seed))
    return sampler, loader, len(sampler)


def build_optimizer(model: torch.nn.Module, args: TrainArguments) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases, embeddings, [CLS] tokens and logit scales (1-D or scalar
    parameters, plus the feature tokenizers' per-feature tables)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim < 2 or "logit_scale" in name or "feature_tokenizer" in name or "cls_token" in name
        (no_decay if skip else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.98), eps=1e-6)


@torch.no_grad()
def validate(model: SLIMPModel, collator, dataset, batch_size: int) -> dict[str, float]:
    """Contrastive losses (single-process, over patient-whole batches) and retrieval recall@k, in one
    pass over the split. Called on the main process only, so the loss is never gathered."""
    from training.features import patient_batches

    model.eval()
    totals = {"lesion_loss": 0.0, "patient_loss": 0.0}
    embeds: dict[str, list] = {"image": [], "lesion_metadata": []}
    batches = patient_batches(dataset["patient_id"], batch_size)
    scale = model.config.max_logit_scale
    for indices in batches:
        batch = {k: v.to(model.device) for k, v in collator([dataset[i] for i in indices]).items()}
        batch.pop("labels", None)
        batch.pop("ssl_pixel_values", None)
        out = model(**batch)
        terms = model.contrastive_loss(out.image_embeds, out.lesion_metadata_embeds, out.phenotype_embeds, out.patient_metadata_embeds,
                                       model.lesion_logit_scale.clamp(max=scale).exp(), model.patient_logit_scale.clamp(max=scale).exp())
        totals["lesion_loss"] += float(terms.lesion_loss) / len(batches)
        totals["patient_loss"] += float(terms.patient_loss) / len(batches)
        embeds["image"].append(out.image_embeds.float().cpu().numpy())
        embeds["lesion_metadata"].append(out.lesion_metadata_embeds.float().cpu().numpy())
    metrics = retrieval_metrics({key: np.concatenate(parts) for key, parts in embeds.items()})
    model.train()
    return {f"val/{k}": v for k, v in {**totals, **metrics}.items()}


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The schedule counts optimizer steps of the global batch: accelerate's default would advance it once
    # per process per step (it assumes each process adds a batch), ending a 2-process run's schedule early.
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
                              step_scheduler_with_optimizer=False,
                              log_with=None if args.report_to == "none" else args.report_to, project_dir=args.output_dir)
    set_seed(args.seed)
    ensure_dataset(data_args, accelerator)
    train_split, schema = load_slimp_dataset(data_args.dataset_dir, "train", streaming=data_args.streaming,
                                             num_shards=max(data_args.stream_shards, accelerator.num_processes))
    validation_split, _ = load_slimp_dataset(data_args.dataset_dir, "validation")
    model = build_model(model_args, schema, schema_rows(train_split, schema, data_args))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    image_size = model.config.vision_config.image_size if hasattr(model.config.vision_config, "image_size") else 224
    processor = SLIMPProcessor(ViTImageProcessorPil(size={"height": image_size, "width": image_size}), model.config)
    two_views = model.config.image_ssl_weight > 0
    train_collator = SLIMPCollator(processor, train=True, two_views=two_views, seed=args.seed)
    eval_collator = SLIMPCollator(processor, train=False)

    sampler, loader, batches_per_epoch = build_loader(train_split, train_collator, data_args, args, accelerator)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * max(1, batches_per_epoch // args.gradient_accumulation_steps))
    optimizer = build_optimizer(model, args)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, max_steps // 2), max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("slimp-pretrain", config={**asdict(data_args), **asdict(model_args), **asdict(args)})

    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0}
    resume = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / "trainer_state.json").read_text())
        logger.info("resumed from %s at step %d", resume, state["global_step"], main_process_only=True)

    logger.info("%s lesions, %s batches/epoch/process, %d steps, %d processes",
                "streamed" if data_args.streaming else len(train_split), batches_per_epoch or "endless", max_steps,
                accelerator.num_processes, main_process_only=True)
    history = train_loop(model, optimizer, scheduler, loader, sampler, accelerator, args, state, max_steps,
                         validation_split, eval_collator)
    accelerator.wait_for_everyone()
    result = {"global_step": state["global_step"], "history": history}
    if state["global_step"] >= max_steps and accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        final_validation = validate(unwrapped, eval_collator, validation_split, 256)
        probe = probe_report(unwrapped, eval_collator, data_args.dataset_dir, args.seed) if args.linear_probe else None
        save_release(unwrapped, processor, args.output_dir, schema, data_args.dataset_dir,
                     {"validation": final_validation, "linear_probe": probe, "train_args": asdict(args),
                      "data_args": asdict(data_args), "model_args": asdict(model_args)},
                     push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id)
        result.update(validation=final_validation, linear_probe=probe)
    accelerator.end_training()
    return result


def train_loop(model, optimizer, scheduler, loader, sampler, accelerator, args: TrainArguments, state: dict, max_steps: int,
               validation_split, eval_collator) -> list[dict]:
    """Run until `max_steps` (or `stop_after_steps`), checkpointing every `save_steps`. Mutates `state`."""
    history: list[dict] = []
    progress = tqdm(total=max_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process, desc="pre-training")
    stop_at = min(max_steps, args.stop_after_steps) if args.stop_after_steps else max_steps
    nonfinite, lesions_seen, window_start = 0, 0, time.perf_counter()
    model.train()
    while state["global_step"] < stop_at:
        sampler.set_epoch(state["epoch"])
        sampler.set_start_batch(state["batches_in_epoch"])
        if hasattr(loader.collate_fn, "set_epoch"):  # streaming batches are collated (and epoched) upstream
            loader.collate_fn.set_epoch(state["epoch"])
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            batch.pop("labels", None)
            state["batches_in_epoch"] += 1
            with accelerator.accumulate(model):
                out = model(**batch, return_loss=True)
                finite = accelerator.reduce(torch.isfinite(out.loss).float().reshape(1), "sum").item() == accelerator.num_processes
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
            if args.eval_steps > 0 and step % args.eval_steps == 0 and step < max_steps:
                if accelerator.is_main_process:
                    metrics = validate(accelerator.unwrap_model(model), eval_collator, validation_split, 256)
                    accelerator.log(metrics, step=step)
                    logger.info("step %d validation %s", step, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
                accelerator.wait_for_everyone()
            if args.save_steps > 0 and (step % args.save_steps == 0 or step == stop_at):
                save_checkpoint(accelerator, args, state)
            if step >= stop_at:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    progress.close()
    return history


def log_step(accelerator, model: SLIMPModel, out, scheduler, step: int, lesions_per_second: float) -> dict:
    record = {
        "train/loss": out.loss.item(), "train/lesion_loss": out.lesion_loss.item(), "train/patient_loss": out.patient_loss.item(),
        "train/lesion_logit_scale": model.lesion_logit_scale.exp().item(), "train/patient_logit_scale": model.patient_logit_scale.exp().item(),
        "train/learning_rate": scheduler.get_last_lr()[0], "train/lesions_per_second": lesions_per_second, "step": step,
    }
    if out.image_ssl_loss is not None:
        record["train/image_ssl_loss"] = out.image_ssl_loss.item()
    accelerator.log(record, step=step)
    logger.info("step %d %s", step, json.dumps({k: round(v, 4) for k, v in record.items() if k != "step"}), main_process_only=True)
    return record


def save_checkpoint(accelerator: Accelerator, args: TrainArguments, state: dict) -> None:
    """accelerate state (model, optimizer, scheduler, RNG) + where the data order stands."""
    directory = Path(args.output_dir) / "checkpoints" / f"step-{state['global_step']:07d}"
    accelerator.save_state(str(directory))
    if accelerator.is_main_process:
        (directory / "trainer_state.json").write_text(json.dumps(state))
        rotate_checkpoints(checkpoint_dirs(args.output_dir), args.save_total_limit)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    outcome = main()
    if outcome.get("linear_probe"):
        print(outcome["linear_probe"]["table"])
