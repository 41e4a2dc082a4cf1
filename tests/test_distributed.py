"""A 2-process gloo run on CPU equals one process holding the whole global batch.

The processes hold different numbers of patients and lesions (rank 0: 3 patients / 7 lesions, rank 1:
2 patients / 4 lesions, patients whole per rank). Each rank computes its local loss and gradients; the
average over ranks (what DDP does) must equal the single-process loss and gradients on the
concatenated batch, and each rank's logits must be its rows of the global logits.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import concat_batches, make_batch, tiny_config
from modeling_slimp import SLIMPConfig, SLIMPModel
from modeling_slimp.losses import gather_features

WORLD_SIZE = 2
LESIONS_PER_PATIENT = [(1, 4, 2), (3, 1)]  # rank 0: 3 patients / 7 lesions; rank 1: 2 patients / 4 lesions
CASES = {
    "mean": dict(patient_aggregation="mean", lesion_loss_weight=0.5),
    "attention+ssl": dict(patient_aggregation="attention", lesion_loss_weight=0.7, image_ssl_weight=0.3),
}
GATHER_COUNTS = (3, 1)


def _worker(rank: int, workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {"gather": _gather_check(rank)}
        inputs = torch.load(f"{workdir}/inputs.pt")
        for case in CASES:
            # Training mode (the loss gathers across processes only in training); no dropout of any kind.
            model = SLIMPModel(SLIMPConfig.from_dict(inputs[case]["config"])).train()
            model.load_state_dict(inputs[case]["state_dict"])
            batch = inputs["batches"][rank]
            ssl = inputs["ssl_views"][rank] if "ssl" in case else None
            out = model(**batch, ssl_pixel_values=ssl, return_loss=True)
            out.loss.backward()
            terms = {
                name: getattr(out, name).detach().clone()
                for name in ("loss", "lesion_loss", "patient_loss", "image_ssl_loss") if getattr(out, name) is not None
            }
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            for tensor in [*terms.values(), *grads.values()]:  # DDP's averaging
                dist.all_reduce(tensor)
                tensor /= WORLD_SIZE
            results[case] = {"terms": terms, "grads": grads, "logits_per_image": out.logits_per_image.detach(),
                             "logits_per_phenotype": out.logits_per_phenotype.detach()}
        torch.save(results, f"{workdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _gather_check(rank: int) -> dict:
    """gather_features with unequal counts: values in rank order, gradient = sum over ranks of d loss_r / d x."""
    x = torch.full((GATHER_COUNTS[rank], 2), float(rank + 1), requires_grad=True)
    gathered, offset = gather_features(x, rank, WORLD_SIZE)
    weights = torch.arange(2.0 * sum(GATHER_COUNTS)).view(-1, 2) * (rank + 1)  # a different loss on each rank
    (gathered * weights).sum().backward()
    return {"gathered": gathered.detach(), "offset": offset, "grad": x.grad}


def _single_process_reference(config: SLIMPConfig, state_dict: dict, batch: dict, ssl_views) -> dict:
    model = SLIMPModel(config).train()
    model.load_state_dict(state_dict)
    out = model(**batch, ssl_pixel_values=ssl_views, return_loss=True)
    out.loss.backward()
    return {"out": out, "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.slow  # two processes
def test_two_process_loss_and_gradients_equal_single_process(tmp_path):
    config = tiny_config()
    batches = [make_batch(config, sizes, seed=10 + rank) for rank, sizes in enumerate(LESIONS_PER_PATIENT)]
    torch.manual_seed(4)
    ssl_views = [b["pixel_values"] + 0.2 * torch.randn_like(b["pixel_values"]) for b in batches]
    inputs = {"batches": batches, "ssl_views": ssl_views}
    for case, overrides in CASES.items():
        torch.manual_seed(0)
        case_config = tiny_config(feature_dropout=0.0, **overrides)
        model = SLIMPModel(case_config)
        with torch.no_grad():  # distinct scales, so a swapped scale would show
            model.lesion_logit_scale.fill_(2.5)
            model.patient_logit_scale.fill_(1.5)
        inputs[case] = {"config": case_config.to_dict(), "state_dict": model.state_dict()}
    torch.save(inputs, tmp_path / "inputs.pt")

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    # gather_features: values in rank order, offsets, and gradients summed over every rank's loss.
    expected = torch.cat([torch.full((n, 2), float(r + 1)) for r, n in enumerate(GATHER_COUNTS)])
    base = torch.arange(2.0 * sum(GATHER_COUNTS)).view(-1, 2)
    for rank, result in enumerate(ranks):
        gather = result["gather"]
        start = sum(GATHER_COUNTS[:rank])
        assert torch.equal(gather["gathered"], expected) and gather["offset"] == start
        torch.testing.assert_close(gather["grad"], 3.0 * base[start : start + GATHER_COUNTS[rank]])  # (1 + 2) * base

    full_batch = concat_batches(batches)
    n_lesions = [len(b["patient_index"]) for b in batches]
    n_patients = [len(b["patient_numerical_values"]) for b in batches]
    for case in CASES:
        case_config = SLIMPConfig.from_dict(inputs[case]["config"])
        ssl = torch.cat(ssl_views) if "ssl" in case else None
        reference = _single_process_reference(case_config, inputs[case]["state_dict"], full_batch, ssl)
        out, grads = reference["out"], reference["grads"]
        terms = ranks[0][case]["terms"]
        assert terms.keys() == ({"loss", "lesion_loss", "patient_loss", "image_ssl_loss"} if ssl is not None
                                else {"loss", "lesion_loss", "patient_loss"})
        for name, value in terms.items():
            torch.testing.assert_close(value, getattr(out, name).detach(), rtol=1e-5, atol=1e-5, msg=f"{case}: {name}")
        distributed_grads = ranks[0][case]["grads"]
        assert distributed_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(distributed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=f"{case}: {name}")

        # Each rank's logits are (n_local, n_global): its rows of the global matrices.
        lesion_start, patient_start = 0, 0
        for rank, result in enumerate(ranks):
            logits_image, logits_phenotype = result[case]["logits_per_image"], result[case]["logits_per_phenotype"]
            assert logits_image.shape == (n_lesions[rank], sum(n_lesions))
            assert logits_phenotype.shape == (n_patients[rank], sum(n_patients))
            torch.testing.assert_close(logits_image, out.logits_per_image[lesion_start : lesion_start + n_lesions[rank]].detach())
            torch.testing.assert_close(
                logits_phenotype, out.logits_per_phenotype[patient_start : patient_start + n_patients[rank]].detach()
            )
            lesion_start, patient_start = lesion_start + n_lesions[rank], patient_start + n_patients[rank]
