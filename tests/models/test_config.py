"""Presets, parameter counts (metala.md section 8 table) and config validation."""

from __future__ import annotations

import pytest
import torch

from metala import MetaLAConfig, MetaLAForCausalLM

# N at V = 32000 (tiny at V = 512), copied from the spec's table
SPEC_COUNTS = {
    "tiny": 139_968,
    "125m": 109_561_344,
    "360m": 341_184_512,
    "1.3b": 1_298_931_712,
    "1.4b": 1_364_467_712,
    "3b": 2_937_175_040,
}
SPEC_COUNTS_50304 = {"125m": 123_618_816, "360m": 359_927_808, "1.3b": 1_336_418_304, "1.4b": 1_439_440_896}


def meta_model(cfg: MetaLAConfig) -> MetaLAForCausalLM:
    with torch.device("meta"):
        return MetaLAForCausalLM(cfg)


@pytest.mark.parametrize("preset", list(SPEC_COUNTS))
def test_preset_param_count_matches_spec(preset):
    cfg = MetaLAConfig.from_preset(preset)
    n = meta_model(cfg).num_params()
    assert abs(n - SPEC_COUNTS[preset]) / SPEC_COUNTS[preset] < 0.02
    assert n == cfg.param_count()


@pytest.mark.parametrize("preset", list(SPEC_COUNTS_50304))
def test_paper_vocab_counts(preset):
    cfg = MetaLAConfig.from_preset(preset, vocab_size=50304)
    assert abs(meta_model(cfg).num_params() - SPEC_COUNTS_50304[preset]) / SPEC_COUNTS_50304[preset] < 0.02


def test_preset_shapes():
    cfg = MetaLAConfig.from_preset("1.3b")
    assert (cfg.head_qk_dim, cfg.head_v_dim, cfg.intermediate_size) == (64, 128, 5632)
    assert MetaLAConfig.from_preset("360m").intermediate_size == 2816
    assert MetaLAConfig.from_preset("3b").intermediate_size == 6912
    assert MetaLAConfig.from_preset("tiny").intermediate_size == 192
    assert not MetaLAConfig.from_preset("1.4b").tie_embeddings


def test_ablation_switches_change_exact_counts():
    base = MetaLAConfig.from_preset("360m")
    d, L = base.d_model, base.n_layers
    n = meta_model(base).num_params()
    assert meta_model(MetaLAConfig.from_preset("360m", use_key=True)).num_params() - n == L * d * d // 2
    assert n - meta_model(MetaLAConfig.from_preset("360m", use_conv=False)).num_params() == L * 4 * d
    assert n - meta_model(MetaLAConfig.from_preset("360m", self_aug=False)).num_params() == L * d // 2


def test_layernorm_option_counts():
    cfg = MetaLAConfig.from_preset("tiny", norm_type="layernorm")
    assert cfg.norm_eps == 1e-5
    assert meta_model(cfg).num_params() == SPEC_COUNTS["tiny"] + 2 * 4 * 64 + 2 * 64


def test_roundtrip_dict():
    cfg = MetaLAConfig.from_preset("125m")
    assert MetaLAConfig.from_dict(cfg.to_dict()) == cfg


class TestValidation:
    def test_unknown_preset(self):
        with pytest.raises(ValueError, match="unknown preset 'huge'"):
            MetaLAConfig.from_preset("huge")
        with pytest.raises(ValueError, match="did you mean '360m'"):
            MetaLAConfig.from_preset("360")

    def test_heads_must_divide_qk_dim(self):
        with pytest.raises(ValueError, match="n_heads .* must divide qk_dim"):
            MetaLAConfig(vocab_size=512, d_model=96, n_layers=1, n_heads=5)

    def test_head_dims_power_of_two(self):
        with pytest.raises(ValueError, match="qk_dim / n_heads must be a power of two"):
            MetaLAConfig(vocab_size=512, d_model=96, n_layers=1, n_heads=2)

    def test_unknown_field(self):
        with pytest.raises(ValueError, match="unknown MetaLAConfig field 'n_layer'.*'n_layers'"):
            MetaLAConfig.from_preset("tiny", n_layer=3)

    def test_bad_values(self):
        with pytest.raises(ValueError, match="norm_type"):
            MetaLAConfig.from_preset("tiny", norm_type="batchnorm")
        with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
            MetaLAConfig.from_preset("tiny", vocab_size=0)
        with pytest.raises(ValueError, match="attn_backend"):
            MetaLAConfig.from_preset("tiny", attn_backend="flash")
        with pytest.raises(ValueError, match="fuse_self_aug must be true or false"):
            MetaLAConfig.from_preset("tiny", fuse_self_aug="yes")
        with pytest.raises(ValueError, match="missing required field 'n_heads'"):
            MetaLAConfig.from_dict({"vocab_size": 8, "d_model": 64, "n_layers": 1})
