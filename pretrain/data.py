"""Packed, exactly resumable training data from `data_prep.prepare` shards.

Stream: the split's shards memory-mapped and concatenated (documents back to back, each ending in EOS).
Samples: window i is stream[i*L : i*L + L + 1] (consecutive windows share one token); inputs w[:-1], labels w[1:].
`cu_seqlens` puts a boundary after every EOS inside a window, and every window starts a fresh segment, so no state
crosses samples.

Order (OUR DECISION, differs from the spec's cached PCG64 permutation): sample p of the global stream is
window perm_e(p mod n) of epoch e = p div n, where perm_e is a keyed Feistel bijection of [0, n) seeded by
(seed, e). It is a pure function of (seed, epoch, n): no index file to build or cache (the multi-node start-up
hang of Megatron-style loaders), O(1) memory, identical on every rank and for every world size.

Ranks: each optimizer step consumes global samples [c, c + G) with G the global batch; data-parallel rank r of W
reads the contiguous slice [c + r*G/W, c + (r+1)*G/W) and cuts it into micro-batches. Sequence- and tensor-parallel
ranks of one replica pass the same dp_rank and so read the same samples. Resuming needs only `consumed_samples`
(kept at step boundaries): with the same global batch, any data-parallel size continues exactly.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.shards import ShardView
from data_prep.tokenizer import file_sha256

IGNORE_INDEX = -100
_MASK64 = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


class DataError(ValueError):
    """A dataset that does not match its manifest or the tokenizer; the message names the file."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # a strong 64-bit mixer (Steele et al.); uint64 arithmetic wraps modulo 2^64
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A keyed pseudo-random bijection of [0, n): a balanced Feistel network with cycle walking."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n < 1:
            raise ValueError(f"permutation size must be >= 1, got {n}")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        base = _splitmix64(np.array([seed & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64))
        base = _splitmix64(base ^ np.uint64(epoch & 0xFFFF_FFFF_FFFF_FFFF))
        self.keys = [_splitmix64(base + np.uint64(r))[0] for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_splitmix64(right ^ key) & self.mask)
        return (left << h) | right

    def __call__(self, idx: np.ndarray | int) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64).copy()
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index out of range for a permutation of {self.n}")
        out = self._encrypt(x)
        # the network permutes [0, 2^(2*half)) which is < 4n; re-encrypt values outside [0, n) until they land
        bad = out >= np.uint64(self.n)
        while bad.any():
            out[bad] = self._encrypt(out[bad])
            bad = out >= np.uint64(self.n)
        return out.astype(np.int64)


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"no manifest.json in {data_dir}: run `python -m data_prep.prepare` first (or finish it)")
    return json.loads(path.read_text())


def verify_dataset(data_dir: str | Path, split: str, tokenizer: str | Path | None = None, full: bool = True) -> dict:
    """Check shards against the manifest (size always, sha256 when `full`) and the tokenizer's checksum."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir}/manifest.json has no split {split!r}")
    if tokenizer is not None:
        tok_path = Path(tokenizer)
        tok_path = tok_path / "tokenizer.model" if tok_path.is_dir() else tok_path
        sha = file_sha256(tok_path)
        if sha != manifest["tokenizer"]["sha256"]:
            raise DataError(
                f"tokenizer {tok_path} (sha256 {sha[:12]}) is not the one {data_dir} was tokenized with "
                f"({manifest['tokenizer']['file']}, sha256 {manifest['tokenizer']['sha256'][:12]})"
            )
    for shard in manifest["splits"][split]["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing")
        if path.stat().st_size != shard["bytes"]:
            raise DataError(f"shard {path} has {path.stat().st_size} bytes, the manifest says {shard['bytes']}")
        if full and file_sha256(path) != shard["sha256"]:
            raise DataError(f"shard {path} fails its sha256 checksum (corrupt or replaced)")
    return manifest


class TokenStream:
    """The concatenated tokens of a list of memory-mapped shards, read by global offset."""

    def __init__(self, shards: list[ShardView]) -> None:
        self.shards = [s for s in shards if s.num_tokens]
        sizes = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self.starts[-1])

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy stream[start : start + length] into `out`."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            shard = self.shards[i]
            lo = start + done - int(self.starts[i])
            n = min(length - done, shard.num_tokens - lo)
            out[done : done + n] = shard.tokens[lo : lo + n]
            done += n
            i += 1


@dataclass(frozen=True)
class PackedDatasetInfo:
    num_samples: int
    num_tokens: int
    seq_len: int
    eos_id: int
    vocab_size: int
    fingerprint: str


class PackedDataset:
    """Windows of seq_len + 1 tokens over one split, in a (seed, epoch)-keyed order (or in stream order)."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        seed: int = 1234,
        shuffle: bool = True,
        tokenizer: str | Path | None = None,
        verify: str = "full",
    ) -> None:
        if verify not in ("full", "size"):
            raise ValueError(f"verify must be 'full' or 'size', got {verify!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.data_dir = Path(data_dir)
        manifest = verify_dataset(self.data_dir, split, tokenizer, full=verify == "full")
        shards = [ShardView(self.data_dir / s["file"]) for s in manifest["splits"][split]["shards"]]
        for view, entry in zip(shards, manifest["splits"][split]["shards"]):
            if view.num_tokens != entry["tokens"]:
                raise DataError(f"shard {view.path} holds {view.num_tokens} tokens, the manifest says {entry['tokens']}")
        self.stream = TokenStream(shards)
        n = (self.stream.num_tokens - 1) // seq_len
        if n < 1:
            raise DataError(f"split {split!r} of {data_dir} has {self.stream.num_tokens} tokens: fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}")
        self.info = PackedDatasetInfo(
            num_samples=n,
            num_tokens=self.stream.num_tokens,
            seq_len=seq_len,
            eos_id=int(manifest["tokenizer"]["eos_id"]),
            vocab_size=int(manifest["tokenizer"]["vocab_size"]),
            fingerprint=f"{manifest['fingerprint']}:{split}",
        )
        self.split, self.seed, self.shuffle = split, seed, shuffle
        self._perms: dict[int, FeistelPermutation] = {}

    def __len__(self) -> int:
        return self.info.num_samples

    def window_index(self, positions: np.ndarray) -> np.ndarray:
        """Window index of global sample positions (epochs continue past the end)."""
        n = self.info.num_samples
        epochs, within = np.divmod(np.asarray(positions, dtype=np.int64), n)
        if not self.shuffle:
            return within
        out = np.empty_like(within)
        for e in np.unique(epochs):
            if e not in self._perms:
                self._perms = {int(e): FeistelPermutation(n, self.seed, int(e))}
            sel = epochs == e
            out[sel] = self._perms[int(e)](within[sel])
        return out

    def windows(self, positions: np.ndarray) -> np.ndarray:
        """[len(positions), seq_len + 1] int64 token windows of global sample positions."""
        L = self.info.seq_len
        idx = self.window_index(positions)
        out = np.empty((len(idx), L + 1), dtype=np.int64)
        for row, i in enumerate(idx):
            self.stream.read(int(i) * L, L + 1, out[row])
        return out


def make_batch(windows: np.ndarray, eos_id: int, doc_reset: bool = True, mask_eos_label: bool = False) -> dict:
    """Model inputs from [B, L + 1] windows: input_ids and labels [B, L] and cu_seqlens over the flattened B * L."""
    inputs = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    labels = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    if mask_eos_label:
        labels = labels.masked_fill(inputs == eos_id, IGNORE_INDEX)
    batch = {"input_ids": inputs, "labels": labels, "cu_seqlens": None}
    if doc_reset:
        B, L = inputs.shape
        flat = windows[:, :-1].reshape(-1)
        # a document starts after every EOS and at every window start
        starts = np.flatnonzero(flat == eos_id) + 1
        starts = np.union1d(starts[starts % L != 0], np.arange(0, B * L, L))
        batch["cu_seqlens"] = torch.from_numpy(np.append(starts, B * L).astype(np.int32))
    return batch


class PackedLoader:
    """Per-rank micro-batches of each optimizer step, with an exact consumed-samples resume state."""

    def __init__(
        self,
        dataset: PackedDataset,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        doc_reset: bool = True,
        mask_eos_label: bool = False,
    ) -> None:
        if global_batch % dp_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by the data-parallel size {dp_size}")
        per_rank = global_batch // dp_size
        if per_rank % micro_batch:
            raise ValueError(f"global_batch / dp ({per_rank}) is not divisible by micro_batch {micro_batch}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.doc_reset, self.mask_eos_label = doc_reset, mask_eos_label
        self.grad_accum = per_rank // micro_batch
        self.consumed_samples = 0

    @property
    def epoch(self) -> int:
        return self.consumed_samples // len(self.dataset)

    def rank_positions(self) -> np.ndarray:
        per_rank = self.global_batch // self.dp_size
        start = self.consumed_samples + self.dp_rank * per_rank
        return np.arange(start, start + per_rank, dtype=np.int64)

    def next_step(self) -> list[dict]:
        """This rank's micro-batches of the next optimizer step; advances consumed_samples by the global batch."""
        windows = self.dataset.windows(self.rank_positions())
        eos = self.dataset.info.eos_id
        out = [
            make_batch(windows[i : i + self.micro_batch], eos, self.doc_reset, self.mask_eos_label)
            for i in range(0, len(windows), self.micro_batch)
        ]
        self.consumed_samples += self.global_batch
        return out

    def state_dict(self) -> dict:
        info = self.dataset.info
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.dataset.seed,
            "seq_len": info.seq_len,
            "data_fingerprint": info.fingerprint,
            "global_batch": self.global_batch,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        info = self.dataset.info
        for key, mine in (("seed", self.dataset.seed), ("seq_len", info.seq_len), ("data_fingerprint", info.fingerprint)):
            if state[key] != mine:
                raise DataError(
                    f"cannot resume: the checkpoint's data {key} is {state[key]!r}, this run has {mine!r}; the sample "
                    "order would change (a data change is an explicit operation: start a new run or reset the state)"
                )
        if state["global_batch"] != self.global_batch:
            warnings.warn(
                f"global batch changed from {state['global_batch']} to {self.global_batch}: resuming at sample "
                f"{state['consumed_samples']}, later steps group samples differently",
                stacklevel=2,
            )
        self.consumed_samples = int(state["consumed_samples"])


def iter_eval_batches(dataset: PackedDataset, batch_size: int, max_batches: int, doc_reset: bool = True):
    """Sequential (unshuffled) batches of a validation split, for a fixed-cost periodic evaluation."""
    n = min(len(dataset), batch_size * max_batches)
    for start in range(0, n - batch_size + 1, batch_size):
        windows = dataset.windows(np.arange(start, start + batch_size))
        yield make_batch(windows, dataset.info.eos_id, doc_reset)
