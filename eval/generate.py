"""Generate text from a trained MetaLA with O(1)-per-token recurrent decoding.

    python -m eval.generate --checkpoint runs/demo/train --prompt "To be, or not to be" --max-new-tokens 60
"""

from __future__ import annotations

import argparse

import torch

from eval.loading import load_model_and_tokenizer


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run dir, step_* folder or exported folder")
    ap.add_argument("--prompt", action="append", required=True, help="may be given several times")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, tok = load_model_and_tokenizer(args.checkpoint)
    gen = torch.Generator().manual_seed(args.seed)
    outs = []
    for prompt in args.prompt:
        ids = torch.tensor([tok.encode(prompt)])
        out = model.generate(ids, args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_id, generator=gen)
        text = tok.decode(out[0, ids.shape[1]:].tolist())
        outs.append(text)
        print(f"--- prompt: {prompt!r}\n{prompt}{text}\n")
    return outs


if __name__ == "__main__":
    main()
