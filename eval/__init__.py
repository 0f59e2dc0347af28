"""Evaluation of trained MetaLA models: lm-evaluation-harness adapter, needle-in-a-haystack, report, samples."""
