"""MQAR (Zoology multi-query associative recall): the data generator's contract, the attention reference's parts,
the trainer's stopping rules, and both models learning to recall on a tiny CPU setting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval import mqar


@pytest.mark.parametrize("random_fill", [False, True])
def test_generator_layout_and_labels(random_fill):
    vocab, seq, pairs = 64, 40, 5
    inputs, labels = mqar.make_mqar(vocab, seq, pairs, 50, 0.01, np.random.default_rng(0), random_fill)
    assert inputs.shape == labels.shape == (50, seq)
    half = vocab // 2
    for x, y in zip(inputs.numpy(), labels.numpy()):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and np.all((keys >= 1) & (keys < half))
        assert len(set(values)) == pairs and np.all(values >= half)  # distinct values, as Zoology draws them
        table = dict(zip(keys, values))
        scored = np.nonzero(y != mqar.IGNORE)[0]
        # every key is asked exactly once, after the pairs, and the target is that key's value
        assert len(scored) == pairs and np.all(scored >= 2 * pairs)
        assert sorted(x[scored]) == sorted(keys)
        assert all(y[t] == table[x[t]] for t in scored)
        rest = np.setdiff1d(np.arange(2 * pairs, seq), scored)
        if random_fill:  # filler drawn from the whole vocabulary (never 0)
            assert np.all(x[rest] > 0)
        else:  # Zoology's figure-2 data: token 0 wherever nothing is asked
            assert np.all(x[rest] == 0)


def test_generator_rejects_too_many_pairs():
    with pytest.raises(ValueError, match="5 pairs"):
        mqar.make_mqar(64, 16, 5, 2, 0.01, np.random.default_rng(0))
    with pytest.raises(ValueError, match="distinct keys"):
        mqar.make_mqar(16, 64, 8, 2, 0.01, np.random.default_rng(0))


def test_rotary_is_a_rotation_with_relative_scores():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 12, 8, dtype=torch.float64), torch.randn(1, 1, 12, 8, dtype=torch.float64)
    rq = mqar.rotary(q)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rq[..., 0, :], q[..., 0, :])  # position 0 is not rotated
    # the same vectors placed at (t, s) and (t + 3, s + 3) score the same: only t - s matters
    qq, kk = q[0, 0, 2].expand(12, 8).reshape(1, 1, 12, 8), k[0, 0, 5].expand(12, 8).reshape(1, 1, 12, 8)
    scores = mqar.rotary(qq)[0, 0] @ mqar.rotary(kk)[0, 0].T
    torch.testing.assert_close(scores[7, 2], scores[10, 5])
    torch.testing.assert_close(scores[4, 1], scores[9, 6])


@pytest.mark.parametrize("conv_size", [0, 2])
def test_attention_reference_is_causal(conv_size):
    torch.manual_seed(0)
    model = mqar.AttentionLM(32, 16, 12, conv_size=conv_size).eval()
    ids = torch.randint(0, 32, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 32
    a, b = model.hidden(ids), model.hidden(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    with pytest.raises(ValueError, match="positions"):
        mqar.AttentionLM(32, 16, 12, positions="alibi")


def test_trainer_stops_on_its_time_budget_and_keeps_the_best_epoch():
    data = mqar.MQARData(vocab=32, seq_len=16, pairs=2, n_train=64, n_test=16)
    train, test = mqar._data_for(data)
    trial = mqar.Trial("metala", 32, 1e-2, data, epochs=50, batch=32, time_budget_s=1e-6)
    row = mqar.train_one(trial, train, test, torch.device("cpu"))
    assert row["stopped_by"] == "time_budget" and row["epochs_run"] == 1 and row["steps"] == 2
    assert row["accuracy"] == max(c["accuracy"] for c in row["curve"])
    # regenerating a trial's data in a worker gives the same examples
    again, _ = mqar._data_for(data)
    assert torch.equal(again[0], train[0]) and torch.equal(again[1], train[1])


def test_metala_and_attention_learn_to_recall(tmp_path):
    torch.manual_seed(0)
    result = mqar.main(["--setting", "cpu-smoke", "--out", str(tmp_path)])
    rows = {r["model"]: r for r in result["rows"]}
    chance = rows["metala"]["chance"]
    assert chance == 1 / 32
    # 4 pairs, 32 possible values: the 2-layer MetaLA model reaches ~89 % here, the attention reference ~99 %
    assert rows["metala"]["accuracy"] > 0.5, rows["metala"]
    assert rows["attention"]["accuracy"] > 0.5, rows["attention"]
    assert rows["attention"]["variant"] == "attention+conv2"
    saved = json.loads(next(tmp_path.glob("*_mqar_cpu-smoke.json")).read_text())
    curve = saved["rows"][0]["trials"][0]["curve"]
    assert len(curve) >= 1 and curve[-1]["step"] == saved["rows"][0]["trials"][0]["steps"]
    assert next(tmp_path.glob("*_mqar_cpu-smoke.png")).stat().st_size > 0
    # a summary of the run keeps one row per (setting, variant, width)
    summary = mqar.main(["--merge", *map(str, tmp_path.glob("*.json")), "--out", str(tmp_path / "sum.json")])
    assert len(summary["rows"]) == 2 and (tmp_path / "sum.png").stat().st_size > 0
