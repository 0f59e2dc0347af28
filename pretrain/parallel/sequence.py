"""Sequence parallelism for MetaLA: each SP rank holds a contiguous slice of every sequence and the recurrent state
is passed between slices (decay-aware LASP-2, shared/spec/distributed.md section 4.3).

Per layer:
  - conv halo: each rank gathers the last k-1 pre-conv rows of every rank's slice and prepends the previous rank's
    to its own (zeroed where they belong to an earlier document, always on rank 0); the gradient of the halo goes
    back through the same differentiable all-gather.
  - state: the operator runs once on the slice from a zero state, giving the local outputs, E (the final state of
    each row's last document piece) and G (its total log-decay); (E, G) are all-gathered in fp32 and merged in order:
        S_in(r) = cont_r * (single_{r-1} * exp(G_{r-1}) * S_in(r-1) + E_{r-1}),   S_in(0) = 0
    (cont_r: the slice starts inside a document; single_r: the slice is one piece of a document that started
    earlier, so its incoming state flows through it). The recurrence is linear in the state, so the true output of
    a token t of the row's first piece is the local one plus the incoming state's share (the correction GEMM):
        o_t += scale * (q_t * exp(sum_{s<=t} g_s)) S_in
    in fp32, recomputed in the backward (checkpointed) so it holds no fp32 activations. Autograd through the
    correction and the all-gathers (backward = sum of the slot's gradients) gives exact gradients of q, z, v and the
    states; the operator's backward receives the final-state gradient. The first version re-ran the operator
    from S_in instead (a second forward and backward of the whole slice); on 2 x H200 that cost 30 % per step.
Labels are shifted on the full sequence before slicing (the loader's labels already are), every SP rank of a replica
reads the same sample, and each rank's loss is its token-loss sum over the micro-batch's total token count (DeepSpeed
sums gradients over SP and averages over DP).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from metala.ops.utils.varlen import seq_ids
from pretrain.parallel.comm import all_gather_stack
from pretrain.parallel.layout import ParallelLayout

IGNORE_INDEX = -100


@dataclass
class SPContext:
    """What the state passing and the conv halo need to know about the current micro-batch's slice."""

    batch: int
    local_len: int
    # per row: the slice starts inside a document / the slice is one continuing document piece
    cont: torch.Tensor
    single: torch.Tensor
    # per row: position of the slice's first token in its document (how much halo is real)
    first_pos: torch.Tensor
    # per row: index of its first and last document piece in the local cu_seqlens
    first_piece: torch.Tensor
    last_piece: torch.Tensor
    # per row: tokens of its first piece (the ones the incoming state reaches), and their maximum (host int: the
    # correction touches only that many leading tokens of each row, without a device sync)
    first_len: torch.Tensor
    first_len_max: int


class SequenceParallel:
    """Holds the current micro-batch's `SPContext`; the patched layers read it."""

    def __init__(self, layout: ParallelLayout) -> None:
        self.layout = layout
        self.size, self.rank, self.group = layout.sp, layout.coords.sp, layout.sp_group
        self.ctx: SPContext | None = None

    def slice_batch(self, batch: dict) -> tuple[dict, int]:
        """This rank's slice of a micro-batch (input_ids, labels [B, T/P] and local cu_seqlens) and the number of
        scored labels in the whole micro-batch (the loss normaliser)."""
        ids, labels, cu = batch["input_ids"], batch["labels"], batch["cu_seqlens"]
        B, T = ids.shape
        if T % self.size:
            raise ValueError(f"sequence length {T} is not divisible by parallel.sp={self.size}")
        L = T // self.size
        lo, hi = self.rank * L, (self.rank + 1) * L
        total = int((labels != IGNORE_INDEX).sum())
        starts = np.zeros((B, T), dtype=bool)
        starts[:, 0] = True
        if cu is not None:
            flat = cu.cpu().numpy().astype(np.int64)[:-1]
            starts.reshape(-1)[flat] = True
        # position of every token within its document
        idx = np.arange(T)[None, :].repeat(B, 0)
        last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
        pos = idx - last_start
        local_starts = starts[:, lo:hi].copy()
        cont = ~local_starts[:, 0]
        local_starts[:, 0] = True
        pieces = local_starts.sum(1)
        offsets = np.concatenate([[0], np.cumsum(pieces)])
        # the first piece ends at the row's second local document start, else at the row's end
        later = local_starts[:, 1:]
        first_len = np.where(later.any(1), later.argmax(1) + 1, L)
        cu_local = np.flatnonzero(local_starts.reshape(-1))
        cu_local = torch.from_numpy(np.append(cu_local, B * L).astype(np.int32))
        self.ctx = SPContext(
            batch=B, local_len=L,
            cont=torch.from_numpy(cont), single=torch.from_numpy(cont & (pieces == 1)),
            first_pos=torch.from_numpy(pos[:, lo]), first_piece=torch.from_numpy(offsets[:-1]),
            last_piece=torch.from_numpy(offsets[1:] - 1),
            first_len=torch.from_numpy(first_len), first_len_max=int(first_len[cont].max()) if cont.any() else 0,
        )
        local = {"input_ids": ids[:, lo:hi].contiguous(), "labels": labels[:, lo:hi].contiguous(),
                 "cu_seqlens": cu_local}
        return local, total

    def to(self, device: torch.device) -> None:
        c = self.ctx
        for f in ("cont", "single", "first_pos", "first_piece", "last_piece", "first_len"):
            setattr(c, f, getattr(c, f).to(device))

    # --- conv halo ---------------------------------------------------------------------------------------------

    def conv_forward(self, conv: nn.Module):
        inner = conv.forward

        def forward(x, cu_seqlens=None, conv_state=None, _inner=inner, _conv=conv):
            if conv_state is not None:
                raise ValueError("sequence parallelism is for training; decode without it")
            c = self.ctx
            k = _conv.kernel_size
            if k == 1:
                return _inner(x, cu_seqlens, None)
            B, L = c.batch, c.local_len
            rows = x.reshape(B, L, -1)
            tails = all_gather_stack(rows[:, L - (k - 1) :], self.group)
            # rank 0 has no halo; `* 0` keeps the gather in its graph so every rank runs the backward collective
            halo = tails[self.rank - 1] if self.rank > 0 else tails[0] * 0
            # halo row j lies k-1-j tokens before the slice: real only inside the slice's first document
            back = torch.arange(k - 1, 0, -1, device=x.device)
            valid = (c.cont[:, None] & (c.first_pos[:, None] >= back[None, :])).to(x.dtype)
            ext = torch.cat([halo * valid[..., None], rows], dim=1)
            # the halo joins each row's first piece: shift the local boundaries by k-1 per row
            starts = torch.zeros(B, L + k - 1, dtype=torch.bool, device=x.device)
            flat = cu_seqlens[:-1].to(torch.int64)
            row, col = flat // L, flat % L
            starts[row, col + k - 1] = True
            starts[:, 0] = True
            starts[:, k - 1] = ~c.cont
            cu_ext = torch.cat([torch.nonzero(starts.reshape(-1)).squeeze(-1),
                                torch.tensor([B * (L + k - 1)], device=x.device)]).to(torch.int32)
            y, _ = _inner(ext.reshape(1, B * (L + k - 1), -1), cu_ext, None)
            return y.reshape(B, L + k - 1, -1)[:, k - 1 :].reshape(x.shape), None

        return forward

    # --- state passing -----------------------------------------------------------------------------------------

    def attn_fn(self, base):
        def attn(q, z, v, *, decay_normalizer, k=None, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None, backend="auto"):
            if initial_state is not None or output_final_state:
                raise ValueError("sequence parallelism is for training; decode without it")
            c = self.ctx
            common = dict(decay_normalizer=decay_normalizer, k=k, scale=scale, cu_seqlens=cu_seqlens, backend=backend)
            o, finals = base(q, z, v, output_final_state=True, **common)
            n_pieces = cu_seqlens.numel() - 1
            N = q.shape[1]
            g = F.logsigmoid(z[0].float()) / decay_normalizer
            G_piece = torch.zeros(n_pieces, *g.shape[1:], device=g.device).index_add(0, seq_ids(cu_seqlens, N), g)
            E = finals[c.last_piece]  # [B, H, K, V]
            G = G_piece[c.last_piece]  # [B, H, K]
            E_all = all_gather_stack(E, self.group)
            G_all = all_gather_stack(G, self.group)
            flags = all_gather_stack(torch.stack([c.cont, c.single]).to(torch.float32), self.group)
            # every rank keeps the gathered tensors in its graph (zero-weighted on rank 0): the backward all-reduces
            # of the gathers must run on all ranks, in the same order
            S = 0 * (E_all[0] + G_all.sum() * 0)
            for j in range(self.rank):
                cont_next, single_j = flags[j + 1, 0], flags[j, 1]
                S = cont_next[:, None, None, None] * (
                    single_j[:, None, None, None] * G_all[j].exp()[..., None] * S + E_all[j]
                )
            n = c.first_len_max
            if self.rank == 0 or n == 0:
                # no incoming state anywhere: keep S (zero) in the graph so the gathers' backward runs here too
                return o + (S.sum() * 0).to(o.dtype), None
            B, L = c.batch, c.local_len
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            rows = o.reshape(B, L, *o.shape[2:])
            corr = checkpoint(_incoming_state_output, q.reshape(B, L, *q.shape[2:])[:, :n],
                              z.reshape(B, L, *z.shape[2:])[:, :n], S, c.first_len, decay_normalizer, scale,
                              use_reentrant=False)
            head = (rows[:, :n].float() + corr).to(o.dtype)
            out = head if n == L else torch.cat([head, rows[:, n:]], dim=1)
            return out.reshape(o.shape), None

        return attn


def _incoming_state_output(q: torch.Tensor, z: torch.Tensor, S: torch.Tensor, first_len: torch.Tensor,
                           decay_normalizer: float, scale: float) -> torch.Tensor:
    """scale * (q_t * exp(cumulative log-decay up to t)) S for the leading tokens of each row, zero past the row's
    first piece. q, z: [B, n, H, K]; S: fp32 [B, H, K, V]; returns fp32 [B, n, H, V].

    Works head-major ([B, H, n, K]): the scan then runs along the innermost dimension (a cumsum along the token
    dimension of [B, n, H, K] took 18 ms per layer at n = 48k on an H200, 40x this) and the product is one batched
    GEMM per (row, head)."""
    B, n = q.shape[:2]
    g = (F.logsigmoid(z.float()) / decay_normalizer).permute(0, 2, 3, 1).contiguous()  # [B, H, K, n]
    # g <= 0, so the cumulative decay only shrinks: exp never overflows
    decay = g.cumsum(-1).exp().transpose(-1, -2)  # [B, H, n, K]
    inside = (torch.arange(n, device=q.device)[None, :] < first_len[:, None]).to(decay.dtype)  # [B, n]
    qd = q.float().transpose(1, 2) * decay * inside[:, None, :, None]
    return (scale * torch.matmul(qd, S)).transpose(1, 2)


def apply_sequence_parallel(model: nn.Module, layout: ParallelLayout) -> SequenceParallel | None:
    if layout.sp == 1:
        return None
    if not model.config.doc_reset:
        raise ValueError("parallel.sp > 1 needs model.doc_reset=true (slices are described by cu_seqlens)")
    sp = SequenceParallel(layout)
    for block in model.layers:
        mixer = block.mixer
        if hasattr(mixer.conv, "kernel_size"):
            mixer.conv.forward = sp.conv_forward(mixer.conv)
        mixer.attn_fn = sp.attn_fn(mixer.attn_fn)
    return sp
