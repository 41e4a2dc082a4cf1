"""`transformers.Trainer` on SLIMP with the library alone (no `training/` import): the data collator, whole-patient
items, gradient accumulation that equals the large batch, a pipeline-ready save with `processing_class`, and a
2-process gloo run of the classifier with gradient checkpointing."""

from __future__ import annotations

import os
import socket

import datasets
import pytest
import torch
import torch.multiprocessing as mp
from transformers import Trainer, TrainerCallback, TrainingArguments, pipeline

from _synthetic_fixtures import synthetic  # noqa: F401
from conftest import make_batch, tiny_config
from modeling_slimp import SLIMPConfig, SLIMPForLesionClassification, SLIMPProcessor
from training.data.collate import SLIMPDataCollator
from training.data.sampler import PatientChunks


def classifier_and_processor(checkpoint_dir: str, features: str = "image+lesion+patient"):
    config = SLIMPConfig.from_pretrained(checkpoint_dir)
    config.classifier_features, config.num_labels = features, 2
    for tower in (config.lesion_metadata_config, config.patient_metadata_config):
        tower.feature_dropout = 0.0  # no random masking: micro-batches and the large batch draw the same
    torch.manual_seed(0)
    model = SLIMPForLesionClassification.from_pretrained(checkpoint_dir, config=config)
    processor = SLIMPProcessor.from_pretrained(checkpoint_dir, config=model.config)
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


# ----- two processes, gloo, gradient checkpointing -----

WORLD_SIZE = 2


class PatientBatches(torch.utils.data.Dataset):
    """One whole patient per item (the model's inputs for its lesions, and their labels)."""

    def __init__(self, config, num_patients: int = 8):
        self.patients = [make_batch(config, lesions_per_patient=(1 + i % 3,), seed=i) for i in range(num_patients)]

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int) -> dict:
        patient = self.patients[index]
        return {**patient, "labels": torch.arange(len(patient["patient_index"])) % 3}


def collate_patients(items: list[dict]) -> dict:
    """Lesion rows stacked, patient rows stacked, patient_index renumbered."""
    batch = {key: torch.cat([item[key] for item in items]) for key in items[0] if key != "patient_index"}
    batch["patient_index"] = torch.cat([torch.full_like(item["patient_index"], i) for i, item in enumerate(items)])
    return batch


def _trainer_worker(rank: int, workdir: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = tiny_config(feature_dropout=0.0)  # the default head: image+lesion+patient+context, tower outputs
    torch.manual_seed(0)
    model = SLIMPForLesionClassification(config)
    args = TrainingArguments(output_dir=f"{workdir}/out", per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, activation_checkpointing=True, ddp_backend="gloo", use_cpu=True,
                             report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                             remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=PatientBatches(config), data_collator=collate_patients)
    before = model.classifier.weight.detach().clone()
    trainer.train()
    wrapped = trainer.model_wrapped
    torch.save({"world_size": torch.distributed.get_world_size(), "ddp": type(wrapped).__name__,
                "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
                "checkpointing": model.is_activation_checkpointing, "before": before,
                "state": {name: value.detach().clone() for name, value in model.state_dict().items()}},
               f"{workdir}/rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_trainer_with_gradient_checkpointing_trains_the_classifier(tmp_path):
    """Trainer with gradient checkpointing runs DDP with find_unused_parameters=False, which stops at the first
    step on a trainable parameter that gets no gradient (the classifier's contrastive-only weights used to)."""
    mp.spawn(_trainer_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for result in ranks:
        assert result["world_size"] == WORLD_SIZE and result["ddp"] == "DistributedDataParallel"
        assert result["find_unused_parameters"] is False and result["checkpointing"]
    first, second = (result["state"] for result in ranks)
    assert not torch.equal(first["classifier.weight"], ranks[0]["before"])  # it trained ...
    for name, value in first.items():  # ... and both processes hold the same weights (one DDP model)
        torch.testing.assert_close(second[name], value, rtol=0, atol=0, msg=name)
