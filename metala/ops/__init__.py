"""Operators of the MetaLA model. Each operator folder holds its naive PyTorch twin beside its kernels."""

from metala.ops.metala import metala_attn, naive_chunk_metala, naive_recurrent_metala

__all__ = ["metala_attn", "naive_chunk_metala", "naive_recurrent_metala"]
