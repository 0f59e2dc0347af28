"""Tensor and sequence parallelism against the single-process model: logits, loss and every parameter gradient,
with real process groups (gloo, CPU; 2 or 4 processes)."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metala import MetaLAConfig, MetaLAForCausalLM

B, T = 2, 48
# document starts (flat positions) 0 5 11 22 26 37 | 48 55 70 72 90: with 2 slices per row the row-0 edge (24) falls
# 2 tokens into a document (part of the conv halo is real, part is not); with 4 slices edges fall 1, 2, 10, 5 and
# 12 tokens into documents, one slice starts exactly at a document (72) right after a 2-token document
LENGTHS = [5, 6, 11, 4, 11, 11, 7, 15, 2, 18, 6]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(with_docs: bool):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 512, (B, T), generator=g)
    labels = torch.randint(0, 512, (B, T), generator=g)
    labels[0, 3] = -100
    if with_docs:
        cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
        assert int(cu[-1]) == B * T
    else:
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def worker(rank: int, world: int, tp: int, sp: int, port: int, with_docs: bool, backend: str = "chunk") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from pretrain.parallel.layout import ParallelLayout
        from pretrain.parallel.sequence import apply_sequence_parallel
        from pretrain.parallel.tensor import apply_tensor_parallel

        # sequence parallelism keeps the self-augmentation a module (apply_sequence_parallel): the one-process
        # reference does the same then; tensor parallelism alone keeps it fused in the operator
        cfg = MetaLAConfig.from_preset("tiny", attn_backend=backend, fuse_self_aug=sp == 1)
        ref = MetaLAForCausalLM(cfg, seed=3)
        with torch.no_grad():
            for layer in ref.layers:
                layer.mixer.self_aug.w_aug.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
        model = copy.deepcopy(ref)
        layout = ParallelLayout(world, rank, tp=tp, sp=sp)
        model = apply_tensor_parallel(model, layout)
        spar = apply_sequence_parallel(model, layout)
        assert all(layer.mixer.fuse_self_aug == (sp == 1) for layer in model.layers)
        batch = make_batch(with_docs)

        # the one-process reference runs on rank 0 only and is broadcast (the ranks share two CPU cores in CI)
        ref_out = [None]
        if rank == 0:
            out_ref = ref(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch["cu_seqlens"])
            out_ref.loss.backward()
            ref_out = [(out_ref.loss.detach(), out_ref.logits.detach(),
                        {n: p.grad for n, p in ref.named_parameters()})]
        dist.broadcast_object_list(ref_out, src=0)
        ref_loss, ref_logits, ref_grads = ref_out[0]

        local, total = (spar.slice_batch(batch) if spar is not None else (batch, None))
        out = model(local["input_ids"], labels=local["labels"], cu_seqlens=local["cu_seqlens"], return_logits=True)
        loss = out.loss if total is None else out.loss * out.n_tokens / total
        loss.backward()

        # loss: summed over SP ranks it is the micro-batch mean (what DeepSpeed's gradient sum assumes)
        full_loss = loss.detach().clone()
        if sp > 1:
            dist.all_reduce(full_loss, group=layout.sp_group)
        assert abs(full_loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item()), (full_loss, ref_loss)

        # logits: gathered along the vocabulary (TP) and the sequence (SP)
        logits = out.logits
        if tp > 1:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous(), group=layout.tp_group)
            logits = torch.cat(parts, dim=-1)
        if sp > 1:
            parts = [torch.empty_like(logits) for _ in range(sp)]
            dist.all_gather(parts, logits.contiguous(), group=layout.sp_group)
            logits = torch.cat(parts, dim=1)
        print("LOGITS_REL", tp, sp, rank, rel(logits, ref_logits), flush=True)
        assert rel(logits, ref_logits) < 1e-5, rel(logits, ref_logits)

        # gradients: summed over SP (replicated parameters), shards concatenated over TP
        for name, p in model.named_parameters():
            g = p.grad.clone()
            if sp > 1:
                dist.all_reduce(g, group=layout.sp_group)
            if getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(g) for _ in range(tp)]
                dist.all_gather(parts, g.contiguous(), group=layout.tp_group)
                g = torch.cat(parts, dim=p.partition_dim)
            err = rel(g, ref_grads[name])
            assert err < 2e-5, f"{name}: relative error {err:.2e} (tp={tp}, sp={sp}, rank={rank})"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tp,sp", [(2, 1), (1, 2), (1, 4), (2, 2)], ids=["TP2", "SP2", "SP4", "TP2xSP2"])
@pytest.mark.parametrize("with_docs", [True, False], ids=["packed-docs", "one-doc-per-row"])
def test_parallel_model_matches_single_process(tp, sp, with_docs):
    world = tp * sp
    mp.spawn(worker, args=(world, tp, sp, free_port(), with_docs), nprocs=world, join=True)


@pytest.mark.parametrize("sp", [2, 4], ids=["SP2", "SP4"])
def test_sequence_parallel_on_the_triton_kernels(sp):
    """The same check with the model on the Triton operator (CPU interpreter here, compiled on a GPU): the SP
    correction then runs on its Triton kernels too (`metala.ops.incoming_state`)."""
    from metala.ops.metala.api import triton_usable

    if not triton_usable(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("needs a CUDA GPU or the Triton CPU interpreter")
    mp.spawn(worker, args=(sp, 1, sp, free_port(), True, "triton"), nprocs=sp, join=True)
