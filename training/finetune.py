"""Fine-tune a pre-trained SLIMP checkpoint into a lesion classifier: linear probe, full, or LoRA.

    python training/finetune.py --model_dir outputs/slimp-synthetic --dataset_dir data/synthetic \
        --output_dir outputs/slimp-synthetic-linear --mode linear --max_steps 300
    python training/finetune.py --model_dir outputs/slimp-synthetic --dataset_dir data/synthetic \
        --output_dir outputs/slimp-synthetic-full --mode full --learning_rate 5e-5 --num_train_epochs 3 \
        --max_steps 0 --class_weights auto --eval_steps 100
    python training/finetune.py --model_dir outputs/slimp-synthetic --dataset_dir data/synthetic \
        --output_dir outputs/slimp-synthetic-lora --mode lora --lora_r 8 --lora_alpha 16 --merge
    python training/finetune.py my_finetune.yaml     # a YAML/JSON config-file shortcut (keys = the options)
    accelerate launch training/finetune.py --model_dir ...   # several processes, each with whole, different patients

Modes (`--mode`):
- `linear`: everything frozen but `classifier`; the backbone stays in eval mode (frozen features, no
  dropout): a linear probe, trained by AdamW on augmented images.
- `full`: every parameter the classifier uses trains (the pre-training-only parts, i.e. the logit scales
  and the phenotype projection/pooling, and a metadata tower that `--classifier_features` leaves out,
  stay frozen: they get no gradient, which DDP rejects).
- `lora`: peft LoRA on the `q_proj`/`v_proj` attention projections of the image tower (ViT and DINOv2
  name them so in transformers 5) and of the metadata towers used by the head; `classifier` is a
  `modules_to_save`. `--merge` merges the adapter (`merge_and_unload`) and saves a plain classifier;
  without it the folder holds the adapter, the processor, `config.json` of the classifier and a card
  that shows how to load it onto the base checkpoint.

The classifier is `SLIMPForLesionClassification.from_pretrained(--model_dir)`: the base weights come from
the checkpoint through the `slimp` prefix, and only the `classifier` head may be missing (anything else
is an error). Labels are the dataset's (`schema.json`), and `--class_weights auto` stores inverse class
frequencies of the train split, `n / (C · n_c)`, in `config.class_weights`.

Batches come from `PatientBatchSampler` (P patients x up to K lesions), as in pre-training: lesions of
one patient stay together, so the patient-metadata features of a batch are computed once per patient,
no batch explodes on a patient with hundreds of lesions, and every lesion is seen once per epoch
(`--include_malignant` makes batches label-aware: a patient's malignant lesions join each of its chunks).

Every `--eval_steps`, the validation AUROC is measured; with `--load_best_model_at_end` the best
trainable weights are restored if they beat the final ones. At the end the validation and test splits
are scored (AUROC, ISIC 2024 pAUC above 80% TPR, balanced accuracy), and OUTPUT_DIR gets the
classifier (`AutoModelForImageClassification.from_pretrained(OUTPUT_DIR, trust_remote_code=True)`,
`pipeline("image-classification", model=OUTPUT_DIR, trust_remote_code=True)`), its processor, README.md
with the measured results, and results.json.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

if __package__ in (None, ""):  # `python training/finetune.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_slimp import SLIMPConfig, SLIMPForLesionClassification, SLIMPProcessor  # noqa: E402
from training.arguments import parse_dataclasses  # noqa: E402
from training.data.collate import BatchTransform, SLIMPCollator  # noqa: E402
from training.data.dataset import load_slimp_dataset  # noqa: E402
from training.data.sampler import PatientBatchSampler  # noqa: E402
from training.embeddings import predict_split  # noqa: E402
from training.metrics import classification_metrics  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.release import push_release, save_release  # noqa: E402

logger = get_logger(__name__)

MODES = ("linear", "full", "lora")
DEFAULT_LEARNING_RATES = {"linear": 1e-3, "full": 5e-5, "lora": 5e-4}
TOWERS = {"image": "vision_model", "lesion": "lesion_metadata_model", "patient": "patient_metadata_model"}
HEAD_KEYS = {"classifier.weight", "classifier.bias"}


@dataclass
class DataArguments:
    dataset_dir: str = field(metadata={"help": "A dataset from `python -m training.prepare_data` (docs/data_format.md)."})
    patients_per_batch: int = field(default=16, metadata={"help": "P: distinct patients per batch and process."})
    max_lesions_per_patient: int = field(default=8, metadata={"help": "K: most lesions of one patient in a batch."})
    include_malignant: bool = field(default=False, metadata={"help": "Batches always hold a patient's malignant lesions."})
    num_workers: int = field(default=1, metadata={"help": "DataLoader workers per process."})
    eval_batch_size: int = field(default=256, metadata={"help": "Lesions per evaluation batch (whole patients)."})


@dataclass
class ModelArguments:
    model_dir: str = field(metadata={"help": "A pre-trained SLIMP checkpoint folder (or Hub id)."})
    mode: str = field(default="linear", metadata={"help": f"One of {MODES}."})
    classifier_features: str = field(default="image+lesion+patient",
                                     metadata={"help": "image | image+lesion | image+lesion+patient"})
    class_weights: str = field(default="auto", metadata={"help": "auto (inverse train frequency) | none | w0,w1,..."})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_target_modules: str = field(default="q_proj,v_proj",
                                     metadata={"help": "Layer names adapted in each tower the head uses."})
    merge: bool = field(default=False, metadata={"help": "lora: merge the adapter and save a plain classifier."})


@dataclass
class TrainArguments:
    output_dir: str = "outputs/slimp-classifier"
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps; <= 0 uses num_train_epochs."})
    num_train_epochs: float = 1.0
    learning_rate: float | None = field(default=None, metadata={"help": f"Default per mode: {DEFAULT_LEARNING_RATES}."})
    weight_decay: float = 0.01
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16"})
    seed: int = 0
    logging_steps: int = 20
    eval_steps: int = field(default=0, metadata={"help": "Validation AUROC every this many steps (0: only at the end)."})
    load_best_model_at_end: bool = field(default=True,
                                         metadata={"help": "Restore the weights of the best validation AUROC."})
    push_to_hub: bool = False
    hub_model_id: str | None = None


def parse_args(argv: list[str] | None = None) -> tuple[DataArguments, ModelArguments, TrainArguments]:
    return parse_dataclasses((DataArguments, ModelArguments, TrainArguments), argv)


# ----- the classifier -----
def inverse_frequency_weights(labels, num_labels: int) -> list[float]:
    """`n / (C · n_c)` per class (scikit-learn's "balanced"): the mean weight over training lesions is 1.
    A class absent from `labels` counts as one lesion."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels).clip(min=1)
    return [float(len(labels) / (num_labels * count)) for count in counts]


def resolve_class_weights(spec: str, train_labels, num_labels: int) -> list[float] | None:
    if spec == "none":
        return None
    if spec == "auto":
        return inverse_frequency_weights(train_labels, num_labels)
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ValueError(f"--class_weights must be auto, none or {num_labels} comma-separated numbers, "
                         f"got '{spec}'") from None
    if len(weights) != num_labels:
        raise ValueError(f"--class_weights has {len(weights)} values but the dataset has {num_labels} classes")
    return weights


def load_classifier(model_args: ModelArguments, label_names: list[str], class_weights: list[float] | None
                    ) -> SLIMPForLesionClassification:
    """The classifier on the pre-trained weights; the head (and only the head) is freshly initialised."""
    base = SLIMPConfig.from_pretrained(model_args.model_dir)
    config = SLIMPConfig.from_dict({  # from_dict runs the config's validation on the new values
        **base.to_dict(), "classifier_features": model_args.classifier_features, "class_weights": class_weights,
        "id2label": dict(enumerate(label_names)), "label2id": None, "architectures": ["SLIMPForLesionClassification"]})
    model, info = SLIMPForLesionClassification.from_pretrained(
        model_args.model_dir, config=config, output_loading_info=True, ignore_mismatched_sizes=True)
    mismatched = {key for key, *_ in info["mismatched_keys"]}
    unexpected = set(info["unexpected_keys"])
    if (set(info["missing_keys"]) | mismatched) - HEAD_KEYS or unexpected:
        raise ValueError(f"{model_args.model_dir} does not hold the SLIMP weights of this config: missing "
                         f"{sorted(set(info['missing_keys']) - HEAD_KEYS)}, mismatched {sorted(mismatched - HEAD_KEYS)}, "
                         f"unexpected {sorted(unexpected)}")
    return model


def check_schema(model: SLIMPForLesionClassification, schema: dict) -> None:
    """Log dataset inputs the checkpoint does not know (ignored) and checkpoint inputs the data lacks (missing)."""
    for level in ("lesion", "patient"):
        known = set(getattr(model.config, f"{level}_metadata_config").feature_names)
        offered = set(schema[level]["numerical"]) | set(schema[level]["categorical"])
        if offered - known:
            logger.warning("%s columns unknown to the checkpoint, ignored: %s (continual pre-training, "
                           "`training/pretrain.py --init_from CKPT --continual`, adapts a checkpoint to new columns)",
                           level, sorted(offered - known), main_process_only=True)
        if known - offered:
            logger.info("%s inputs of the checkpoint absent from the data, treated as missing: %s", level,
                        sorted(known - offered), main_process_only=True)


def unused_by_classifier(model: SLIMPForLesionClassification) -> list[nn.Module | nn.Parameter]:
    """Pre-training-only parts, and the metadata towers `classifier_features` leaves out."""
    slimp, features = model.slimp, model.config.classifier_features.split("+")
    parts: list = [slimp.lesion_logit_scale, slimp.patient_logit_scale, slimp.phenotype_projection]
    if slimp.patient_pooling is not None:
        parts.append(slimp.patient_pooling)
    if "lesion" not in features:
        parts += [slimp.lesion_metadata_model, slimp.lesion_metadata_projection]
    if "patient" not in features:
        parts += [slimp.patient_metadata_model, slimp.patient_metadata_projection]
    return parts


def lora_target_pattern(model_args: ModelArguments, classifier_features: str) -> str:
    """A regex (peft full-matches it against module names) for the named layers of the towers in use only,
    so that no other layer, and no tower the head ignores, gets an adapter."""
    towers = "|".join(TOWERS[part] for part in classifier_features.split("+"))
    names = "|".join(re.escape(name.strip()) for name in model_args.lora_target_modules.split(",") if name.strip())
    return rf"slimp\.({towers})\.(.*\.)?({names})"


def prepare_for_mode(model: SLIMPForLesionClassification, model_args: ModelArguments) -> nn.Module:
    """Freeze (linear, full) or wrap with LoRA (lora); returns the model to train."""
    if model_args.mode == "linear":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model
    if model_args.mode == "full":
        for part in unused_by_classifier(model):
            part.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                        target_modules=lora_target_pattern(model_args, model.config.classifier_features),
                        modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    adapted = {name for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    for part in model.config.classifier_features.split("+"):
        if not any(f".slimp.{TOWERS[part]}." in name for name in adapted):
            logger.warning("LoRA: no layer named %s in the %s tower; it stays frozen (name others with "
                           "--lora_target_modules)", model_args.lora_target_modules, part, main_process_only=True)
    if not adapted:
        raise ValueError(f"LoRA: no layer matches --lora_target_modules {model_args.lora_target_modules}")
    return peft_model


def set_train_mode(model: nn.Module, mode: str) -> None:
    """Training mode, except a linear probe's frozen backbone (deterministic features)."""
    model.train()
    if mode == "linear":
        getattr(model, "module", model).slimp.eval()  # `module`: under DDP


# ----- evaluation -----
def evaluate_split(model: nn.Module, collator: SLIMPCollator, dataset, batch_size: int) -> dict[str, float]:
    logits, labels = predict_split(model, dataset, collator, batch_size=batch_size)
    return classification_metrics(labels, logits, patient_ids=dataset["patient_id"])


# ----- training -----
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    for name, value in state.items():
        parameters[name].copy_(value)


def train_loop(model, optimizer, scheduler, loader, sampler, transform: BatchTransform, accelerator: Accelerator,
               args: TrainArguments, mode: str, max_steps: int, validate) -> tuple[list[dict], dict]:
    """Train `max_steps` optimizer steps; `validate(model) -> AUROC` every `eval_steps` on the main process.

    Returns the logged history and the best validation result: {"step", "auroc", "state"} (trainable
    weights on the CPU; "state" None if never measured)."""
    history: list[dict] = []
    best = {"step": None, "auroc": -math.inf, "state": None}
    progress = tqdm(total=max_steps, disable=not accelerator.is_local_main_process, desc=f"fine-tuning ({mode})")
    step, epoch = 0, 0
    set_train_mode(model, mode)
    while step < max_steps:
        sampler.set_epoch(epoch)
        loader.collate_fn.set_epoch(epoch)
        for batch in loader:
            batch = transform(batch, accelerator.device)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == max_steps:
                record = {"step": step, "train/loss": loss.item(), "train/learning_rate": scheduler.get_last_lr()[0]}
                history.append(record)
                accelerator.log(record, step=step)
                progress.set_postfix(loss=f"{record['train/loss']:.3f}")
            if args.eval_steps > 0 and step % args.eval_steps == 0:
                if accelerator.is_main_process:
                    unwrapped = accelerator.unwrap_model(model)
                    value = validate(unwrapped)
                    history.append({"step": step, "validation/auroc": value})
                    logger.info("step %d validation AUROC %.4f", step, value)
                    if value > best["auroc"]:  # NaN (a one-class split) never counts as best
                        best = {"step": step, "auroc": value, "state": trainable_state(unwrapped)}
                    set_train_mode(model, mode)
                accelerator.wait_for_everyone()
            if step >= max_steps:
                break
        else:
            epoch += 1
    progress.close()
    return history, best


# ----- saving -----
LORA_CARD_SECTION = """## Loading this LoRA adapter

This folder holds a LoRA adapter (`adapter_model.safetensors`, with the trained `classifier` head), not
full weights. Load it onto the pre-trained SLIMP checkpoint it was trained from (`{base}`):

```python
from peft import PeftModel
from modeling_slimp import SLIMPConfig, SLIMPForLesionClassification

config = SLIMPConfig.from_pretrained("path/to/this/folder")   # the classifier's labels, features, class weights
base = SLIMPForLesionClassification.from_pretrained("{base}", config=config)
model = PeftModel.from_pretrained(base, "path/to/this/folder").eval()
merged = model.merge_and_unload()   # a plain SLIMPForLesionClassification, e.g. for `pipeline`
```

"""


def save_outputs(model: nn.Module, processor: SLIMPProcessor, model_args: ModelArguments, data_args: DataArguments,
                 args: TrainArguments, schema: dict, results: dict) -> nn.Module:
    """The classifier folder (merged for `--merge`); returns the model that was saved."""
    adapter = model_args.mode == "lora" and not model_args.merge
    if model_args.mode == "lora" and model_args.merge:
        model = model.merge_and_unload()
    save_release(model, processor, args.output_dir, schema, data_args.dataset_dir, results, task="classification",
                 hub_model_id=args.hub_model_id)
    if adapter:  # the card gets its loading section first, then the folder goes to the Hub
        add_adapter_card_section(Path(args.output_dir) / "README.md", model_args.model_dir)
    if args.push_to_hub:
        if not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-org/slimp-isic2024-lora)")
        push_release(args.output_dir, args.hub_model_id)
    return model


def add_adapter_card_section(card: Path, base: str) -> None:
    """Mark the card as a peft adapter of `base` (a Hub id goes into `base_model`) and show how to load it."""
    _, header, body = card.read_text().split("---", 2)
    meta = {**yaml.safe_load(header), "library_name": "peft"}
    if not Path(base).exists():
        meta["base_model"] = base
    anchor, section = "## How to use", LORA_CARD_SECTION.replace("{base}", base)
    body = body.replace(anchor, section + anchor, 1) if anchor in body else body + section
    card.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---" + body)


def main(argv: list[str] | None = None) -> dict:
    """Returns {"classification": {split: metrics}, "history", "best_step", "class_weights", "model"} (the
    saved model, in memory) on the main process."""
    data_args, model_args, args = parse_args(argv)
    if model_args.mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got '{model_args.mode}'")
    if model_args.merge and model_args.mode != "lora":
        raise ValueError("--merge applies to --mode lora only")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    train_split, schema = load_slimp_dataset(data_args.dataset_dir, "train")
    validation_split, _ = load_slimp_dataset(data_args.dataset_dir, "validation")
    test_split, _ = load_slimp_dataset(data_args.dataset_dir, "test")
    label_names = list(schema["label"]["names"])
    class_weights = resolve_class_weights(model_args.class_weights, train_split["label"], len(label_names))
    model = load_classifier(model_args, label_names, class_weights)
    check_schema(model, schema)
    processor = SLIMPProcessor.from_pretrained(model_args.model_dir)
    processor.config = model.config  # one schema object for processor and model; config.json = the classifier's
    model = prepare_for_mode(model, model_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("mode %s: %d of %d parameters train; class weights %s", model_args.mode, trainable,
                sum(p.numel() for p in model.parameters()), class_weights, main_process_only=True)

    sampler = PatientBatchSampler(train_split["patient_id"], data_args.patients_per_batch, data_args.max_lesions_per_patient,
                                  labels=train_split["label"], seed=args.seed, num_replicas=accelerator.num_processes,
                                  rank=accelerator.process_index, include_malignant=data_args.include_malignant)
    # The sampler shards by rank itself: the loader is not passed through accelerator.prepare.
    loader = DataLoader(train_split, batch_sampler=sampler, num_workers=data_args.num_workers,
                        collate_fn=SLIMPCollator(processor, train=True, seed=args.seed))
    eval_collator = SLIMPCollator(processor, train=False)
    steps_per_epoch = max(1, len(sampler) // args.gradient_accumulation_steps)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    args.learning_rate = args.learning_rate or DEFAULT_LEARNING_RATES[model_args.mode]
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, max_steps // 2), max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def validation_auroc(unwrapped: nn.Module) -> float:
        return evaluate_split(unwrapped, eval_collator, validation_split, data_args.eval_batch_size)["auroc"]

    history, best = train_loop(model, optimizer, scheduler, loader, sampler, BatchTransform(processor), accelerator, args,
                               model_args.mode, max_steps, validation_auroc)
    accelerator.wait_for_everyone()
    result: dict = {"history": history}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        best_step = max_steps
        if args.load_best_model_at_end and best["state"] is not None and best["step"] != max_steps:
            if best["auroc"] > validation_auroc(unwrapped):
                restore_state(unwrapped, best["state"])
                best_step = best["step"]
                logger.info("restored the weights of step %d (validation AUROC %.4f)", best_step, best["auroc"])
        scores = {name: evaluate_split(unwrapped, eval_collator, split, data_args.eval_batch_size)
                  for name, split in (("validation", validation_split), ("test", test_split))}
        logger.info("results %s", json.dumps(scores))
        result.update(classification=scores, best_step=best_step, class_weights=class_weights, mode=model_args.mode)
        results = {**result, "train_args": asdict(args), "data_args": asdict(data_args), "model_args": asdict(model_args)}
        result["model"] = save_outputs(unwrapped, processor, model_args, data_args, args, schema, results).eval()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    outcome = main()
    if "classification" in outcome:
        print(json.dumps(outcome["classification"], indent=1))
