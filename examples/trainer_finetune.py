"""Fine-tune SLIMP with a plain `transformers.Trainer`, then score a lesion with `pipeline`.

    python examples/trainer_finetune.py --model_dir outputs/slimp-synthetic --dataset_dir data/synthetic \
        --output_dir outputs/slimp-trainer --max_steps 50

What a Trainer user needs to know, in code below:
- `PatientChunks` (`training/data/sampler.py`) makes each Trainer item one patient (or a near-equal chunk of a large one), so a batch of
  `per_device_train_batch_size` items holds whole patients and each lesion's patient context compares it
  with its own patient's other lesions. (With a plain `datasets.Dataset`, pass `remove_unused_columns=False`:
  Trainer would otherwise drop the image and metadata columns before the collator sees them.)
- `SLIMPDataCollator(processor)` (`training/data/collate.py`) turns rows into model inputs with `labels`.
- The loss is divided by Trainer's `num_items_in_batch`, so gradient accumulation equals the large batch.
- `processing_class=processor` makes `save_model` write a folder that `pipeline(...)` loads.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import torch
from transformers import Trainer, TrainingArguments, pipeline

import modeling_slimp  # noqa: F401  (registers the SLIMP classes with the Auto* factories)
from modeling_slimp import SLIMPConfig, SLIMPForLesionClassification, SLIMPProcessor
from modeling_slimp.configuration_slimp import DEFAULT_CLASSIFIER_FEATURES, DEFAULT_CLASSIFIER_REPRESENTATION
from training.data.collate import SLIMPDataCollator
from training.data.sampler import PatientChunks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="a pre-trained SLIMP checkpoint folder (or Hub id)")
    parser.add_argument("--dataset_dir", required=True, help="a dataset from `python -m training.prepare_data`")
    parser.add_argument("--output_dir", required=True, help="where the fine-tuned classifier is saved")
    parser.add_argument("--max_steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--patients_per_batch", type=int, default=8, help="Trainer items (patients) per batch")
    args = parser.parse_args(argv)

    splits = datasets.load_from_disk(args.dataset_dir)
    names = splits["train"].features["label"].names
    config = SLIMPConfig.from_pretrained(args.model_dir)
    # The measured default head (every part, read before the projections), whatever the pre-trained config says
    config.classifier_features, config.classifier_representation = DEFAULT_CLASSIFIER_FEATURES, DEFAULT_CLASSIFIER_REPRESENTATION
    config.id2label, config.label2id = dict(enumerate(names)), {name: i for i, name in enumerate(names)}
    model = SLIMPForLesionClassification.from_pretrained(args.model_dir, config=config)
    processor = SLIMPProcessor.from_pretrained(args.model_dir, config=model.config)  # the model's config owns the schema

    training_args = TrainingArguments(output_dir=args.output_dir + "-checkpoints", max_steps=args.max_steps,
                                      per_device_train_batch_size=args.patients_per_batch, learning_rate=1e-3,
                                      logging_steps=10, save_strategy="no", report_to="none", dataloader_num_workers=0,
                                      dataloader_pin_memory=torch.cuda.is_available())  # nothing to pin to on a CPU
    trainer = Trainer(model=model, args=training_args,
                      train_dataset=PatientChunks(splits["train"], max_lesions_per_patient=16),
                      data_collator=SLIMPDataCollator(processor), processing_class=processor)
    trainer.train()
    trainer.save_model(args.output_dir)
    print(f"saved to {args.output_dir}; training loss {trainer.state.log_history[-1]['train_loss']:.4f}")

    classify = pipeline("image-classification", model=args.output_dir, trust_remote_code=True)
    lesion = splits["test"][0]
    print(f"test lesion {lesion['image_id']} (label {names[lesion['label']]}): {classify(lesion['image'])}")


if __name__ == "__main__":
    main()
