"""Self-contained model folders: `model.safetensors` + `config.json` (+ `tokenizer.model`).

    python -m metala.export --checkpoint runs/demo/train --out exported/metala-tiny
    model = MetaLAForCausalLM.from_pretrained("exported/metala-tiny")

The library functions need only torch and safetensors; the command line reads training checkpoints through
`pretrain.consolidate` (DeepSpeed files, tensor-parallel shards).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from metala.config import MetaLAConfig
from metala.model import MetaLAForCausalLM

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"


def save_pretrained(model: MetaLAForCausalLM, out_dir: str | Path, tokenizer_file: str | Path | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        # safetensors refuses shared storage; the tie is restored from the config on load
        state.pop("lm_head.weight", None)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "architecture": "MetaLAForCausalLM"})
    (out / CONFIG).write_text(json.dumps({"architecture": "MetaLAForCausalLM", **model.config.to_dict()}, indent=2))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / TOKENIZER)
    return out


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    **config_overrides) -> MetaLAForCausalLM:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not an exported MetaLA folder (needs {CONFIG} and {WEIGHTS})")
    raw = json.loads((path / CONFIG).read_text())
    raw.pop("architecture", None)
    raw.update(config_overrides)
    config = MetaLAConfig.from_dict(raw)
    with torch.device("meta"):
        model = MetaLAForCausalLM(config)
    model.to_empty(device=device)
    model.tie_weights()
    state = load_file(str(path / WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}/{WEIGHTS} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype)


def model_from_state(state: dict[str, torch.Tensor], config: dict) -> MetaLAForCausalLM:
    with torch.device("meta"):
        model = MetaLAForCausalLM(MetaLAConfig.from_dict(config))
    model.to_empty(device="cpu")
    model.tie_weights()
    model.load_state_dict(state, strict=not config.get("tie_embeddings", True))
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ folder, or a step_* folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = ap.parse_args(argv)
    from pretrain.consolidate import load_consolidated

    state, config, folder = load_consolidated(args.checkpoint)
    model = model_from_state(state, config)
    tok = folder / TOKENIZER
    out = save_pretrained(model, args.out, tok if tok.is_file() else None, getattr(torch, args.dtype))
    print(f"exported {folder} -> {out} ({model.num_params() / 1e6:.2f}M params)")


if __name__ == "__main__":
    main()
