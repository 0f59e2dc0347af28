"""Helpers for packed variable-length batches described by `cu_seqlens`.

Convention (FlashAttention / fla): tokens of N documents are packed along the time axis of a [1, T, ...] tensor and
`cu_seqlens` is an int tensor [N + 1] with cu_seqlens[0] = 0, cu_seqlens[-1] = T, strictly increasing. Lengths
[4, 8, 12] give [0, 4, 12, 24].
"""

from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens") -> None:
    """Raise ValueError unless `cu_seqlens` is a valid boundary vector over `total` tokens (host sync)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu_seqlens.dtype}")
    cpu = cu_seqlens.detach().cpu()
    if int(cpu[0]) != 0 or int(cpu[-1]) != total:
        raise ValueError(f"{name} must start at 0 and end at the token count {total}, got {cpu[0]}..{cpu[-1]}")
    if bool((cpu[1:] <= cpu[:-1]).any()):
        raise ValueError(f"{name} must be strictly increasing (no empty documents), got {cpu.tolist()[:16]}...")


def seq_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index of every token: [T] int64."""
    boundaries = cu_seqlens[1:-1].to(torch.int64)
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.bucketize(pos, boundaries, right=True)


def positions_in_seq(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Offset of every token from the start of its document: [T] int64."""
    ids = seq_ids(cu_seqlens, total)
    return torch.arange(total, device=cu_seqlens.device) - cu_seqlens.to(torch.int64)[ids]


def pad_index(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, int]:
    """Flat index of each packed token in an [N, Tmax] right-padded layout, and Tmax (host sync)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    t_max = int(lengths.max())
    ids = seq_ids(cu_seqlens, total)
    return ids * t_max + positions_in_seq(cu_seqlens, total), t_max


def pad_packed(x: torch.Tensor, index: torch.Tensor, n_seqs: int, t_max: int) -> torch.Tensor:
    """[1, T, *rest] packed -> [N, Tmax, *rest] right-padded with zeros (differentiable)."""
    rest = x.shape[2:]
    out = x.new_zeros((n_seqs * t_max, *rest))
    out = out.index_copy(0, index, x[0])
    return out.view(n_seqs, t_max, *rest)


def unpad_to_packed(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[N, Tmax, *rest] -> [1, T, *rest], the inverse of `pad_packed` on the valid positions."""
    return x.reshape(-1, *x.shape[2:])[index].unsqueeze(0)
