"""PyTorch twins of the incoming-state kernels (the definition; autograd gives the backward).

Rows are [B, L, H, *] slices; within row b the *first piece* is tokens [0, first_len[b]) (where a state entering
the row still reaches) and the *last piece* tokens [last_start[b], L) (whose state leaves the row). Tiles are TILE
consecutive tokens from each row's start; g = max(logsigmoid(z) / tau, G_FLOOR), as inside the MetaLA kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TILE = 64
G_FLOOR = -10.0


def log_decay(z: torch.Tensor, decay_normalizer: float) -> torch.Tensor:
    return (F.logsigmoid(z.float()) / decay_normalizer).clamp_min(G_FLOOR)


def _tiles(x: torch.Tensor) -> torch.Tensor:
    """[B, L, ...] -> [B, nt, TILE, ...], zero-padded at the end."""
    B, L = x.shape[:2]
    nt = -(-L // TILE)
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, nt * TILE - L))
    return x.reshape(B, nt, TILE, *x.shape[2:])


def naive_gate_tile_sums(z: torch.Tensor, first_len: torch.Tensor, last_start: torch.Tensor,
                         decay_normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile, the log-decay summed over its tokens of the first piece, and over its tokens of the last piece:
    two fp32 [B, nt, H, K]."""
    B, L = z.shape[:2]
    pos = torch.arange(L, device=z.device)
    g = log_decay(z, decay_normalizer)
    first = (pos[None, :] < first_len[:, None]).to(g.dtype)[..., None, None]
    last = (pos[None, :] >= last_start[:, None]).to(g.dtype)[..., None, None]
    return _tiles(g * first).sum(2), _tiles(g * last).sum(2)


def naive_incoming_state_output(o: torch.Tensor, q: torch.Tensor, z: torch.Tensor, S: torch.Tensor,
                                G_off: torch.Tensor, first_len: torch.Tensor, decay_normalizer: float,
                                scale: float) -> torch.Tensor:
    """o + scale * (q_t * exp(G_t)) S for the first-piece tokens of each row, o elsewhere (in o's dtype).

    G_t = G_off[tile(t)] + the log-decay summed over the tile's tokens up to t; G_off (fp32 [B, nt, H, K]) is the
    log-decay from the row's start to the tile's start (`piece_log_decays`). S: fp32 [B, H, K, V]."""
    B, L = q.shape[:2]
    G = _tiles(log_decay(z, decay_normalizer)).cumsum(2) + G_off[:, :, None]
    G = G.reshape(B, -1, *G.shape[3:])[:, :L]
    inside = (torch.arange(L, device=q.device)[None, :] < first_len[:, None])[..., None, None]
    # masked in the exponent's result, never as exp(-inf) * 0 (G <= 0 keeps exp finite on real tokens anyway)
    qd = torch.where(inside, q.float() * G.exp(), 0.0)
    corr = torch.einsum("blhk,bhkv->blhv", qd, S.float())
    return (o.float() + scale * corr).to(o.dtype)
