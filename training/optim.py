"""The optimiser of SLIMP's training scripts: AdamW with parameter groups."""

from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.98, eps 1e-6, as CLIP); no weight decay on norms, biases, embeddings, [CLS] tokens
    and logit scales (1-D or scalar parameters, plus the feature tokenizers' per-feature tables)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim < 2 or "logit_scale" in name or "feature_tokenizer" in name or "cls_token" in name
        (no_decay if skip else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.98), eps=1e-6)


__all__ = ["build_optimizer"]
