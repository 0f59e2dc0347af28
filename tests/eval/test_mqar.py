"""MQAR (Zoology multi-query associative recall): the data generator's contract, and the MetaLA 2-layer model
learning to recall well above chance on a tiny CPU setting."""

from __future__ import annotations

import json

import numpy as np
import torch

from eval import mqar


def test_generator_layout_and_labels():
    vocab, seq, pairs = 64, 40, 5
    inputs, labels = mqar.make_mqar(vocab, seq, pairs, 50, 0.01, np.random.default_rng(0))
    assert inputs.shape == labels.shape == (50, seq)
    half = vocab // 2
    for x, y in zip(inputs.numpy(), labels.numpy()):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and np.all((keys >= 1) & (keys < half)) and np.all(values >= half)
        table = dict(zip(keys, values))
        scored = np.nonzero(y != mqar.IGNORE)[0]
        # every key is asked exactly once, after the pairs, and the target is that key's value
        assert len(scored) == pairs and np.all(scored >= 2 * pairs)
        assert sorted(x[scored]) == sorted(keys)
        assert all(y[t] == table[x[t]] for t in scored)


def test_generator_rejects_too_many_pairs():
    try:
        mqar.make_mqar(64, 16, 5, 2, 0.01, np.random.default_rng(0))
    except ValueError as e:
        assert "5 pairs" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_metala_learns_to_recall_above_chance(tmp_path):
    torch.manual_seed(0)
    result = mqar.main(["--setting", "cpu-smoke", "--out", str(tmp_path)])
    rows = {r["model"]: r for r in result["rows"]}
    chance = rows["metala"]["chance"]
    # 4 pairs, 32 possible values: chance is 1/32; the 2-layer MetaLA model reaches ~19% here
    assert rows["metala"]["accuracy"] > 4 * chance, rows["metala"]
    assert rows["attention"]["accuracy"] > 4 * chance, rows["attention"]
    saved = json.loads(next(tmp_path.glob("*_mqar_cpu-smoke.json")).read_text())
    assert saved["rows"][0]["trials"][0]["steps"] > 0
    assert next(tmp_path.glob("*_mqar_cpu-smoke.png")).stat().st_size > 0
