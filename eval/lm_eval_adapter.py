"""lm-evaluation-harness adapter for MetaLA (`--model metala`), recurrent all the way down.

- `loglikelihood`: requests are grouped by context; each distinct context is run once, its recurrent state (a
  fixed-size cache) is copied to every continuation of the group, and the continuations run as one right-padded
  batch from that state. No context is truncated: a linear model reads it whole.
- `loglikelihood_rolling`: each document streams through the recurrent state in windows of `max_length` tokens
  (the state carries across windows, so the score is that of one pass over the whole document, in O(window)
  memory); the prefix token opens the document.
- `generate_until`: greedy (or sampled) O(1)-per-token recurrent decoding, one request at a time (no left padding
  through the state), stopping at any of the `until` strings.

Prefix token: every context starts with EOS, the token that precedes every document in our packed training data
(`add_prefix=True`, default); empty contexts are the prefix alone (lm-eval's rule).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from eval.loading import load_model_and_tokenizer
from metala.cache import MetaLACache


def expand_cache(cache: MetaLACache, n: int) -> MetaLACache:
    """A copy of a batch-1 cache repeated n times along the batch."""
    out = MetaLACache(seen_tokens=cache.seen_tokens)
    for layer in cache.layers:
        c = copy.copy(layer)
        c.state = layer.state.expand(n, *layer.state.shape[1:]).contiguous()
        c.conv_state = layer.conv_state.expand(n, *layer.conv_state.shape[1:]).contiguous()
        out.layers.append(c)
    return out


@register_model("metala")
class MetaLALM(TemplateLM):
    def __init__(
        self,
        checkpoint: str,
        batch_size: int | str = 8,
        max_length: int = 4096,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str = "float32",
        add_prefix: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        if str(batch_size) == "auto":
            # a fixed batch is predictable (lm-eval #1678, #1323); the recurrent state makes batches cheap anyway
            batch_size = 8
        self.batch_size_per_gpu = int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.add_prefix = str(add_prefix).lower() not in ("false", "0", "no")
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(dev)
        self.model, self.tokenizer_ = load_model_and_tokenizer(Path(checkpoint), device=self._device,
                                                               dtype=getattr(torch, dtype))
        self.model.eval()

    # --- tokenizer ---------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer_.decode(tokens)

    # --- scoring ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _score_group(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Log-likelihood and greediness of every continuation after one shared context."""
        cache = self.model.new_cache()
        ids = torch.tensor([ctx], device=self._device)
        first_logits = self.model(ids, cache=cache).logits[0, -1].float().log_softmax(-1)
        results: list[tuple[float, bool]] = []
        for start in range(0, len(conts), self.batch_size_per_gpu):
            batch = conts[start : start + self.batch_size_per_gpu]
            longest = max(len(c) for c in batch)
            results.extend(self._score_batch(cache, first_logits, batch, longest))
        return results

    def _score_batch(self, cache, first_logits, batch, longest):
        out = []
        if longest > 1:
            # each continuation's tokens but its last are inputs; right padding cannot touch earlier positions
            inputs = torch.tensor([c[:-1] + [self.eot_token_id] * (longest - len(c)) for c in batch],
                                  device=self._device)
            logp = self.model(inputs, cache=expand_cache(cache, len(batch))).logits.float().log_softmax(-1)
        for i, cont in enumerate(batch):
            steps = [first_logits] + ([logp[i, j] for j in range(len(cont) - 1)] if len(cont) > 1 else [])
            lp = torch.stack(steps)
            target = torch.tensor(cont, device=self._device)
            total = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            out.append((total, greedy))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation")
            prefix = [self.prefix_token_id] if self.add_prefix and (not ctx or ctx[0] != self.prefix_token_id) else []
            groups[tuple(prefix + list(ctx))].append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest contexts first: the slowest work shows up early in the progress bar
        for ctx in tqdm(sorted(groups, key=len, reverse=True), desc="loglikelihood (contexts)", disable=disable_tqdm):
            idx = groups[ctx]
            scores = self._score_group(list(ctx), [list(requests[i][2]) for i in idx])
            for i, s in zip(idx, scores):
                results[i] = s
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _rolling_logprob(self, tokens: list[int]) -> float:
        """Sum of log p(token) over a document, prefix token first, streamed through the recurrent state."""
        seq = [self.prefix_token_id] + tokens
        cache = self.model.new_cache()
        total = 0.0
        for start in range(0, len(tokens), self.max_length):
            tgt = torch.tensor(tokens[start : start + self.max_length], device=self._device)
            # input position i predicts token i: the window's inputs are the targets shifted by the prefix
            inp = torch.tensor([seq[start : start + len(tgt)]], device=self._device)
            logits = self.model(inp, cache=cache).logits[0].float()
            total += float(-F.cross_entropy(logits, tgt, reduction="sum"))
        return total

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [self._rolling_logprob(self.tok_encode(req.args[0]))
                for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm)]

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outs = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0))
            ctx = ([self.prefix_token_id] if self.add_prefix else []) + self.tok_encode(context)
            ids = torch.tensor([ctx], device=self._device)

            def stop(new_tokens: torch.Tensor) -> torch.Tensor:
                text = self.tok_decode(new_tokens[0].tolist())
                return torch.tensor([any(u in text for u in until)], device=new_tokens.device)

            out = self.model.generate(ids, max_new, do_sample=do_sample and temperature > 0, temperature=temperature,
                                      eos_token_id=self.eot_token_id, stop=stop if until else None)
            text = self.tok_decode([t for t in out[0, len(ctx):].tolist() if t != self.eot_token_id])
            for u in until:
                text = text.split(u)[0]
            outs.append(text)
        return outs
