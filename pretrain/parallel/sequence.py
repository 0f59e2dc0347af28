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
    (`metala.ops.incoming_state`: Triton kernels that keep g, its cumulative sums and exp in registers, per 64-token
    tile; G comes from the same op). Autograd through the correction and the all-gathers (backward = sum of the
    slot's gradients) gives exact gradients of q, z, v and the states; the operator's backward receives the
    final-state gradient. Earlier forms: re-running the operator from S_in (a second forward and backward of the
    slice: 29.6 % per step on 2 x H200), then the correction in PyTorch fp32 (38 % on one H200 simulating SP=2 at
    98k tokens: a dozen fp32 passes over [L, H, K] per layer and their backward).
Labels are shifted on the full sequence before slicing (the loader's labels already are), every SP rank of a replica
reads the same sample, and each rank's loss is its token-loss sum over the micro-batch's total token count (DeepSpeed
sums gradients over SP and averages over DP).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metala.ops.incoming_state import incoming_state_output, piece_log_decays
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
    # per row: tokens of its first piece that an incoming state reaches (0 when the slice starts a document), their
    # maximum (a host int: no device sync to know whether any row needs the correction), and where the row's last
    # piece (the one whose state leaves the slice) starts
    first_len: torch.Tensor
    first_len_max: int
    last_start: torch.Tensor


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
        first_len = np.where(later.any(1), later.argmax(1) + 1, L) * cont
        last_start_local = (L - 1) - local_starts[:, ::-1].argmax(1)
        cu_local = np.flatnonzero(local_starts.reshape(-1))
        cu_local = torch.from_numpy(np.append(cu_local, B * L).astype(np.int32))
        self.ctx = SPContext(
            batch=B, local_len=L,
            cont=torch.from_numpy(cont), single=torch.from_numpy(cont & (pieces == 1)),
            first_pos=torch.from_numpy(pos[:, lo]), first_piece=torch.from_numpy(offsets[:-1]),
            last_piece=torch.from_numpy(offsets[1:] - 1),
            first_len=torch.from_numpy(first_len.astype(np.int32)), first_len_max=int(first_len.max()),
            last_start=torch.from_numpy(last_start_local.astype(np.int32)),
        )
        local = {"input_ids": ids[:, lo:hi].contiguous(), "labels": labels[:, lo:hi].contiguous(),
                 "cu_seqlens": cu_local}
        return local, total

    def to(self, device: torch.device) -> None:
        c = self.ctx
        for f in ("cont", "single", "first_pos", "first_piece", "last_piece", "first_len", "last_start"):
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
                 cu_seqlens=None, backend="auto", w_aug=None, split_output=False):
            # split_output is moot here: the self-augmentation stays out of the operator under SP (below), so its
            # output is in the inputs' dtype already
            if initial_state is not None or output_final_state:
                raise ValueError("sequence parallelism is for training; decode without it")
            c = self.ctx
            # (apply_sequence_parallel keeps the self-augmentation out of the operator; were w_aug given, the local
            # pass would add the token-local term and the correction would not)
            common = dict(decay_normalizer=decay_normalizer, k=k, scale=scale, cu_seqlens=cu_seqlens, backend=backend,
                          w_aug=w_aug)
            o, finals = base(q, z, v, output_final_state=True, **common)
            B, L = c.batch, c.local_len
            rows = lambda x: x.reshape(B, L, *x.shape[2:])  # noqa: E731  (packed [1, B*L, ...] -> [B, L, ...])
            # the Triton kernels where the operator runs on Triton, their PyTorch twins where it runs on PyTorch
            fix = "naive" if backend in ("chunk", "naive") else backend
            G_off, G = piece_log_decays(rows(z), c.first_len, c.last_start, decay_normalizer, backend=fix)
            E = finals[c.last_piece]  # [B, H, K, V]
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
            if self.rank == 0 or c.first_len_max == 0:
                # no incoming state anywhere: keep S (zero) in the graph so the gathers' backward runs here too
                return o + (S.sum() * 0).to(o.dtype), None
            out = incoming_state_output(rows(o), rows(q), rows(z), S, G_off, c.first_len, decay_normalizer, scale,
                                        backend=fix)
            return out.reshape(o.shape), None

        return attn



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
        # the self-augmentation stays a module under SP: the incoming-state correction must reach o before the
        # term, as in one process. Fused, it lands on o + term (~0.5), one fp32 rounding at that scale more, which
        # the head norm's centring magnified to 1e-5 in the logits and 2.5e-5 in the gradients on the continued
        # tokens (tests/parallel); compiled, the module is as fast (H200, 360M: 183.0k vs 183.6k tok/s)
        mixer.fuse_self_aug = False
    return sp
