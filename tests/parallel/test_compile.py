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


def test_parallelize_applies_compile_save(dynamo_counters):
    # train.compile_save reaches the trainer's model: the SwiGLU and its norm run as selective-checkpoint regions
    from pretrain.config import config_from_dict
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.parallelize import parallelize

    def build(save):
        cfg = config_from_dict({
            "name": "t", "model": {"preset": "125m", "vocab_size": 64}, "data": {"dir": "unused", "seq_len": 40},
            "optim": {"lr": 1e-3},
            "train": {"steps": 1, "global_batch": 2, "micro_batch": 2, "out_dir": "unused", "compile": True,
                      "compile_save": save},
        })
        model = MetaLAForCausalLM(MetaLAConfig.from_preset("125m", vocab_size=64, n_layers=2, d_model=64,
                                                           n_heads=2, attn_backend="chunk"))
        return parallelize(model, cfg, ParallelLayout(1, 0))[0]

    modules = {"mlp": "mlp", "mlp_norm": "mlp_norm", "mixer_norm": "mixer_norm", "conv_act": "mixer.conv_act",
               "out_gate": "mixer.out_gate"}
    for save, wrapped in (([], set()), (["swiglu"], {"mlp"}), (["swiglu", "mlp_norm"], {"mlp", "mlp_norm"}),
                          (["conv_silu", "out_gate"], {"conv_act", "out_gate"})):
        model = build(save)
        for block in model.layers:
            assert {n for n, path in modules.items() if "forward" in vars(block.get_submodule(path))} == wrapped


@pytest.mark.parametrize("save", [(), ("swiglu", "mlp_norm")])
def test_a_deep_copy_runs_its_own_weights(save, dynamo_counters):
    # every compiled piece is bound to its module as a method: a copy of the compiled model (an EMA or evaluation
    # copy, say) computes with its own weights, not the original's (also with train.compile_save's regions)
    cfg = MetaLAConfig.from_preset("125m", vocab_size=64, n_layers=2, d_model=64, n_heads=2, attn_backend="chunk")
    torch.manual_seed(0)
    eager = MetaLAForCausalLM(cfg)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, backend="aot_eager", save=save)
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


def _graph_capturing_backend(backward_graphs: list):
    """torch.compile backend with Inductor's decompositions and partitioner (the same choice of what to save for the
    backward as Inductor) that runs the graphs as they are and keeps the backward ones for inspection."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def forward_compiler(gm, example_inputs):
        return make_boxed_func(gm.forward)

    def backward_compiler(gm, example_inputs):
        backward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                        partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())


def _saved_bytes_and_matmuls(backward_graphs: list) -> tuple[int, int]:
    """Bytes of the activations the forward graphs hand to their backward (every backward input but the incoming
    gradients and the weights), and the matrix products the backward graphs run."""
    def is_activation(node) -> bool:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name.startswith("tangents") or not isinstance(val, torch.Tensor):
            return False
        # weights are 2-D [out, in] (or the conv's [D, 1, k]); activations carry the batch and time dims
        return val.dim() >= 3 and val.shape[0] != 64 or val.dim() == 2 and val.shape[0] == 2 * 128

    saved = matmuls = 0
    for gm in backward_graphs:
        for node in gm.graph.nodes:
            if is_activation(node):
                saved += node.meta["val"].numel() * node.meta["val"].element_size()
            if node.op == "call_function" and node.target in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
                                                              torch.ops.aten.addmm.default):
                matmuls += 1
    return saved, matmuls


def test_memory_budget_recomputes_elementwise_work_not_matmuls(dynamo_counters):
    # train.compile_memory_budget < 1: the partitioner recomputes the norms' outputs, SiLU(a) * b and the output gate
    # in the backward instead of saving them (H100, 360M, T = 2k: 36.4 -> 27.2 GB, -1.3 % tokens/s); no matrix product
    # may be recomputed (that would cost a third more of the step), and the gradients stay those of eager
    import torch._functorch.config as functorch_config

    cfg = MetaLAConfig.from_preset("125m", vocab_size=64, n_layers=3, d_model=64, n_heads=2, attn_backend="chunk")
    torch.manual_seed(0)
    eager = MetaLAForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(5))
    eager(ids, labels=ids).loss.backward()
    seen = {}
    try:
        for budget in (1.0, 0.9):
            torch._dynamo.reset()
            graphs = []
            model = copy.deepcopy(eager)
            model.zero_grad(set_to_none=True)
            apply_compile(model, backend=_graph_capturing_backend(graphs), memory_budget=budget)
            model(ids, labels=ids).loss.backward()
            for (name, p), ref in zip(model.named_parameters(), eager.parameters()):
                # Inductor's decompositions reorder fp32 sums: compared as a whole tensor, not element by element
                err = float((p.grad - ref.grad).norm() / ref.grad.norm())
                assert err < 1e-4, (budget, name, err)
            seen[budget] = _saved_bytes_and_matmuls(graphs)
    finally:
        functorch_config.activation_memory_budget = 1.0
    (full, mm_full), (lean, mm_lean) = seen[1.0], seen[0.9]
    assert mm_lean == mm_full > 0
    # at 360M ~19 -> ~13.5 [tokens, d_model]-sized bf16 tensors a layer; this small model has similar proportions
    assert lean < 0.8 * full, seen


def _saved_activations(backward_graphs: list) -> dict:
    """name -> shape of every activation the forward graphs hand to the boundary graph's backward (post_i +
    pre_{i+1}, the third compiled graph: pre_0, the last post, the boundary, the final norm in order of backward)."""
    gm = backward_graphs[2]
    return {n.name: tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "placeholder"
            and not n.name.startswith(("tangents", "primals")) and n.meta["val"].dim() >= 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_save_keeps_what_it_names_below_budget(dtype, dynamo_counters):
    # train.compile_save: below budget 1 the partitioner recomputes SiLU(a) * b and the norm's output; named here,
    # they are saved instead (1.3B: the SwiGLU product is 8.9 GB of the step's activations, the norm's output 3.2 GB).
    # Kept: one more [tokens, ffn] tensor a boundary for "swiglu", one [tokens, d_model] for "mlp_norm"; no graph
    # break, the same gradients
    import torch._functorch.config as functorch_config

    cfg = MetaLAConfig.from_preset("125m", vocab_size=64, n_layers=3, d_model=64, n_heads=2, attn_backend="chunk")
    torch.manual_seed(0)
    eager = MetaLAForCausalLM(cfg).to(dtype)
    ids = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(5))
    eager(ids, labels=ids).loss.backward()
    tokens, d, ffn = 2 * 128, cfg.d_model, cfg.intermediate_size
    kept = {}
    try:
        for save in ((), ("swiglu",), ("mlp_norm",), ("swiglu", "mlp_norm"), ("conv_silu",), ("out_gate",),
                     ("mlp_norm", "conv_silu", "out_gate")):
            torch._dynamo.reset()
            dynamo_counters.clear()
            graphs = []
            model = copy.deepcopy(eager)
            model.zero_grad(set_to_none=True)
            apply_compile(model, backend=_graph_capturing_backend(graphs), memory_budget=0.9, save=save)
            model(ids, labels=ids).loss.backward()
            assert dict(dynamo_counters["graph_break"]) == {}, save
            grads = [p.grad for p in model.parameters()]
            if not save:
                reference = grads
            for (name, _), g, r in zip(model.named_parameters(), grads, reference):
                # the same graphs but for what the backward recomputes: the same values
                torch.testing.assert_close(g, r, rtol=0, atol=0, msg=f"{save} {name}")
            kept[save] = _saved_activations(graphs)
    finally:
        functorch_config.activation_memory_budget = 1.0
    base = list(kept[()].values())
    added = {save: sorted(v for k, v in kept[save].items() if k not in kept[()]) for save in kept}
    # below budget 1 only the two matmul outputs a and b are kept of the SwiGLU, nothing of the norms
    assert base.count((tokens, ffn)) == 2 and (tokens, d) not in base, base
    assert added[("swiglu",)] == [(tokens, ffn)]
    assert added[("mlp_norm",)] == [(tokens, d)]
    assert added[("swiglu", "mlp_norm")] == sorted([(tokens, ffn), (tokens, d)])
    # the mixer's: the short conv's SiLU and the gated head-norm output, one [tokens, d_model] tensor each
    assert added[("conv_silu",)] == [(tokens, d)]
    assert added[("out_gate",)] == [(tokens, d)]
    assert added[("mlp_norm", "conv_silu", "out_gate")] == [(tokens, d)] * 3


def test_compile_options_are_checked():
    from pretrain.config import ConfigError, config_from_dict

    def cfg(tp=1, **train):
        return config_from_dict({
            "name": "t", "model": {"preset": "125m", "vocab_size": 64}, "data": {"dir": "unused", "seq_len": 40},
            "optim": {"lr": 1e-3}, "parallel": {"tp": tp},
            "train": {"steps": 1, "global_batch": 2, "micro_batch": 2, "out_dir": "unused", **train},
        })

    assert cfg(compile=True, compile_memory_budget=0.9, compile_mode="max-autotune-no-cudagraphs").train.compile
    # the recipes set a budget; `train.compile=false` on top of one (a CPU run, say) must still load
    assert cfg(compile=False, compile_memory_budget=0.9).train.compile_memory_budget == 0.9
    for bad, match in (({"compile": True, "compile_memory_budget": 0.0}, r"in \(0, 1\]"),
                       ({"compile": True, "compile_memory_budget": 1.5}, r"in \(0, 1\]"),
                       ({"compile": True, "compile_mode": "fast"}, "compile_mode must be one of"),
                       ({"compile": True, "compile_mode": "reduce-overhead"}, "compile_mode must be one of"),
                       ({"compile": True, "compile_save": ["gate"]}, "compile_save must hold names from"),
                       ({"compile": True, "compile_save": ["mlp_norm"], "activation_checkpointing": True},
                        "does not apply with activation_checkpointing"),
                       ({"compile": True, "compile_save": ["swiglu"], "tp": 2}, "not supported with parallel.tp")):
        with pytest.raises(ConfigError, match=match):
            cfg(**bad)
