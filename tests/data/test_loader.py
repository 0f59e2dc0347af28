"""The packed loader: windows, document boundaries, rank-independent order and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.shards import ShardView
from pretrain.data import (
    DataError,
    FeistelPermutation,
    PackedDataset,
    PackedLoader,
    iter_eval_batches,
    make_batch,
)

SEQ = 64


@pytest.fixture(scope="module")
def data_dir(demo_data):
    return demo_data


def stream_of(data_dir, split="train"):
    import json

    m = json.loads((data_dir / "manifest.json").read_text())
    return np.concatenate([ShardView(data_dir / s["file"]).tokens for s in m["splits"][split]["shards"]]).astype(np.int64)


def test_windows_are_overlapping_slices_of_the_stream(data_dir):
    ds = PackedDataset(data_dir, "train", SEQ, shuffle=False)
    stream = stream_of(data_dir)
    assert len(ds) == (len(stream) - 1) // SEQ
    w = ds.windows(np.arange(len(ds)))
    assert np.array_equal(w[:, :-1].reshape(-1), stream[: len(ds) * SEQ])
    # consecutive windows share one token: the label of the last position is the next window's first input
    assert np.array_equal(w[:-1, -1], w[1:, 0])


def test_make_batch_boundaries_and_labels():
    eos = 2
    windows = np.array([[5, 6, eos, 7, 8, eos, 9], [eos, 1, 1, 1, eos, 3, 4]])
    b = make_batch(windows, eos)
    assert torch.equal(b["input_ids"], torch.tensor(windows[:, :-1]))
    assert torch.equal(b["labels"], torch.tensor(windows[:, 1:]))
    # row 0: docs [5 6 eos] [7 8 eos]; row 1: [eos] [1 1 1 eos] [3]; each row starts a segment
    assert b["cu_seqlens"].tolist() == [0, 3, 6, 7, 11, 12]
    masked = make_batch(windows, eos, mask_eos_label=True)["labels"]
    assert masked[0, 2] == -100 and masked[1, 0] == -100 and masked[1, 4] == -100 and masked[0, 1] == eos
    assert make_batch(windows, eos, doc_reset=False)["cu_seqlens"] is None


def test_segments_never_cross_documents(data_dir):
    ds = PackedDataset(data_dir, "train", SEQ, seed=3)
    b = PackedLoader(ds, global_batch=8, micro_batch=8).next_step()[0]
    flat, cu = b["input_ids"].reshape(-1), b["cu_seqlens"].tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        seg = flat[s:e]
        assert 2 not in seg[:-1].tolist()
    assert cu[0] == 0 and cu[-1] == flat.numel()


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 65537])
def test_feistel_is_a_permutation(n):
    p = FeistelPermutation(n, seed=11, epoch=0)
    out = p(np.arange(n))
    assert np.array_equal(np.sort(out), np.arange(n))


def test_order_depends_on_seed_and_epoch_only():
    a = FeistelPermutation(5000, 1, 0)(np.arange(5000))
    assert np.array_equal(a, FeistelPermutation(5000, 1, 0)(np.arange(5000)))
    assert not np.array_equal(a, FeistelPermutation(5000, 2, 0)(np.arange(5000)))
    assert not np.array_equal(a, FeistelPermutation(5000, 1, 1)(np.arange(5000)))
    # a real shuffle: far from identity, and not a rotation
    assert np.mean(np.abs(a - np.arange(5000))) > 1000


def gather_steps(data_dir, dp_size, steps, start_state=None, global_batch=8, micro=2):
    """Per step, the concatenated inputs of all DP ranks (rank order) as the global batch."""
    ds = PackedDataset(data_dir, "train", SEQ, seed=5)
    loaders = [PackedLoader(ds, global_batch, micro, r, dp_size) for r in range(dp_size)]
    if start_state is not None:
        for ld in loaders:
            ld.load_state_dict(start_state)
    out = []
    for _ in range(steps):
        out.append(torch.cat([mb["input_ids"] for ld in loaders for mb in ld.next_step()]))
    return out, loaders[0].state_dict()


@pytest.mark.parametrize("dp", [2, 4])
def test_global_batches_do_not_depend_on_dp_size(data_dir, dp):
    ref, _ = gather_steps(data_dir, 1, 3)
    got, _ = gather_steps(data_dir, dp, 3)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_resume_is_exact_across_dp_sizes(data_dir, dp_before, dp_after):
    straight, _ = gather_steps(data_dir, 1, 6)
    first, state = gather_steps(data_dir, dp_before, 3)
    assert state["consumed_samples"] == 24
    second, _ = gather_steps(data_dir, dp_after, 3, start_state=state)
    for a, b in zip(straight, first + second):
        assert torch.equal(a, b)


def test_epochs_roll_over_with_a_new_order(data_dir):
    ds = PackedDataset(data_dir, "train", SEQ, seed=1)
    n = len(ds)
    e0, e1 = ds.window_index(np.arange(n)), ds.window_index(np.arange(n, 2 * n))
    assert np.array_equal(np.sort(e0), np.arange(n)) and np.array_equal(np.sort(e1), np.arange(n))
    assert not np.array_equal(e0, e1)
    ld = PackedLoader(ds, global_batch=n, micro_batch=n)
    ld.next_step()
    assert ld.epoch == 1


def test_state_mismatch_is_refused(data_dir):
    ds = PackedDataset(data_dir, "train", SEQ, seed=5)
    state = PackedLoader(ds, 8, 2).state_dict()
    other = PackedLoader(PackedDataset(data_dir, "train", SEQ, seed=6), 8, 2)
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(state)
    with pytest.warns(UserWarning, match="global batch changed"):
        PackedLoader(ds, 16, 2).load_state_dict(state)


def test_corrupt_or_foreign_data_is_refused(data_dir, tmp_path, tokenizer_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = sorted(copy.glob("train-*.arrow"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{shard.name} fails its sha256"):
        PackedDataset(copy, "train", SEQ)
    shard.write_bytes(bytes(raw[:-10]))
    with pytest.raises(DataError, match=f"{shard.name} has .* bytes"):
        PackedDataset(copy, "train", SEQ, verify="size")
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        PackedDataset(copy, "train", SEQ)
    other_tok = tmp_path / "other.model"
    other_tok.write_bytes((tokenizer_dir / "tokenizer.model").read_bytes() + b"x")
    with pytest.raises(DataError, match="other.model.*is not the one"):
        PackedDataset(data_dir, "train", SEQ, tokenizer=other_tok)
    PackedDataset(data_dir, "train", SEQ, tokenizer=tokenizer_dir / "tokenizer.model")
    with pytest.raises(DataError, match="no manifest.json"):
        PackedDataset(tmp_path, "train", SEQ)


def test_eval_batches_are_sequential(data_dir):
    ds = PackedDataset(data_dir, "val", SEQ, shuffle=False)
    batches = list(iter_eval_batches(ds, 4, 3))
    assert len(batches) == min(3, len(ds) // 4)
    assert np.array_equal(batches[0]["input_ids"].numpy(), ds.windows(np.arange(4))[:, :-1])


def test_bad_loader_arguments(data_dir):
    ds = PackedDataset(data_dir, "train", SEQ)
    with pytest.raises(ValueError, match="divisible by the data-parallel size"):
        PackedLoader(ds, 10, 1, 0, 4)
    with pytest.raises(ValueError, match="micro_batch"):
        PackedLoader(ds, 8, 3)
