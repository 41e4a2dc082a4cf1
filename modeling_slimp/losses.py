"""SLIMP's losses: cross-process gathering with gradients, symmetric InfoNCE, NT-Xent, the nested loss, and the
classifier's weighted cross-entropy.

Torch only. Every cross-process communication goes through `gather_features`.

Distributed semantics ("local loss + gather with grad", as in open_clip): each process scores its own
rows against the gathered rows of every process, sums its cross-entropy terms and divides by the
*global* count, times the world size. Averaging these local losses over processes (what DDP does to
their gradients) then gives exactly the loss, and the gradient, of one process holding the whole
global batch, even when processes hold different numbers of lesions and patients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather of rows of unequal count; backward returns each process the gradient of its own rows."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, counts: list[int], rank: int, world_size: int) -> torch.Tensor:
        ctx.counts, ctx.rank = counts, rank
        padded = features.new_zeros((max(counts),) + features.shape[1:])
        padded[: features.shape[0]] = features
        gathered = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([chunk[:count] for chunk, count in zip(gathered, counts)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Every process's loss depends on every process's rows: sum the gradients, keep our slice.
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None, None


def gather_features(features: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, int]:
    """Gather (n_local, ...) rows from all processes, with gradients flowing back to the local slice.

    Returns `(all_features, offset)`: all_features (n_global, ...) in rank order, and the index at
    which this process's rows start. With `world_size == 1` it is the identity.
    """
    if world_size == 1:
        return features, 0
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    return _GatherWithGrad.apply(features, counts, rank, world_size), sum(counts[:rank])


def distributed_context() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def clamped_logit_scale(log_scale: torch.Tensor, max_log_scale: float) -> torch.Tensor:
    """The logit scale of a learned log scale: exp(min(log_scale, max_log_scale)), as CLIP (ln 100 cap)."""
    return log_scale.clamp(max=max_log_scale).exp()


def symmetric_infonce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, rank: int = 0, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE (the CLIP loss) between paired rows of `a` and `b`.

    a, b: (n_local, D), L2-normalised, row i of `a` pairs with row i of `b`. logit_scale: () already
    exponentiated. Returns `(loss, logits_a_b)` with logits (n_local, n_global). With fewer than 2
    pairs in the global batch there are no negatives: the loss is 0 (still attached to the graph).
    """
    a_all, offset = gather_features(a, rank, world_size)
    b_all, _ = gather_features(b, rank, world_size)
    logits_ab = logit_scale * a @ b_all.t()  # (n, N)
    logits_ba = logit_scale * b @ a_all.t()  # (n, N)
    n_global = a_all.shape[0]
    if n_global < 2:
        return logits_ab.sum() * 0.0, logits_ab
    targets = torch.arange(a.shape[0], device=a.device) + offset
    total = F.cross_entropy(logits_ab, targets, reduction="sum") + F.cross_entropy(logits_ba, targets, reduction="sum")
    return total * world_size / (2 * n_global), logits_ab


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """SimCLR's NT-Xent between two views. z1, z2: (n_local, D), L2-normalised; returns a scalar.

    Each of the 2·N views is classified against the other 2·N − 1 views of the global batch.
    """
    z1_all, offset = gather_features(z1, rank, world_size)
    z2_all, _ = gather_features(z2, rank, world_size)
    n_local, n_global = z1.shape[0], z1_all.shape[0]
    if n_global < 2:
        return (z1.sum() + z2.sum()) * 0.0
    views_all = torch.cat([z1_all, z2_all])  # (2N, D)
    queries = torch.cat([z1, z2])  # (2n, D)
    logits = queries @ views_all.t() / temperature  # (2n, 2N)
    local = torch.arange(n_local, device=z1.device) + offset
    self_index = torch.cat([local, local + n_global])
    positive = torch.cat([local + n_global, local])
    logits = logits.masked_fill(F.one_hot(self_index, 2 * n_global).bool(), float("-inf"))
    return F.cross_entropy(logits, positive, reduction="sum") * world_size / (2 * n_global)


@dataclass
class NestedLossOutput:
    """Named terms of the nested loss; logits are (n_local, n_global) rows of the global matrices."""

    loss: torch.Tensor
    lesion_loss: torch.Tensor
    patient_loss: torch.Tensor
    image_ssl_loss: torch.Tensor | None
    logits_per_image: torch.Tensor
    logits_per_phenotype: torch.Tensor


def nested_contrastive_loss(
    image_embeds: torch.Tensor,
    lesion_metadata_embeds: torch.Tensor,
    phenotype_embeds: torch.Tensor,
    patient_metadata_embeds: torch.Tensor,
    lesion_logit_scale: torch.Tensor,
    patient_logit_scale: torch.Tensor,
    ssl_image_embeds: torch.Tensor | None = None,
    *,
    lesion_loss_weight: float = 0.5,
    image_ssl_weight: float = 0.0,
    ssl_temperature: float = 0.1,
    rank: int = 0,
    world_size: int = 1,
) -> NestedLossOutput:
    """`L = (1 − w)·[λ·L_lesion + (1 − λ)·L_patient] + w·L_ssl`, a function of the model's outputs, as open_clip's
    `loss(**model_out)`: the positional inputs are `SLIMPModel.forward`'s embeddings and logit scales.

    L_lesion: symmetric InfoNCE of image_embeds vs lesion_metadata_embeds (N, D) over the global batch.
    L_patient: symmetric InfoNCE of phenotype_embeds vs patient_metadata_embeds (P, D) over the global
    batch; zero when the global batch has fewer than 2 patients. L_ssl: NT-Xent between two image views,
    only when `ssl_image_embeds` is given and w > 0. The logit scales arrive exponentiated (and clamped).

    Keyword-only: λ (`lesion_loss_weight`), w (`image_ssl_weight`) and the NT-Xent temperature, which `SLIMPModel`
    passes from its config, the one place they live; `rank` and `world_size` of the process group, which
    `gather_features` uses ("local loss + gather with grad").
    """
    lesion_loss, logits_per_image = symmetric_infonce(image_embeds, lesion_metadata_embeds, lesion_logit_scale, rank,
                                                      world_size)
    patient_loss, logits_per_phenotype = symmetric_infonce(phenotype_embeds, patient_metadata_embeds, patient_logit_scale,
                                                           rank, world_size)
    loss = lesion_loss_weight * lesion_loss + (1.0 - lesion_loss_weight) * patient_loss
    image_ssl_loss = None
    if ssl_image_embeds is not None and image_ssl_weight > 0:
        image_ssl_loss = nt_xent(image_embeds, ssl_image_embeds, ssl_temperature, rank, world_size)
        loss = (1.0 - image_ssl_weight) * loss + image_ssl_weight * image_ssl_loss
    return NestedLossOutput(loss, lesion_loss, patient_loss, image_ssl_loss, logits_per_image, logits_per_phenotype)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, class_weights: list[float] | None = None,
                           num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The classifier's loss: class-weighted cross-entropy summed over the labelled lesions (label -100: none),
    divided by `num_items_in_batch` when given (Trainer's count over accumulated batches), else by this batch's
    labelled lesions, so accumulated batches add up to the large batch. logits (N, C), labels (N,)."""
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), one per lesion, got {tuple(labels.shape)}.")
    labels = labels.long()
    labelled = labels != -100
    per_lesion = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    if class_weights is not None:
        weight = torch.tensor(class_weights, dtype=torch.float32, device=logits.device)
        per_lesion = per_lesion * weight[labels.clamp(min=0)]
    total = torch.where(labelled, per_lesion, torch.zeros_like(per_lesion)).sum()
    count = num_items_in_batch if num_items_in_batch is not None else labelled.sum()
    if torch.is_tensor(count):
        return total / count.to(total.device, total.dtype).clamp(min=1)
    return total / max(int(count), 1)


__all__ = ["gather_features", "distributed_context", "clamped_logit_scale", "symmetric_infonce", "nt_xent",
           "nested_contrastive_loss", "NestedLossOutput", "weighted_cross_entropy"]
