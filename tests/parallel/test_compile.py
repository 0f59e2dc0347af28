"""`apply_compile`: the stages around the recurrent operator become whole graphs, and the compiled model computes what
the eager one does (loss and every gradient), on packed documents.

The "aot_eager" backend traces the same dynamo graphs and AOTAutograd joint graphs as Inductor, without generating
code (seconds on CPU): graph breaks and the graph count are what this guards; Inductor's numerics are checked on the
GPU by bench/train_throughput.py's gate.
"""

from __future__ import annotations

import copy

import pytest
import torch

from metala import MetaLAConfig, MetaLAForCausalLM
from pretrain.parallelize import apply_compile


@pytest.fixture
def dynamo_counters():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("fuse_boundaries", [True, False])
@pytest.mark.parametrize("fuse_self_aug", [True, False])
def test_compiled_stages_match_eager(fuse_self_aug, fuse_boundaries, dynamo_counters):
    cfg = MetaLAConfig.from_preset("125m", vocab_size=64, n_layers=3, d_model=64, n_heads=2, attn_backend="chunk",
                                   fuse_self_aug=fuse_self_aug)
    torch.manual_seed(0)
    eager = MetaLAForCausalLM(cfg)
    with torch.no_grad():
        for layer in eager.layers:
            layer.mixer.self_aug.w_aug.normal_(0, 0.5)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, backend="aot_eager", fuse_boundaries=fuse_boundaries)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 13, 50, 80], dtype=torch.int32)
    losses = []
    for model in (eager, compiled):
        out = model(ids, labels=ids, cu_seqlens=cu)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():  # parameter names unchanged by compiling
        assert grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # no graph break anywhere, and one graph per code object, shared by the layers: per block the two stages around
    # the operator and the final norm; with fused boundaries the first block's pre, the boundary (post_i +
    # pre_{i+1}, twice here), the last block's post and the final norm
    assert dict(dynamo_counters["graph_break"]) == {}
    assert dynamo_counters["stats"]["unique_graphs"] == (4 if fuse_boundaries else 3)
    # the boundary runner is installed on the instance only when asked for
    assert ("run_layers" in vars(compiled)) == fuse_boundaries


def test_generation_is_unchanged_by_compiling(dynamo_counters):
    # decoding goes through the same stages with a cache (state and conv state handed back between them)
    cfg = MetaLAConfig.from_preset("125m", vocab_size=64, n_layers=2, d_model=64, n_heads=2, attn_backend="chunk")
    torch.manual_seed(0)
    eager = MetaLAForCausalLM(cfg).eval()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, backend="aot_eager")
    prompt = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    a = eager.generate(prompt, max_new_tokens=6)
    b = compiled.generate(prompt, max_new_tokens=6)
    assert torch.equal(a, b)


def test_no_gradient_is_restrided_between_graphs(dynamo_counters, monkeypatch):
    # the regression this structure fixed: with the block compiled whole, dynamo cut it inside the mixer, and at the cut
    # after the block norm the conv's input gradient (a strided slice of its padded buffer, [B, T, D] with the stride
    # of T + k - 1 rows) reached AOTAutograd as a tangent, which copied it to the layout it had traced: one [B, T, D]
    # copy a layer (0.17 ms at the 1.3B shape on an H200). Reproduced here on CPU with the old structure: 3 copies.
    from torch._functorch._aot_autograd import runtime_wrappers

    # the pinned torch (launch/setup_env.sh) has the hook; a torch without it must fail here, not pass unchecked
    assert hasattr(runtime_wrappers, "coerce_to_expected_memory_format"), "AOTAutograd's tangent coercion moved"
    restrided = []
    original = runtime_wrappers.coerce_to_expected_memory_format

    def watch(x, memory_format):
        y = original(x, memory_format)
        if y is not x:
            restrided.append((tuple(x.shape), x.stride()))
        return y

    monkeypatch.setattr(runtime_wrappers, "coerce_to_expected_memory_format", watch)
    cfg = MetaLAConfig.from_preset("125m", vocab_size=64, n_layers=3, d_model=64, n_heads=2, attn_backend="chunk")
    model = MetaLAForCausalLM(cfg)
    apply_compile(model, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(3))
    model(ids, labels=ids).loss.backward()
    assert restrided == []


@pytest.mark.parametrize("activation_checkpointing", [True, False])
def test_checkpointed_blocks_keep_the_per_block_stack(activation_checkpointing, dynamo_counters):
    # a boundary graph (post_i + pre_{i+1}) would span two blocks' checkpoints: with checkpointing the trainer keeps
    # the per-block forward (each block recomputed alone), without it the boundaries are fused
    from pretrain.config import config_from_dict
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.parallelize import parallelize

    cfg = config_from_dict({
        "name": "t", "model": {"preset": "125m", "vocab_size": 64}, "data": {"dir": "unused", "seq_len": 40},
        "optim": {"lr": 1e-3},
        "train": {"steps": 1, "global_batch": 2, "micro_batch": 2, "out_dir": "unused", "compile": True,
                  "activation_checkpointing": activation_checkpointing},
    })
    model = MetaLAForCausalLM(MetaLAConfig.from_preset("125m", vocab_size=64, n_layers=2, d_model=64, n_heads=2,
                                                       attn_backend="chunk"))
    model, _ = parallelize(model, cfg, ParallelLayout(1, 0))
    assert ("run_layers" in vars(model)) == (not activation_checkpointing)


def test_a_deep_copy_runs_its_own_weights(dynamo_counters):
    # every compiled piece is bound to its module as a method: a copy of the compiled model (an EMA or evaluation
    # copy, say) computes with its own weights, not the original's
    cfg = MetaLAConfig.from_preset("125m", vocab_size=64, n_layers=2, d_model=64, n_heads=2, attn_backend="chunk")
    torch.manual_seed(0)
    eager = MetaLAForCausalLM(cfg)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, backend="aot_eager")
    twin = copy.deepcopy(compiled)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(4))
    before = compiled(ids).logits.detach()
    with torch.no_grad():
        for a, b in zip(twin.parameters(), eager.parameters()):
            noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel())) * 0.1
            a.add_(noise)
            b.add_(noise)
    torch.testing.assert_close(twin(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(ids).logits, before)
