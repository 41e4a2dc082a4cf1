"""`transformers.Trainer` on SLIMP with the library alone (no `training/` import): the data collator, whole-patient
items, gradient accumulation that equals the large batch, and a pipeline-ready save with `processing_class`."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, pipeline

from _synthetic_fixtures import synthetic  # noqa: F401
from modeling_slimp import PatientChunks, SLIMPConfig, SLIMPDataCollator, SLIMPForLesionClassification, SLIMPProcessor


def classifier_and_processor(checkpoint_dir: str, features: str = "image+lesion+patient"):
    config = SLIMPConfig.from_pretrained(checkpoint_dir)
    config.classifier_features, config.num_labels = features, 2
    for tower in (config.lesion_metadata_config, config.patient_metadata_config):
        tower.feature_dropout = 0.0  # no random masking: micro-batches and the large batch draw the same
    torch.manual_seed(0)
    model = SLIMPForLesionClassification.from_pretrained(checkpoint_dir, config=config)
    processor = SLIMPProcessor.from_pretrained(checkpoint_dir)
    processor.config = model.config
    return model, processor


class GradientCapture(TrainerCallback):
    """The accumulated gradients just before the optimizer step (after clipping's norm is logged)."""

    def __init__(self, model):
        self.model, self.gradients = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.gradients = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def first_step(synthetic, tmp_path, batch: int, accumulation: int) -> tuple[dict, dict]:  # noqa: F811
    """Loss, grad norm and the gradients of one optimizer step of `batch` x `accumulation` patients."""
    model, processor = classifier_and_processor(synthetic.checkpoint_dir)
    train = datasets.load_from_disk(synthetic.dataset_dir)["train"]
    args = TrainingArguments(output_dir=str(tmp_path / f"ga{accumulation}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1, logging_steps=1, learning_rate=1e-3,
                             report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0)
    capture = GradientCapture(model)
    trainer = Trainer(model=model, args=args, train_dataset=PatientChunks(train, max_lesions_per_patient=4),
                      data_collator=SLIMPDataCollator(processor), processing_class=processor, callbacks=[capture])
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return logged, capture.gradients


def test_gradient_accumulation_equals_the_large_batch(synthetic, tmp_path):  # noqa: F811
    """The same 8 patients as 1 x 8, 2 x 4 and 4 x 2: the same logged loss, gradient norm and gradients, to
    1e-6 (the loss divides by Trainer's num_items_in_batch, the labelled lesions of all accumulated batches)."""
    runs = {accumulation: first_step(synthetic, tmp_path, 8 // accumulation, accumulation) for accumulation in (1, 2, 4)}
    reference_log, reference_gradients = runs[1]
    assert reference_log["grad_norm"] > 0 and len(reference_gradients) > 50
    for accumulation in (2, 4):
        logged, gradients = runs[accumulation]
        assert logged["loss"] == pytest.approx(reference_log["loss"], rel=1e-6, abs=1e-6), accumulation
        assert logged["grad_norm"] == pytest.approx(reference_log["grad_norm"], rel=1e-6, abs=1e-6), accumulation
        assert gradients.keys() == reference_gradients.keys()
        for name, value in gradients.items():
            torch.testing.assert_close(value, reference_gradients[name], rtol=0, atol=1e-6, msg=f"GA {accumulation}: {name}")


def test_trainer_with_a_plain_dataset_and_a_pipeline_ready_save(synthetic, tmp_path):  # noqa: F811
    """Lesion rows straight from a `datasets.Dataset` (remove_unused_columns=False keeps the image and metadata
    columns for the collator); `processing_class` makes save_model write a folder `pipeline` loads."""
    model, processor = classifier_and_processor(synthetic.checkpoint_dir, "image+lesion+patient+context")
    splits = datasets.load_from_disk(synthetic.dataset_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8, max_steps=2,
                             learning_rate=1e-3, report_to="none", save_strategy="no", remove_unused_columns=False,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=splits["train"], data_collator=SLIMPDataCollator(processor),
                      processing_class=processor)
    before = model.classifier.weight.detach().clone()
    trainer.train()
    assert not torch.equal(model.classifier.weight, before)
    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json"} <= {p.name for p in folder.iterdir()}
    top = pipeline("image-classification", model=str(folder), trust_remote_code=True)(splits["test"][0]["image"])
    assert len(top) == 2 and abs(sum(entry["score"] for entry in top) - 1) < 1e-5
