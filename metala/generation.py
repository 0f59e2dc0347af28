"""Recurrent decoding: prefill with the chunked operator, then one O(1) recurrence step per new token."""

from __future__ import annotations

from typing import Callable

import torch

from metala.cache import MetaLACache


def sample_next(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row of logits [B, V]: greedy, or sampling with temperature / top-k / top-p."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the best token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cache: MetaLACache | None = None,
) -> torch.Tensor:
    """Return [B, T + n] tokens, n <= max_new_tokens.

    Args:
        input_ids: [B, T] prompt; left-pad rows of unequal length and pass `attention_mask` (0 on pads).
        eos_token_id: a row that emits it is finished; later positions repeat it.
        stop: optional callback on the new tokens so far [B, n] returning a bool [B]; True finishes the row
            (stop sequences in text space live in the caller).
        cache: an existing cache to continue from (its state already holds the context); a new one by default.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B = input_ids.shape[0]
    cache = model.new_cache() if cache is None else cache
    logits = model(input_ids, cache=cache, attention_mask=attention_mask).logits[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        new_tokens.append(nxt)
        if stop is not None:
            finished |= stop(torch.stack(new_tokens, 1))
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    if not new_tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(new_tokens, 1).to(input_ids.dtype)], 1)
