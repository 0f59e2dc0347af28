"""Needle-in-a-haystack: prompt construction, scoring, the weighted average, resumable runs and the report."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from data_prep.tokenizer import Tokenizer
from eval import niah
from tests.conftest import DEMO_INPUTS
from tests.eval.test_lm_eval_adapter import exported  # noqa: F401  (shared fixture)


@pytest.fixture(scope="module")
def sentences():
    return niah.load_sentences(DEMO_INPUTS[:1], limit_chars=200_000)


@pytest.mark.parametrize("mode", ["passkey", "qa", "multikey"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_the_exact_length_and_the_needle_at_its_depth(mode, depth, sentences, tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    rng = random.Random(0)
    needle, question, answer, _ = niah.make_needle(mode, rng)
    ids = niah.build_prompt(tok, sentences, 2000, depth, needle, question, rng)
    assert len(ids) == 2000
    text = tok.decode(ids)
    assert needle in text and text.rstrip().endswith(question) and answer in needle
    # position within the haystack (the needle is moved back to a sentence boundary: within one sentence)
    head = text.index("\n") + 1
    hay = len(text) - head - len(needle) - len(question) - 3
    pos = (text.index(needle) - head) / hay
    assert abs(pos - depth) < 0.1


def test_scoring_rules():
    assert niah.score(" 12345 and 7", "12345", "first_int") == 1.0
    assert niah.score(" 7 then 12345", "12345", "first_int") == 0.0
    assert niah.score(" it is 1234567.", "1234567", "substring") == 1.0
    assert niah.score(" no number", "1234567", "substring") == 0.0


def test_weighted_average_favours_deep_and_long_cells():
    grid = np.zeros((3, 2))
    grid[-1, -1] = 1.0
    w = np.outer(1.1 ** np.arange(3), 1.1 ** np.arange(2))
    assert niah.weighted_average(grid) == pytest.approx(w[-1, -1] / w.sum())
    assert niah.weighted_average(np.ones((4, 5))) == pytest.approx(1.0)


def test_run_writes_cells_summary_heatmap_and_resumes(exported, tmp_path):
    out = tmp_path / "niah"
    s = niah.run(str(exported), "passkey", [200, 400], 3, 2, out, DEMO_INPUTS[:1], window=128, max_new=6)
    assert set(s["acc_at"]) == {"200", "400"} and 0 <= s["weighted"] <= 1
    assert (out / "heatmap.png").stat().st_size > 0
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 6 and json.loads(cells[0].read_text())["samples"][0]["tokens"] in (200, 400)
    # the decoding state does not grow with the context
    assert s["decode_cache_bytes"] > 0 and s["prefill_window"] == 128
    mtimes = {c.name: c.stat().st_mtime_ns for c in cells}
    again = niah.run(str(exported), "passkey", [200, 400], 3, 2, out, DEMO_INPUTS[:1], window=128, max_new=6)
    assert again["grid"] == s["grid"]
    assert {c.name: c.stat().st_mtime_ns for c in sorted((out / "cells").glob("*.json"))} == mtimes


def test_report_combines_everything(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from eval.run import main

    report = main(["--checkpoint", str(exported), "--out", str(tmp_path), "--tasks", "metala_local_mc",
                   "--niah-lengths", "200", "--niah-depths", "2", "--niah-samples", "1"])
    text = report.read_text()
    assert "## Zero-shot" in text and "metala_local_mc (acc)" in text and "## Needle in a haystack" in text
    assert (tmp_path / "niah_qa" / "heatmap.png").is_file()
