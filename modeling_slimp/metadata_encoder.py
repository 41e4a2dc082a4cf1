"""The metadata tower: an FT-Transformer (Gorishniy et al., 2021, arXiv 2106.11959).

Each feature becomes one token: a numerical feature by its own affine map of the normalised value, a
categorical feature by its own embedding table. A missing value (NaN, ±inf, category id 0, or a
feature dropped by feature dropout in training) gets a learned per-feature "missing" embedding, so
absent metadata is a first-class input. A learned [CLS] token is prepended, pre-norm transformer
blocks follow, and the output is the final-norm [CLS].

The linear layers are named `q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2` so that peft LoRA can
target them (`nn.MultiheadAttention` hides its out_proj from LoRA). The attention runs through transformers'
attention interface (`config._attn_implementation`: "sdpa" by default, or "eager", which also returns the
attention maps), so `attn_implementation` reaches these towers as it reaches the image tower.

The tower is a `PreTrainedModel` of its own (as CLIP's text and vision models inside `CLIPModel`): the
attention choice, gradient checkpointing and `enable_input_require_grads` (whose hook makes the feature tokens
require grad, what peft needs for LoRA under reentrant checkpointing) reach it like any transformers sub-model.
Its weights keep their checkpoint names (`lesion_metadata_model.layers.0.self_attn.q_proj.weight`, ...).

Class order reads as the architecture:
`SLIMPFeatureTokenizer -> SLIMPAttention -> SLIMPMLP -> SLIMPEncoderLayer -> SLIMPMetadataEncoder`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out. q, k, v: (B, heads, T, head_dim) -> ((B, T, heads, head_dim), weights
    (B, heads, T, T)); the signature of transformers' attention interface."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class SLIMPAttention(nn.Module):
    """Multi-head self-attention with separately named projections. (B, T, H) -> (B, T, H)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, hidden_size // num_heads, dropout
        self.scaling = self.head_dim ** -0.5
        self.is_causal = False  # every feature token sees every other
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention: Callable) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention`: a function of transformers' attention interface. Returns (output, weights or None)."""
        batch, tokens, hidden = hidden_states.shape
        shape = (batch, tokens, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, heads, T, head_dim)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attended, weights = attention(self, query, key, value, None, dropout=self.dropout if self.training else 0.0,
                                      scaling=self.scaling)  # (B, T, heads, head_dim)
        return self.out_proj(attended.reshape(batch, tokens, hidden)), weights


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

    def forward(self, hidden_states: torch.Tensor, attention: Callable) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.self_attn(self.layer_norm1(hidden_states), attention)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.layer_norm2(hidden_states))), weights


@torch.no_grad()
def init_slimp_weights(module: nn.Module, std: float) -> None:
    """The initialisation of SLIMP's own layers (the image tower keeps its own): truncated-normal linears,
    normal embeddings and [CLS], unit layer norms, FT-Transformer tokenizer maps. `SLIMPPreTrainedModel` and
    `SLIMPMetadataEncoder` both initialise through it."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, SLIMPFeatureTokenizer):
        # Per-feature affine maps of a unit-variance input, as in the FT-Transformer.
        bound = 1 / math.sqrt(module.config.hidden_size)
        for parameter in (module.numerical_weight, module.numerical_bias, module.numerical_missing):
            if parameter is not None:
                nn.init.uniform_(parameter, -bound, bound)
        module.reset_schema_buffers()
    elif isinstance(module, SLIMPMetadataEncoder):
        nn.init.normal_(module.cls_token, std=std)


class SLIMPMetadataEncoder(PreTrainedModel):
    """FT-Transformer over one row of metadata per item.

    Inputs: `numerical_values` (B, Fn), `categorical_ids` (B, Fc). Returns `BaseModelOutputWithPooling`:
    `last_hidden_state` (B, 1 + F, H) after the final norm, `pooler_output` (B, H) its [CLS] row (the tower's
    feature), and, when asked, `hidden_states` (the tokens, then the output of each block) and `attentions`
    (with the "eager" attention; None rows with "sdpa").
    """

    config_class = SLIMPMetadataConfig
    main_input_name = "numerical_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SLIMPEncoderLayer"]

    def __init__(self, config: SLIMPMetadataConfig):
        super().__init__(config)
        self.feature_tokenizer = SLIMPFeatureTokenizer(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.layers = nn.ModuleList(SLIMPEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False  # switched by PreTrainedModel.gradient_checkpointing_enable
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_slimp_weights(module, self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Module:
        """The feature tokenizer: its output is the tokens the blocks read (hooked by `enable_input_require_grads`)."""
        return self.feature_tokenizer

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.feature_tokenizer = value

    def forward(self, numerical_values: torch.Tensor, categorical_ids: torch.Tensor, output_attentions: bool = False,
                output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        tokens = self.feature_tokenizer(numerical_values, categorical_ids)  # (B, F, H)
        hidden_states = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + F, H)
        all_hidden_states, all_attentions = (hidden_states,), ()
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states, weights = self._gradient_checkpointing_func(layer.__call__, hidden_states, attention)
            else:
                hidden_states, weights = layer(hidden_states, attention)
            all_hidden_states += (hidden_states,)
            all_attentions += (weights,)
        last_hidden_state = self.final_layer_norm(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0],  # (B, H): the final-norm [CLS]
            hidden_states=all_hidden_states if output_hidden_states else None,
            attentions=all_attentions if output_attentions else None,
        )


__all__ = ["SLIMPFeatureTokenizer", "SLIMPAttention", "SLIMPMLP", "SLIMPEncoderLayer", "SLIMPMetadataEncoder",
           "eager_attention_forward", "init_slimp_weights"]
