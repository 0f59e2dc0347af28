"""Parallelism for MetaLA: the DP x SP x TP layout, tensor-parallel layers and the sequence-parallel state passing."""
