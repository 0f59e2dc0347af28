from metala.ops.utils.varlen import (
    check_cu_seqlens,
    pad_index,
    pad_packed,
    positions_in_seq,
    seq_ids,
    unpad_to_packed,
)

__all__ = ["check_cu_seqlens", "pad_index", "pad_packed", "positions_in_seq", "seq_ids", "unpad_to_packed"]
