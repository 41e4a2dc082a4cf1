"""The metadata tower: an FT-Transformer (Gorishniy et al., 2021, arXiv 2106.11959).

Each feature becomes one token: a numerical feature by its own affine map of the normalised value, a
categorical feature by its own embedding table. A missing value (NaN, ±inf, category id 0, or a
feature dropped by feature dropout in training) gets a learned per-feature "missing" embedding, so
absent metadata is a first-class input. A learned [CLS] token is prepended, pre-norm transformer
blocks follow, and the output is the final-norm [CLS].

The linear layers are named `q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2` so that peft LoRA can
target them (`nn.MultiheadAttention` hides its out_proj from LoRA).

Class order reads as the architecture:
`SLIMPFeatureTokenizer -> SLIMPAttention -> SLIMPMLP -> SLIMPEncoderLayer -> SLIMPMetadataEncoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_slimp import SLIMPMetadataConfig

# Normalised numerical values are clamped to this many standard deviations: one absurd value (a typo
# of 10,000 mm) must not dominate a token.
MAX_ABS_ZSCORE = 8.0


class SLIMPFeatureTokenizer(nn.Module):
    """Raw metadata -> one token per feature.

    Inputs: `numerical_values` (B, Fn) float, raw values, NaN/inf = missing; `categorical_ids` (B, Fc)
    long, 0 = missing/unknown, `j + 1` = vocabulary entry `j`. Output: (B, Fn + Fc, H).
    """

    def __init__(self, config: SLIMPMetadataConfig):
        super().__init__()
        self.config = config
        hidden, n_num = config.hidden_size, config.num_numerical
        # Schema-derived constants; (re)filled by `reset_schema_buffers` (from_pretrained builds on meta).
        self.register_buffer("numerical_mean", torch.zeros(n_num), persistent=False)
        self.register_buffer("numerical_std", torch.ones(n_num), persistent=False)
        # No zero-size parameters for a tower without numerical features: empty tensors share a null storage,
        # which safetensors takes for shared tensors (and accelerate then drops them from checkpoints).
        for name in ("numerical_weight", "numerical_bias", "numerical_missing"):
            self.register_parameter(name, nn.Parameter(torch.empty(n_num, hidden)) if n_num else None)
        # One table for all categorical features; feature f's rows start at categorical_offsets[f] and
        # its row 0 is that feature's learned "missing" embedding.
        sizes = [len(vocabulary) + 1 for vocabulary in config.categorical_features.values()]
        self.register_buffer("categorical_offsets", torch.zeros(len(sizes), dtype=torch.long), persistent=False)
        self.register_buffer("categorical_sizes", torch.zeros(len(sizes), dtype=torch.long), persistent=False)
        self.reset_schema_buffers()
        self.categorical_embeddings = nn.Embedding(max(sum(sizes), 1), hidden)

    @torch.no_grad()
    def reset_schema_buffers(self) -> None:
        """Fill the normalisation statistics and category offsets from the config."""
        config = self.config
        sizes = torch.tensor([len(v) + 1 for v in config.categorical_features.values()], dtype=torch.long)
        self.numerical_mean.copy_(torch.tensor(config.numerical_mean, dtype=torch.float32))
        self.numerical_std.copy_(torch.tensor(config.numerical_std, dtype=torch.float32))
        self.categorical_sizes.copy_(sizes)
        self.categorical_offsets.copy_(sizes.cumsum(0) - sizes)

    def forward(self, numerical_values: torch.Tensor, categorical_ids: torch.Tensor) -> torch.Tensor:
        dtype = self.categorical_embeddings.weight.dtype
        values = numerical_values.to(torch.float32)
        missing = ~torch.isfinite(values)  # (B, Fn)
        ids = categorical_ids.long()
        ids = torch.where((ids < 0) | (ids >= self.categorical_sizes), torch.zeros_like(ids), ids)  # (B, Fc)
        if self.training and self.config.feature_dropout > 0:
            missing = missing | (torch.rand_like(values) < self.config.feature_dropout)
            drop = torch.rand(ids.shape, device=ids.device) < self.config.feature_dropout
            ids = ids.masked_fill(drop, 0)
        categorical_tokens = self.categorical_embeddings(ids + self.categorical_offsets)  # (B, Fc, H)
        if self.numerical_weight is None:
            return categorical_tokens
        z = ((values - self.numerical_mean) / self.numerical_std).clamp(-MAX_ABS_ZSCORE, MAX_ABS_ZSCORE)
        z = z.masked_fill(missing, 0.0).to(dtype)
        numerical_tokens = z.unsqueeze(-1) * self.numerical_weight + self.numerical_bias  # (B, Fn, H)
        numerical_tokens = torch.where(missing.unsqueeze(-1), self.numerical_missing.expand_as(numerical_tokens), numerical_tokens)
        return torch.cat([numerical_tokens, categorical_tokens], dim=1)


class SLIMPAttention(nn.Module):
    """Multi-head self-attention with separately named projections. (B, T, H) -> (B, T, H)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, hidden_size // num_heads, dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, heads, T, head_dim)
            return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, hidden))


class SLIMPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class SLIMPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: SLIMPMetadataConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SLIMPAttention(config.hidden_size, config.num_attention_heads, config.attention_dropout)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SLIMPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(self.self_attn(self.layer_norm1(hidden_states)))
        return hidden_states + self.dropout(self.mlp(self.layer_norm2(hidden_states)))


class SLIMPMetadataEncoder(nn.Module):
    """FT-Transformer over one row of metadata per item.

    Inputs: `numerical_values` (B, Fn), `categorical_ids` (B, Fc). Returns the final-norm [CLS] (B, H).
    """

    def __init__(self, config: SLIMPMetadataConfig):
        super().__init__()
        self.config = config
        self.feature_tokenizer = SLIMPFeatureTokenizer(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.layers = nn.ModuleList(SLIMPEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False  # switched by PreTrainedModel.gradient_checkpointing_enable

    def forward(self, numerical_values: torch.Tensor, categorical_ids: torch.Tensor) -> torch.Tensor:
        tokens = self.feature_tokenizer(numerical_values, categorical_ids)  # (B, F, H)
        hidden_states = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + F, H)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(layer.__call__, hidden_states)
            else:
                hidden_states = layer(hidden_states)
        return self.final_layer_norm(hidden_states[:, 0])  # (B, H): only [CLS] is read


__all__ = ["SLIMPFeatureTokenizer", "SLIMPAttention", "SLIMPMLP", "SLIMPEncoderLayer", "SLIMPMetadataEncoder"]
