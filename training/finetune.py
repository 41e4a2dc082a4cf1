"""Fine-tune a pre-trained SLIMP checkpoint into a lesion classifier: linear probe, full, or LoRA.

    python training/finetune.py --model_dir outputs/slimp-synthetic --dataset_dir data/synthetic \\
        --output_dir outputs/slimp-synthetic-linear --mode linear
    python training/finetune.py --model_dir outputs/slimp-synthetic --dataset_dir data/synthetic \\
        --output_dir outputs/slimp-synthetic-full --mode full --learning_rate 5e-5 --max_steps 600 \\
        --eval_strategy steps --eval_steps 100 --save_steps 100 --load_best_model_at_end
    python training/finetune.py --model_dir outputs/slimp-synthetic --dataset_dir data/synthetic \\
        --output_dir outputs/slimp-synthetic-lora --mode lora --lora_r 8 --merge
    python training/finetune.py my_finetune.yaml         # a YAML/JSON config-file shortcut (keys = the options)
    accelerate launch training/finetune.py --model_dir ...   # several processes (transformers.Trainer's DDP)

Modes (`--mode`):
- `linear`: the backbone stays frozen and its features are computed once, over whole patients (phenotype
  and patient context exact); the head is the logistic-regression probe of `training/evaluate.py` fitted
  on them (standardisation folded into the linear layer). No gradient step, about one feature pass.
- `full`: `transformers.Trainer` trains every parameter the classifier uses (the pre-training-only parts,
  i.e. the logit scales and the phenotype projection/pooling, and a tower the head ignores, stay frozen).
- `lora`: `transformers.Trainer` with peft LoRA on the `q_proj`/`v_proj` attention projections of the
  image tower and of the metadata towers the head reads; `classifier` is a `modules_to_save`. `--merge`
  merges the adapter (`merge_and_unload`) and saves a plain classifier; without it the folder holds the
  adapter, the classifier's config and code, the processor, and a card that shows how to load it.

Every `transformers.TrainingArguments` option applies to `full` and `lora` (gradient accumulation,
`--bf16`/`--fp16`, `--resume_from_checkpoint`, `--report_to`, `--eval_strategy`, `--load_best_model_at_end`,
...). Trainer batches are `--per_device_train_batch_size` patients (or near-equal chunks of at most
`--max_lesions_per_patient` lesions of a larger one), so the patient context compares each lesion with
its own patient's others. Evaluation (`SLIMPTrainer.evaluate`) is the project's one evaluation pass over
whole patients: AUROC, the ISIC 2024 pAUC above 80% TPR, the ISIC 2024 patient metric (top-15
sensitivity) and balanced accuracy.

`--output_dir` is the release folder (the Hub repo: classifier, processor, README.md with the measured
results, results.json); Trainer's checkpoints go to `--checkpoint_dir` (default `OUTPUT_DIR-checkpoints`),
beside it. `--push_to_hub --hub_model_id ORG/NAME` uploads the release folder's model, processor, card and
code files only. Both folders are locked for the run (a second run on them stops, naming the first's pid);
neither may be, hold or lie inside the dataset or the pre-trained checkpoint. A train split of one class is
an error naming it; a validation or test split of one class, or a class missing from a split, is a warning
naming it. `results.json` records the learning rate actually used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments


from modeling_slimp import SLIMPConfig, SLIMPForLesionClassification, SLIMPProcessor
from modeling_slimp.configuration_slimp import (
    CLASSIFIER_FEATURES,
    CLASSIFIER_REPRESENTATIONS,
    DEFAULT_CLASSIFIER_FEATURES,
    DEFAULT_CLASSIFIER_REPRESENTATION,
)
from training.arguments import ArgumentError, DatasetError, check_source, parse_dataclasses, run_cli
from training.checkpointing import CheckpointError, find_trainer_checkpoint, write_manifest
from training.data.collate import AugmentingCollator, DecodingCollator
from training.data.dataset import class_counts, column_list, load_slimp_dataset
from training.data.sampler import PatientChunks
from training.embeddings import predict_images_only, predict_split
from training.labels import LabelError, describe, positive_class
from training.metrics import classification_metrics
from training.precision import SLOW_BF16_HELP, warn_if_slow_bf16
from training.probe import fit_probe
from training.release import IMAGES_ONLY_SPLIT, RELEASE_FILES, is_hub_id, public_value, push_release, save_release
from training.safety import check_apart, check_writable_release, locked

logger = logging.getLogger(__name__)

MODES = ("linear", "full", "lora")
DEFAULT_LEARNING_RATES = {"full": 5e-5, "lora": 5e-4}
TOWERS = {"image": "vision_model", "lesion": "lesion_metadata_model", "patient": "patient_metadata_model", "context": None}
HEAD_KEYS = {"classifier.weight", "classifier.bias"}


@dataclass
class DataArguments:
    dataset_dir: str = field(metadata={"help": "A dataset from `python -m training.prepare_data` (docs/data_format.md)."})
    max_lesions_per_patient: int = field(default=32, metadata={"help": "K: a patient with more lesions is split into near-equal chunks of at most K (one Trainer item each)."})
    eval_batch_size: int = field(default=256, metadata={"help": "Most lesions per evaluation batch (whole patients; phenotype and context are exact for any size)."})

    def __post_init__(self):
        if self.max_lesions_per_patient < 1 or self.eval_batch_size < 1:
            raise ArgumentError("--max_lesions_per_patient and --eval_batch_size must be at least 1")


@dataclass
class ModelArguments:
    model_dir: str = field(metadata={"help": "A pre-trained SLIMP checkpoint folder (or Hub id)."})
    mode: str = field(default="linear", metadata={"help": f"One of {MODES}."})
    classifier_features: str = field(default=DEFAULT_CLASSIFIER_FEATURES, metadata={"help": f"What the head reads: one of {CLASSIFIER_FEATURES}."})
    representation: str = field(default=DEFAULT_CLASSIFIER_REPRESENTATION, metadata={"help": f"Which features of each tower the head reads: one of {CLASSIFIER_REPRESENTATIONS} (tower outputs before the projections, or the projected features)."})
    class_weights: str = field(default="auto", metadata={"help": "auto (inverse train frequency) | none | w0,w1,..."})
    positive_label: str | None = field(default=None, metadata={"help": "The positive class (a label name or id): the class whose score pAUC, top-15 and the binary AUROC rank, written in the card and config.json. Default: the label name that is a known malignant diagnosis ('malignant', 'melanoma', 'mel', ...); a binary labelling without one is refused."})
    probe_C: float = field(default=1.0, metadata={"help": "--mode linear: inverse L2 strength of the logistic-regression head (as evaluate.py's probe)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling (alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={"help": "Layer names adapted in each tower the head uses."})
    merge: bool = field(default=False, metadata={"help": "--mode lora: merge the adapter and save a plain classifier."})
    base_model_id: str | None = field(default=None, metadata={"help": "Hub id of the pre-trained checkpoint, for the card's base_model and loading code (default: --model_dir when it is a Hub id)."})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ArgumentError(f"--mode must be one of {MODES}, got '{self.mode}'")
        if self.merge and self.mode != "lora":
            raise ArgumentError("--merge applies to --mode lora only")
        if self.classifier_features not in CLASSIFIER_FEATURES:
            raise ArgumentError(f"--classifier_features must be one of {CLASSIFIER_FEATURES}, got '{self.classifier_features}'")
        if self.representation not in CLASSIFIER_REPRESENTATIONS:
            raise ArgumentError(f"--representation must be one of {CLASSIFIER_REPRESENTATIONS}, got '{self.representation}'")
        if self.class_weights not in ("auto", "none") and not re.fullmatch(r"[0-9.eE+-]+(,[0-9.eE+-]+)*", self.class_weights):
            raise ArgumentError(f"--class_weights must be auto, none or comma-separated numbers, got '{self.class_weights}'")
        if self.base_model_id is None and is_hub_id(self.model_dir):
            self.base_model_id = self.model_dir


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with SLIMP's defaults; `--output_dir` is the release folder."""

    output_dir: str = field(default="outputs/slimp-classifier", metadata={"help": "The release folder: classifier, processor, card, results.json (what --push_to_hub uploads)."})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "Trainer's checkpoints (default: OUTPUT_DIR-checkpoints, beside the release folder)."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps (full, lora); <= 0 uses num_train_epochs."})
    learning_rate: float = field(default=0.0, metadata={"help": f"Peak learning rate (full, lora); 0 takes the mode's default {DEFAULT_LEARNING_RATES} (results.json records the rate used)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Patients (or chunks of a large one) per batch and device."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (transformers SchedulerType)."})
    warmup_steps: float = field(default=10, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    logging_steps: float = field(default=20, metadata={"help": "Log the training loss every this many steps."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every this many steps (with --save_strategy steps)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    metric_for_best_model: str | None = field(default="auroc", metadata={"help": "The validation metric of --load_best_model_at_end."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator needs the image and metadata columns."})
    dataloader_num_workers: int = field(default=1, metadata={"help": "DataLoader workers (they decode and augment images)."})
    seed: int = field(default=0, metadata={"help": "Seed of the head's initialisation, the data order and the augmentations."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (full, lora). " + SLOW_BF16_HELP})

    def __post_init__(self):
        release = Path(self.output_dir)
        self.checkpoint_dir = self.checkpoint_dir or str(release.with_name(release.name + "-checkpoints"))
        if Path(self.checkpoint_dir).resolve().is_relative_to(release.resolve()):
            raise ArgumentError(f"--checkpoint_dir {self.checkpoint_dir} is inside --output_dir {self.output_dir}, the folder "
                                "that is published; put it beside it")
        if self.push_to_hub and not self.hub_model_id:
            raise ArgumentError("--push_to_hub needs --hub_model_id (e.g. your-org/slimp-isic2024-classifier)")
        super().__post_init__()


def parse_args(argv: list[str] | None = None) -> tuple[DataArguments, ModelArguments, FinetuneTrainingArguments]:
    """The options; for `full` and `lora`, a `--learning_rate` of 0 becomes the mode's default, the rate used."""
    data_args, model_args, args = parse_dataclasses((DataArguments, ModelArguments, FinetuneTrainingArguments), argv)
    if model_args.mode != "linear" and not args.learning_rate:
        args.learning_rate = DEFAULT_LEARNING_RATES[model_args.mode]
    return data_args, model_args, args


def check_outputs(data_args: DataArguments, model_args: ModelArguments, args: FinetuneTrainingArguments) -> None:
    """No output folder is, holds or lies inside an input (the dataset, a local pre-trained checkpoint), and the
    release folder holds no file of a release's names that SLIMP did not write (`training.safety`)."""
    inputs = {"the --dataset_dir": data_args.dataset_dir}
    if Path(model_args.model_dir).exists():  # not a Hub id
        inputs["the --model_dir checkpoint"] = model_args.model_dir
    for option in ("output_dir", "checkpoint_dir"):
        check_apart(getattr(args, option), f"--{option}", inputs)
    check_writable_release(args.output_dir, "--output_dir", RELEASE_FILES)


def check_classes(splits: dict, label_names: list[str], dataset_dir: str) -> None:
    """A train split of one class is a DatasetError naming it: no classifier can be trained on it. A validation
    or test split of one class, or a split without some class, is a loud warning naming the split and the
    classes (its AUROC or per-class metrics are undefined, recorded as null)."""
    for name, split in splits.items():
        counts = class_counts(split, label_names)
        present = [label for label, count in counts.items() if count]
        absent = [label for label, count in counts.items() if not count]
        if name == "train" and len(present) < 2:
            raise DatasetError(f"split 'train' of {dataset_dir} holds "
                               + (f"one class only ('{present[0]}', {counts[present[0]]} lesions)" if present else "no lesion")
                               + ": no classifier can be trained on it. Convert the data with more patients or other "
                               "split fractions.")
        if len(present) == 1:
            logger.warning("!!! split '%s' of %s holds one class only ('%s'): its AUROC and pAUC are undefined (null in "
                           "results.json)", name, dataset_dir, present[0])
        elif present and absent:
            logger.warning("split '%s' of %s has no lesion of class %s: its per-class metrics are undefined there", name,
                           dataset_dir, ", ".join(map(repr, absent)))


def trainer_arguments(args: FinetuneTrainingArguments, mode: str) -> TrainingArguments:
    """What Trainer itself gets: checkpoints in `checkpoint_dir`, the mode's learning rate, no push (the
    release folder, not Trainer's, is what gets pushed)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values.update(output_dir=args.checkpoint_dir, learning_rate=args.learning_rate or DEFAULT_LEARNING_RATES[mode],
                  push_to_hub=False)
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        values["dataloader_pin_memory"] = False  # nothing to pin to: torch would warn at every loader
    return TrainingArguments(**values)


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
    weights = [float(w) for w in spec.split(",")]
    if len(weights) != num_labels:
        raise ArgumentError(f"--class_weights has {len(weights)} values but the dataset has {num_labels} classes")
    return weights


def load_classifier(model_args: ModelArguments, label_names: list[str], class_weights: list[float] | None
                    ) -> SLIMPForLesionClassification:
    """The classifier on the pre-trained weights; the head (and only the head) is freshly initialised."""
    base = SLIMPConfig.from_pretrained(model_args.model_dir)
    config = SLIMPConfig.from_dict({  # from_dict runs the config's validation on the new values
        **base.to_dict(), "classifier_features": model_args.classifier_features,
        "classifier_representation": model_args.representation, "class_weights": class_weights,
        "id2label": dict(enumerate(label_names)), "label2id": None, "architectures": ["SLIMPForLesionClassification"]})
    # transformers' load report would warn that the head is MISSING: it is meant to be, and the keys are checked below.
    report, quiet = logging.getLogger("transformers.modeling_utils"), lambda record: "LOAD REPORT" not in record.getMessage()
    report.addFilter(quiet)
    try:
        model, info = SLIMPForLesionClassification.from_pretrained(
            model_args.model_dir, config=config, output_loading_info=True, ignore_mismatched_sizes=True)
    finally:
        report.removeFilter(quiet)
    mismatched = {key for key, *_ in info["mismatched_keys"]}
    unexpected = set(info["unexpected_keys"])
    if (set(info["missing_keys"]) | mismatched) - HEAD_KEYS or unexpected:
        raise ValueError(f"{model_args.model_dir} does not hold the SLIMP weights of this config: missing "
                         f"{sorted(set(info['missing_keys']) - HEAD_KEYS)}, mismatched {sorted(mismatched - HEAD_KEYS)}, "
                         f"unexpected {sorted(unexpected)}")
    logger.info("the pre-trained weights of %s are loaded; the head (%s) is new", model_args.model_dir, ", ".join(sorted(HEAD_KEYS)))
    return model


def check_schema(model: SLIMPForLesionClassification, schema: dict) -> None:
    """Log dataset inputs the checkpoint does not know (ignored) and checkpoint inputs the data lacks (missing)."""
    for level in ("lesion", "patient"):
        known = set(getattr(model.config, f"{level}_metadata_config").feature_names)
        offered = set(schema[level]["numerical"]) | set(schema[level]["categorical"])
        if offered - known:
            logger.warning("%s columns unknown to the checkpoint, ignored: %s (continual pre-training, "
                           "`training/pretrain.py --init_from CKPT --continual`, adapts a checkpoint to new columns)",
                           level, sorted(offered - known))
        if known - offered:
            logger.info("%s inputs of the checkpoint absent from the data, treated as missing: %s", level, sorted(known - offered))


def unused_by_classifier(model: SLIMPForLesionClassification) -> list[nn.Module | nn.Parameter]:
    """Pre-training-only parts, the projections a tower-representation head skips, and the towers it ignores."""
    slimp, parts = model.slimp, model.parts
    unused: list = [slimp.lesion_logit_scale, slimp.patient_logit_scale, slimp.phenotype_projection]
    if slimp.patient_pooling is not None:
        unused.append(slimp.patient_pooling)
    if model.config.classifier_representation == "tower":
        unused += [slimp.visual_projection, slimp.lesion_metadata_projection, slimp.patient_metadata_projection]
    if "lesion" not in parts:
        unused += [slimp.lesion_metadata_model, slimp.lesion_metadata_projection]
    if "patient" not in parts:
        unused += [slimp.patient_metadata_model, slimp.patient_metadata_projection]
    return unused


def lora_target_pattern(model_args: ModelArguments, classifier_features: str) -> str:
    """A regex (peft full-matches it against module names) for the named layers of the towers in use only,
    so that no other layer, and no tower the head ignores, gets an adapter."""
    towers = "|".join(TOWERS[part] for part in classifier_features.split("+") if TOWERS[part])
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
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    adapted = {name for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    for part in model.parts:
        if TOWERS[part] and not any(f".slimp.{TOWERS[part]}." in name for name in adapted):
            logger.warning("LoRA: no layer named %s in the %s tower; it stays frozen (name others with "
                           "--lora_target_modules)", model_args.lora_target_modules, part)
    if not adapted:
        raise ArgumentError(f"LoRA: no layer matches --lora_target_modules {model_args.lora_target_modules}")
    return peft_model


# ----- linear mode: the probe, fitted once on frozen features -----
@torch.no_grad()
def fit_linear_head(model: SLIMPForLesionClassification, train_split, collator: DecodingCollator, model_args: ModelArguments,
                    class_weights: list[float] | None, seed: int, batch_size: int) -> None:
    """Compute the frozen features of the train split once (whole patients) and set `model.classifier` to
    the logistic-regression probe fitted on them (standardisation folded into the weights)."""
    _, labels, extras = predict_split(model, train_split, collator, batch_size=batch_size, return_features=True,
                                      desc="features of train")
    inputs = np.concatenate([extras[part] for part in model.parts], axis=1)  # the head's input, in its order
    weights = None if class_weights is None else dict(enumerate(class_weights))
    probe = fit_probe(inputs, labels, seed=seed, C=model_args.probe_C, class_weight=weights)
    scaler, regression = probe.steps[0][1], probe.steps[1][1]
    coef = regression.coef_ / scaler.scale_  # (C', F)
    intercept = regression.intercept_ - coef @ scaler.mean_
    num_labels, classes = model.config.num_labels, [int(c) for c in regression.classes_]
    weight, bias = torch.zeros(num_labels, inputs.shape[1], dtype=torch.float64), torch.zeros(num_labels, dtype=torch.float64)
    if len(classes) == 2:  # one row: log-odds of classes[1] vs classes[0]
        weight[classes[1]], bias[classes[1]] = torch.from_numpy(coef[0]), float(intercept[0])
    else:
        weight[classes], bias[classes] = torch.from_numpy(coef), torch.from_numpy(intercept)
        bias[[c for c in range(num_labels) if c not in classes]] = -1e4  # a class never seen is never predicted
    model.classifier.weight.copy_(weight.to(model.classifier.weight.dtype))
    model.classifier.bias.copy_(bias.to(model.classifier.bias.dtype))


# ----- Trainer -----
class EpochCallback(TrainerCallback):
    """Mixes the epoch into the seeded augmentations, and writes a sha256 manifest into every checkpoint."""

    def __init__(self, collator: AugmentingCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class SLIMPTrainer(Trainer):
    """`transformers.Trainer` whose evaluation is the project's one evaluation pass: whole patients, the
    patient context over all of a patient's lesions, and the ISIC 2024 metrics (`classification_metrics`)."""

    def __init__(self, *args, eval_collator: DecodingCollator, eval_batch_size: int = 256, positive: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator, self.eval_batch_size, self.positive = eval_collator, eval_batch_size, positive

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        logits, labels = predict_split(model, dataset, self.eval_collator, batch_size=self.eval_batch_size,
                                       device=self.args.device)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in
                   classification_metrics(labels, logits, patient_ids=column_list(dataset, "patient_id"),
                                          positive_class=self.positive).items()}
        model.train()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


# ----- saving -----
def save_outputs(model: nn.Module, processor: SLIMPProcessor, model_args: ModelArguments, data_args: DataArguments,
                 args: FinetuneTrainingArguments, schema: dict, results: dict) -> nn.Module:
    """The release folder (merged for `--merge`); returns the model that was saved."""
    adapter = model_args.mode == "lora" and not model_args.merge
    if model_args.mode == "lora" and model_args.merge:
        model = model.merge_and_unload()
    save_release(model, processor, args.output_dir, schema, data_args.dataset_dir, results,
                 task="adapter" if adapter else "classification", hub_model_id=args.hub_model_id,
                 base_model=model_args.base_model_id)
    if adapter:
        save_adapter_code(model, args.output_dir)
    if args.push_to_hub:
        push_release(args.output_dir, args.hub_model_id)
    return model


def save_adapter_code(model, output_dir: str) -> None:
    """An adapter folder also gets the classifier's code files and config (its auto_map names them), so that
    `AutoConfig.from_pretrained(folder, trust_remote_code=True)` works without this package."""
    from transformers.dynamic_module_utils import custom_object_save

    base = model.get_base_model()
    custom_object_save(base, output_dir, config=base.config)
    base.config.save_pretrained(output_dir)


# What decided a run, for its card: every TrainingArguments value is in results.json (tokens masked).
CARD_TRAINING_KEYS = ("max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
                      "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "bf16", "gradient_checkpointing")


def card_arguments(model_args: ModelArguments, data_args: DataArguments, train_args: dict) -> dict:
    """The card's "Training procedure": the mode and base checkpoint first, the classifier and data arguments,
    and the optimisation arguments a gradient-trained mode used (a linear head is fitted, not stepped)."""
    model = dataclasses.asdict(model_args)
    training = {key: train_args[key] for key in CARD_TRAINING_KEYS if key in train_args}
    if model_args.mode == "linear":
        training = {"seed": train_args.get("seed"), "fitted": f"logistic regression, C = {model_args.probe_C}"}
    return public_value({"mode": model.pop("mode"), "base model": model.pop("model_dir"), **model,
                         "data": dataclasses.asdict(data_args), "training": training})


def main(argv: list[str] | None = None) -> dict:
    """Returns {"classification": {split: metrics}, "history", "class_weights", "mode", "model"} (the saved
    model, in memory) on the main process."""
    data_args, model_args, args = parse_args(argv)
    check_outputs(data_args, model_args, args)
    check_source(model_args.model_dir, "--model_dir", "model")
    check_source(data_args.dataset_dir, "--dataset_dir", "dataset")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with locked({"release folder (--output_dir)": args.output_dir, "checkpoint folder (--checkpoint_dir)": args.checkpoint_dir},
                enabled=int(os.environ.get("RANK", "0")) == 0):
        check_outputs(data_args, model_args, args)  # again, now that no other run can write them
        return finetune(data_args, model_args, args)


def finetune(data_args: DataArguments, model_args: ModelArguments, args: FinetuneTrainingArguments) -> dict:
    """The run itself (`main` holds the locks of its folders)."""
    torch.manual_seed(args.seed)
    train_split, schema = load_slimp_dataset(data_args.dataset_dir, "train")
    validation_split, _ = load_slimp_dataset(data_args.dataset_dir, "validation")
    test_split, _ = load_slimp_dataset(data_args.dataset_dir, "test")
    label_names = list(schema["label"]["names"])
    try:
        positive = positive_class(label_names, model_args.positive_label)
    except LabelError as error:
        raise ArgumentError(str(error)) from None
    logger.info(describe(label_names, positive))
    if args.bf16 and model_args.mode != "linear" and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        warn_if_slow_bf16("--bf16", args.use_cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available()), logger)
    check_classes({"train": train_split, "validation": validation_split, "test": test_split}, label_names,
                  data_args.dataset_dir)
    class_weights = resolve_class_weights(model_args.class_weights, column_list(train_split, "label"), len(label_names))
    model = load_classifier(model_args, label_names, class_weights)
    model.config.positive_label = label_names[positive]  # in config.json: the class the card's metrics and the Space score
    check_schema(model, schema)
    processor = SLIMPProcessor.from_pretrained(model_args.model_dir, config=model.config)  # one schema owner: the classifier's config
    processor.check_columns(train_split.column_names)  # once here, not in every data-loader worker
    eval_collator = DecodingCollator(processor, train=False)
    model = prepare_for_mode(model, model_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("mode %s: %d of %d parameters train; class weights %s", model_args.mode, trainable,
                sum(p.numel() for p in model.parameters()), class_weights)

    history, is_main = [], True
    if model_args.mode == "linear":
        fit_linear_head(model, train_split, eval_collator, model_args, class_weights, args.seed, data_args.eval_batch_size)
    else:
        collator = AugmentingCollator(processor, args.seed)
        trainer = SLIMPTrainer(
            model=model, args=trainer_arguments(args, model_args.mode),
            train_dataset=PatientChunks(train_split, max_lesions_per_patient=data_args.max_lesions_per_patient),
            eval_dataset=validation_split, data_collator=collator, processing_class=processor,
            callbacks=[EpochCallback(collator)], eval_collator=eval_collator, eval_batch_size=data_args.eval_batch_size,
            positive=positive)
        trainer.train(resume_from_checkpoint=find_trainer_checkpoint(args.checkpoint_dir, args.resume_from_checkpoint))
        history, is_main = trainer.state.log_history, trainer.is_world_process_zero()
        model = trainer.accelerator.unwrap_model(trainer.model)
    result: dict = {"history": history}
    if is_main:
        scores = {}
        for name, split in (("validation", validation_split), ("test", test_split)):
            logits, labels = predict_split(model, split, eval_collator, batch_size=data_args.eval_batch_size,
                                           desc=f"predicting {name}")
            scores[name] = classification_metrics(labels, logits, patient_ids=column_list(split, "patient_id"),
                                                  positive_class=positive)
        if model.config.classifier_features != "image":  # what pipeline() and the Hub widget will see
            logits = predict_images_only(model, test_split, processor, batch_size=min(data_args.eval_batch_size, 64))
            scores[IMAGES_ONLY_SPLIT] = classification_metrics(np.asarray(column_list(test_split, "label")), logits,
                                                               patient_ids=column_list(test_split, "patient_id"),
                                                               positive_class=positive)
            logger.warning("this classifier reads %s; given images only (as pipeline('image-classification') and the "
                           "Hub widget give it) its test AUROC is %.3f, vs %.3f with metadata and context. For image-only "
                           "use, fine-tune with --classifier_features image.", model.config.classifier_features,
                           scores[IMAGES_ONLY_SPLIT]["auroc"], scores["test"]["auroc"])
        logger.info("results %s", json.dumps(scores))
        result.update(classification=scores, class_weights=class_weights, mode=model_args.mode,
                      positive_label=label_names[positive])
        train_args = {**args.to_dict(), "learning_rate": None if model_args.mode == "linear" else args.learning_rate}
        results = {**result, "train_args": public_value(train_args), "data_args": public_value(dataclasses.asdict(data_args)),
                   "model_args": public_value(dataclasses.asdict(model_args)),
                   "card_args": card_arguments(model_args, data_args, train_args)}
        result["model"] = save_outputs(model, processor, model_args, data_args, args, schema, results).eval()
    return result


if __name__ == "__main__":
    outcome = run_cli(main, errors=(ArgumentError, CheckpointError, DatasetError))
    if "classification" in outcome:
        print(json.dumps(outcome["classification"], indent=1))
