"""Ragged per-patient pooling and the patient context, as sums that add across batches.

A batch holds N lesions of P patients, `patient_index` (N,) mapping each lesion to its patient; patients
may hold any number of lesions (no padding, no loop over patients). Everything here is a per-patient
*sum*, so a patient whose lesions arrive over many batches gets exactly the values of one batch holding
them all: `PatientSums` is created for the patients of a whole split (or of one batch), `add` is called
for each batch of lesions, and the mean, the attention pooling and the context are read at the end.

- **mean pooling** (the paper): the mean of a patient's lesion representations.
- **attention pooling** (Ilse et al., 2018, arXiv 1802.04712, gated): softmax weights over a patient's
  lesions, accumulated as an online softmax (running maximum, rescaled sums), so that a rare malignant
  lesion can carry a large weight instead of being averaged away among hundreds of benign ones.
- **patient context** (the dermatologist's "ugly duckling" comparison): each lesion's representation
  minus the mean of the *same patient's other* lesions (leave-one-out), zero for a one-lesion patient,
  so a linear head reads how a lesion differs from the patient's others.

Torch only.
"""

from __future__ import annotations

import torch
from torch import nn


class SLIMPAttentionPooling(nn.Module):
    """Gated attention scores: (N, C) lesion representations -> (N,) unnormalised log-weights."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.attention_v = nn.Linear(input_size, hidden_size)
        self.attention_u = nn.Linear(input_size, hidden_size)
        self.attention_w = nn.Linear(hidden_size, 1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.attention_v(values)) * torch.sigmoid(self.attention_u(values))
        return self.attention_w(gate).squeeze(-1).float()  # (N,)


class PatientSums:
    """Per-patient sums of lesion representations for P patients, filled batch by batch.

    Args:
        num_patients: P, the rows (patients) of the sums.
        width: C, the width of the lesion representations.
        attention: also keep the online-softmax sums of attention pooling.
        device, dtype: of the sums (float32 by default: exact lesion counts up to 2**24).

    State (all (P,) or (P, C)): `count`, `total` (sum of representations), and with attention `peak`
    (running maximum score, -inf before the first lesion), `mass` (sum of exp(score - peak)) and
    `weighted` (sum of exp(score - peak) * representation).
    """

    def __init__(self, num_patients: int, width: int, attention: bool = False, device=None,
                 dtype: torch.dtype = torch.float32):
        self.count = torch.zeros(num_patients, device=device, dtype=dtype)
        self.total = torch.zeros(num_patients, width, device=device, dtype=dtype)
        self.attention = attention
        if attention:
            self.peak = torch.full((num_patients,), float("-inf"), device=device, dtype=torch.float32)
            self.mass = torch.zeros(num_patients, device=device, dtype=torch.float32)
            self.weighted = torch.zeros(num_patients, width, device=device, dtype=dtype)

    @property
    def num_patients(self) -> int:
        return self.count.shape[0]

    def add(self, values: torch.Tensor, patient_index: torch.Tensor, scores: torch.Tensor | None = None) -> "PatientSums":
        """Add N lesions: `values` (N, C), `patient_index` (N,) rows of these sums, and with attention their
        `scores` (N,). Differentiable (no in-place update of the tensors autograd saw); returns self."""
        values = values.to(self.total.dtype)
        ones = torch.ones(patient_index.shape[0], device=values.device, dtype=self.count.dtype)
        # index_add, not bincount: CUDA bincount reads the index min/max back to the host (a sync).
        self.count = self.count.index_add(0, patient_index, ones)
        self.total = self.total.index_add(0, patient_index, values)
        if self.attention:
            if scores is None:
                raise ValueError("PatientSums(attention=True).add needs the attention scores of the lesions")
            scores = scores.float()
            batch_peak = scores.new_full((self.num_patients,), float("-inf")).scatter_reduce(
                0, patient_index, scores.detach(), "amax")
            peak = torch.maximum(self.peak, batch_peak)  # (P,)
            safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            rescale = torch.exp(self.peak - safe)  # 0 for patients seen for the first time (exp(-inf))
            weights = torch.exp(scores - safe[patient_index])  # (N,)
            self.mass = self.mass * rescale + self.mass.new_zeros(self.num_patients).index_add(0, patient_index, weights)
            weighted = self.weighted.new_zeros(self.weighted.shape).index_add(
                0, patient_index, values * weights.unsqueeze(-1).to(values.dtype))
            self.weighted = self.weighted * rescale.unsqueeze(-1).to(self.weighted.dtype) + weighted
            self.peak = peak
        return self

    def mean(self) -> torch.Tensor:
        """(P, C) mean representation of each patient (zero for a patient without lesions)."""
        return self.total / self.count.clamp(min=1).unsqueeze(-1)

    def attention_pool(self) -> torch.Tensor:
        """(P, C) attention-weighted mean of each patient's representations (zero without lesions)."""
        if not self.attention:
            raise ValueError("these PatientSums were built without attention=True")
        return self.weighted / self.mass.clamp(min=1e-30).unsqueeze(-1).to(self.weighted.dtype)

    def context(self, values: torch.Tensor, patient_index: torch.Tensor) -> torch.Tensor:
        """(N, C) each lesion's representation minus the mean of its patient's *other* lesions.

        `values` are the lesions' representations (already added); a lesion whose patient has no other
        lesion gets zeros (no evidence either way).
        """
        count = self.count[patient_index].unsqueeze(-1)  # (N, 1)
        others = (self.total[patient_index] - values) / (count - 1).clamp(min=1)
        return torch.where(count > 1, values - others, torch.zeros_like(values))


def patient_context(values: torch.Tensor, patient_index: torch.Tensor, num_patients: int | None = None) -> torch.Tensor:
    """(N, C) each lesion's row of `values` minus the mean of the same patient's *other* lesions among these N
    (zero for a one-lesion patient): `PatientSums.context` of sums over exactly these lesions, in `values`' dtype.
    `patient_index` (N,) in [0, P); P (`num_patients`) defaults to its largest value + 1."""
    num_patients = num_patients if num_patients is not None else int(patient_index.max()) + 1
    sums = PatientSums(num_patients, values.shape[-1], device=values.device, dtype=values.dtype).add(values, patient_index)
    return sums.context(values, patient_index)


__all__ = ["SLIMPAttentionPooling", "PatientSums", "patient_context"]
