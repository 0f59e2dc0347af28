from metala.ops.metala.api import (
    BACKENDS,
    SplitOutput,
    check_metala_args,
    metala_attn,
    metala_attn_from_logits,
    resolve_backend,
    triton_usable,
)
from metala.ops.metala.fused_recurrent import fused_recurrent_metala
from metala.ops.metala.naive import naive_chunk_metala, naive_parallel_metala, naive_recurrent_metala

__all__ = [
    "BACKENDS",
    "SplitOutput",
    "check_metala_args",
    "fused_recurrent_metala",
    "metala_attn",
    "metala_attn_from_logits",
    "naive_chunk_metala",
    "naive_parallel_metala",
    "naive_recurrent_metala",
    "resolve_backend",
    "triton_usable",
]
