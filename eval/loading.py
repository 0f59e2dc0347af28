"""Load a trained model and its tokenizer from a training run, a checkpoint folder or an exported folder."""

from __future__ import annotations

from pathlib import Path

import torch

from data_prep.tokenizer import Tokenizer
from metala import MetaLAForCausalLM
from metala.export import CONFIG, TOKENIZER, WEIGHTS, from_pretrained, model_from_state


def load_model_and_tokenizer(path: str | Path, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32) -> tuple[MetaLAForCausalLM, Tokenizer]:
    p = Path(path)
    if (p / CONFIG).is_file() and (p / WEIGHTS).is_file():
        model = from_pretrained(p, device=device, dtype=dtype)
        tok_file = p / TOKENIZER
    else:
        from pretrain.consolidate import load_consolidated

        state, config, folder = load_consolidated(p)
        model = model_from_state(state, config).to(device=device, dtype=dtype)
        tok_file = folder / TOKENIZER
    if not tok_file.is_file():
        raise FileNotFoundError(f"no {TOKENIZER} next to the weights in {p}")
    return model.eval(), Tokenizer(tok_file)
