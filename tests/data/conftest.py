"""Shared fixtures for the data-stage tests: a small tokenizer trained once per session on the demo corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corpus import DEMO_DIR

DEMO_INPUTS = [str(DEMO_DIR / "00.jsonl.zst"), str(DEMO_DIR / "01.jsonl.zst")]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from data_prep.train_tokenizer import main

    out = tmp_path_factory.mktemp("tok")
    main(["--input", *DEMO_INPUTS, "--vocab-size", "1024", "--max-chars", "3000000", "--output", str(out),
          "--num-threads", "2"])
    return out


@pytest.fixture(scope="session")
def tokenizer_model(tokenizer_dir) -> str:
    return str(tokenizer_dir / "tokenizer.model")
