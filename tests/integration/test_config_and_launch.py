"""Recipes, overrides and launch-script dry runs: bad configuration fails early and says which key is wrong."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, load_config, rank_micro_batch
from pretrain.optim import lr_multiplier
from pretrain.trainer import deepspeed_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (REPO / "launch/configs").glob("*.yaml"))


def test_every_preset_has_a_recipe():
    assert {"tiny-cpu", "125m", "360m", "1.3b", "1.4b", "3b"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_every_recipe(recipe):
    # the CPU recipe is meant for 2 ranks, the GPU recipes for 8-GPU nodes
    gpus = "2" if recipe == "tiny-cpu" else "8"
    env = {**os.environ, "DRY_RUN": "1", "NUM_GPUS": gpus, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), recipe], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dry run: configuration is valid" in r.stdout
    assert "tokens/step" in r.stdout and f"{gpus} ranks = DP {gpus} x SP 1 x TP 1" in r.stdout
    # what the run compiles and what it keeps for the backward, as the recipe sets it
    recipe_train = yaml.safe_load((REPO / f"launch/configs/{recipe}.yaml").read_text())["train"]
    if recipe_train.get("compile"):
        budget = recipe_train.get("compile_memory_budget", 1.0)
        kept = recipe_train.get("compile_save", [])
        saved = f", saving {', '.join(kept)}" if kept else ""
        assert f"torch.compile (mode default, activation memory budget {budget:g}{saved})" in r.stdout
    else:
        assert "eager (train.compile=false)" in r.stdout


def test_dry_run_reports_an_impossible_batch():
    env = {**os.environ, "DRY_RUN": "1", "NUM_GPUS": "3", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), "360m"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "global_batch (256) must be a multiple" in r.stderr
    assert "must be a multiple of the data-parallel size (3)" in r.stderr


def test_micro_batch_is_capped_at_a_ranks_share_and_a_misfit_names_one_that_fits():
    # the 360m recipe's micro-batch of 32 fills one rank's 32 sequences on 8 GPUs; 16 GPUs leave 16 a rank, which
    # each rank then runs at once (no more memory than 32 would take)
    env = {**os.environ, "DRY_RUN": "1", "NUM_GPUS": "16", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), "360m"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "micro 16/rank (train.micro_batch 32 capped at the rank's share), grad accumulation 1" in r.stdout
    env["NUM_GPUS"] = "3"
    r = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), "360m", "train.global_batch=96",
                        "train.micro_batch=12"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "each rank gets 32 sequences a step: set e.g. train.micro_batch=8" in r.stderr


def test_deepspeed_config_takes_the_ranks_micro_batch():
    cfg = load_config(tiny_recipe(), ["train.global_batch=16", "train.micro_batch=16"])
    assert rank_micro_batch(cfg.train, 1) == 16 and rank_micro_batch(cfg.train, 4) == 4
    ds = deepspeed_config(cfg, 2, "fp32")
    batch = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    assert tuple(ds[k] for k in batch) == (16, 8, 1)
    ds = deepspeed_config(load_config(tiny_recipe(), ["train.global_batch=16", "train.micro_batch=2"]), 2, "fp32")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 4)
    with pytest.raises(ConfigError, match="must be a multiple of the data-parallel size"):
        rank_micro_batch(cfg.train, 3)


def test_unknown_recipe_name():
    r = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), "9b"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 2 and "recipe not found" in r.stderr


def tiny_recipe() -> Path:
    return REPO / "launch/configs/tiny-cpu.yaml"


def test_overrides_are_typed():
    cfg = load_config(tiny_recipe(), ["train.steps=7", "optim.betas=[0.9, 0.99]", "model.n_layers=3", "optim.lr=1"])
    assert cfg.train.steps == 7 and cfg.optim.betas == [0.9, 0.99] and cfg.optim.lr == 1.0
    assert cfg.model.build(vocab_size=1024).n_layers == 3


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.stpes=5", "unknown key 'train.stpes' (did you mean 'steps'?)"),
        ("trian.steps=5", "unknown section 'trian' (did you mean 'train'?)"),
        ("model.n_layer=3", "unknown key 'model.n_layer' (did you mean 'n_layers'?)"),
        ("train.steps=many", "train.steps must be an integer"),
        ("train.zero_stage=4", "train.zero_stage must be 0, 1, 2 or 3"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("model.n_heads=3", "n_heads (3) must divide"),
        ("train.micro_batch=5", "must be a multiple of train.micro_batch"),
        ("data.verify=maybe", "data.verify must be 'full' or 'size'"),
        ("steps=5", "must look like section.key=value"),
    ],
)
def test_config_errors_name_the_key(override, message):
    if override == "steps=5":
        override = "steps"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tiny_recipe(), [override])


def test_cli_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(tiny_recipe()), *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO)

    r = run("train.stpes=3")
    assert r.returncode == 2 and "did you mean 'steps'" in r.stderr
    r = run(f"data.dir={tmp_path / 'nothing'}", f"train.out_dir={tmp_path / 'out'}", "data.tokenizer=")
    assert r.returncode == 2 and "no manifest.json" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "recipe not found" in r.stderr


def test_lr_schedule():
    warm, total = 10, 110
    assert lr_multiplier(0, warm, total, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, warm, total, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(60, warm, total, 0.1) == pytest.approx(0.55)
    assert lr_multiplier(110, warm, total, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(500, warm, total, 0.1) == pytest.approx(0.1)
