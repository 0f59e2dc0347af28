"""Benchmarks; each writes JSON to bench/results/<yyyymmdd>_<gpu tag>_<bench>[_<tag>].json."""


def gpu_tag(name: str) -> str:
    """Short device name for result files: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200'."""
    for chip in ("H100", "H200", "B200", "A100"):
        if chip in name:
            return chip.lower()
    return name.replace("NVIDIA", "").strip().replace(" ", "_").lower() or "gpu"
