"""MetaLA language model: pre-norm blocks of (MetaLA token mixer, SwiGLU), no positional encoding (metala.md sec. 4).

Architecture only: parallelism, activation checkpointing and compilation are applied from `pretrain/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metala.cache import LayerCache, MetaLACache
from metala.config import MetaLAConfig
from metala.init import init_weights
from metala.layers.metala_attn import MetaLAAttention
from metala.modules.loss import IGNORE_INDEX, lm_cross_entropy
from metala.modules.norm import build_norm
from metala.modules.swiglu import SwiGLU
from metala.ops.utils.varlen import check_cu_seqlens


@dataclass
class MetaLAOutput:
    # [B, T, V]; None when a chunked loss was asked for without logits
    logits: torch.Tensor | None
    # mean next-token loss over scored positions (fp32)
    loss: torch.Tensor | None = None
    # number of scored positions (labels != -100)
    n_tokens: torch.Tensor | None = None


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels for a plain batch: labels[:, t] = input_ids[:, t + 1], the last position ignored."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


class MetaLABlock(nn.Module):
    def __init__(self, config: MetaLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_norm = build_norm(config.norm_type, config.d_model, config.norm_eps)
        self.mixer = MetaLAAttention(config, layer_idx)
        self.mlp_norm = build_norm(config.norm_type, config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # the mixer in its stages (MetaLAAttention.forward): the stages before and after the recurrent operator are
        # what torch.compile sees as two whole graphs (pretrain/parallelize.py apply_compile)
        parts = self.pre(x, cu_seqlens, cache, attention_mask)
        o = self.mixer.attend(parts, cu_seqlens, cache)
        return self.post(x, o, parts)

    def pre(self, x, cu_seqlens=None, cache=None, attention_mask=None):
        return self.mixer.project(self.mixer_norm(x), cu_seqlens, cache, attention_mask)

    def post(self, x, o, parts):
        h = x + self.mixer.finish(o, parts)
        return h + self.mlp(self.mlp_norm(h))


class MetaLAForCausalLM(nn.Module):
    """MetaLA causal LM. Build on the meta device and call `init_weights` after `to_empty` for large models.

    `forward(input_ids, labels=None, cu_seqlens=None)`: labels are already shifted (labels[:, t] is the target of
    position t, as the packed loader yields them; `next_token_labels` makes them from a plain batch), -100 ignored.
    `cu_seqlens` marks packed documents over the flattened B * T tokens; state and conv restart at each.
    """

    def __init__(self, config: MetaLAConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MetaLABlock(config, i) for i in range(config.n_layers))
        self.norm = build_norm(config.norm_type, config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        # value checks on token ids and cu_seqlens cost one host sync; a trainer with validated data may turn it off
        self.validate_inputs = True
        # (hidden [N, D], head weight [V, D], labels [N]) -> (loss sum, scored count); None is the plain loss.
        # Tensor parallelism installs a vocabulary-parallel cross-entropy here.
        self.loss_fn = None
        if not self.embed.weight.is_meta:
            self.init_weights(seed)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self, seed: int = 0) -> None:
        self.tie_weights()
        init_weights(self, self.config, seed)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', input_ids)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if not self.validate_inputs:
            return
        V = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={V}), got range [{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        if labels is not None:
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
            if bool(bad.any()):
                raise ValueError(f"labels must lie in [0, {V}) or be {IGNORE_INDEX}")
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, input_ids.numel())

    def run_layers(
        self,
        h: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: MetaLACache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block stack, embeddings -> last block's output. `pretrain/parallelize.py` may set a version of it on
        the instance that runs the same blocks in other compiled pieces (`apply_compile`)."""
        layer_caches = cache.layers if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, layer_caches):
            h = layer(h, cu_seqlens=cu_seqlens, cache=layer_cache, attention_mask=attention_mask)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: MetaLACache | None = None,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool | None = None,
    ) -> MetaLAOutput:
        self._check_inputs(input_ids, labels, cu_seqlens)
        B, T = input_ids.shape
        if cu_seqlens is not None and (cache is not None or attention_mask is not None):
            raise ValueError("cu_seqlens cannot be combined with a decoding cache or an attention_mask")
        if not self.config.doc_reset:
            # GPT-NeoX parity: packed documents share one recurrence
            cu_seqlens = None
        ids = input_ids.reshape(1, B * T) if cu_seqlens is not None else input_ids
        h = self.embed(ids)
        h = self.run_layers(h, cu_seqlens, cache, attention_mask)
        h = self.norm(h).view(B, T, -1)
        if cache is not None:
            cache.seen_tokens += T
        chunked_loss = labels is not None and (self.config.loss_chunk_size > 0 or self.loss_fn is not None)
        if return_logits is None:
            return_logits = not chunked_loss
        logits = self.lm_head(h) if return_logits else None
        if labels is None:
            return MetaLAOutput(logits=logits)
        if self.loss_fn is not None:
            loss_sum, n = self.loss_fn(h.reshape(B * T, -1), self.lm_head.weight, labels.reshape(-1))
        elif chunked_loss:
            loss_sum, n = lm_cross_entropy(
                h.reshape(B * T, -1), self.lm_head.weight, labels.reshape(-1), self.config.loss_chunk_size
            )
        else:
            lg = logits if logits is not None else self.lm_head(h)
            loss_sum = torch.nn.functional.cross_entropy(
                lg.float().view(B * T, -1), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            n = (labels != IGNORE_INDEX).sum()
        return MetaLAOutput(logits=logits, loss=loss_sum / n.clamp(min=1), n_tokens=n)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> MetaLAForCausalLM:
        """Load a folder written by `metala.export.save_pretrained` (config.json + model.safetensors)."""
        from metala.export import from_pretrained

        return from_pretrained(path, **kwargs)

    def save_pretrained(self, path: str, tokenizer_file: str | None = None) -> None:
        from metala.export import save_pretrained

        save_pretrained(self, path, tokenizer_file)

    def new_cache(self) -> MetaLACache:
        return MetaLACache.empty(len(self.layers))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Recurrent decoding; see `metala.generation.generate` for the options."""
        from metala.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
