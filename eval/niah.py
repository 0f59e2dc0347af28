"""Needle in a haystack for recurrent MetaLA models, scored without a judge.

    python -m eval.niah --checkpoint runs/demo/train --mode qa --lengths 1024,2048,4096 --depths 11 --samples 10

Haystack: real text (the bundled demo corpus, or any .jsonl/.jsonl.zst files) cut into sentences. A needle is
inserted at a grid of depths x prompt lengths (lengths count every prompt token), moved back to a sentence
boundary. Modes (shared/spec/data_eval.md section 8):
  passkey   "The pass key is N. Remember it. N is the pass key." ... "What is the pass key? The pass key is";
            exact match on the first integer generated
  qa        the "easy mode" MetaLA reports: a question-answer pair is the needle ("Question: What is the special
            magic number for {word}? Answer: {7 digits}."), re-asked at the end; substring match
  multikey  four needles "One of the special magic numbers for {key} is: {value}.", one asked; substring match
Decoding is greedy with a short budget, stopping at a newline. The context is prefilled through the recurrent
state in windows of --window tokens, so memory stays flat in context length (the report records it).

Outputs in OUT: cells/L{length}_D{depth}.json (one per grid cell: the run resumes where it stopped),
summary.json (acc@L, acc<=L, Avg, Weighted with alpha_depth = alpha_length = 1.1) and heatmap.png.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lantern", "meadow", "nebula", "obsidian", "pebble", "quartz", "river", "saffron", "tundra", "umber",
         "violet", "willow", "xenon", "yarrow", "zephyr"]


def load_sentences(paths: list[str], limit_chars: int = 3_000_000) -> list[str]:
    import zstandard

    sentences, seen = [], 0
    for path in paths:
        raw = Path(path).read_bytes()
        if path.endswith(".zst"):
            raw = zstandard.ZstdDecompressor().stream_reader(raw).read()
        for line in raw.decode("utf-8").splitlines():
            text = json.loads(line).get("text", "")
            for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
                if 20 <= len(s) <= 400:
                    sentences.append(s)
                    seen += len(s)
            if seen >= limit_chars:
                return sentences
    return sentences


def make_needle(mode: str, rng: random.Random) -> tuple[str, str, str, str]:
    """(needle text, question, expected answer, scoring rule)"""
    if mode == "passkey":
        n = str(rng.randint(1, 50000))
        return (f"The pass key is {n}. Remember it. {n} is the pass key.", "What is the pass key? The pass key is",
                n, "first_int")
    if mode == "qa":
        word, n = rng.choice(WORDS), str(rng.randint(1_000_000, 9_999_999))
        q = f"Question: What is the special magic number for {word}? Answer:"
        return f"{q} {n}.", q, n, "substring"
    if mode == "multikey":
        keys = rng.sample(WORDS, 4)
        vals = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        needle = " ".join(f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals))
        i = rng.randrange(4)
        return needle, f"What is the special magic number for {keys[i]}? The special magic number for " \
                       f"{keys[i]} is:", vals[i], "substring"
    raise ValueError(f"unknown mode {mode!r}")


def build_prompt(tok, sentences: list[str], length: int, depth: float, needle: str, question: str,
                 rng: random.Random) -> list[int]:
    """Token ids of haystack(depth%) + needle + haystack + question, `length` tokens in total."""
    head_ids = tok.encode("Read the text and answer the question at the end.\n")
    needle_ids = tok.encode(" " + needle + " ")
    q_ids = tok.encode("\n" + question)
    budget = length - len(head_ids) - len(needle_ids) - len(q_ids)
    if budget <= 0:
        raise ValueError(f"length {length} is too short for the needle and question")
    start = rng.randrange(len(sentences))
    hay: list[list[int]] = []
    total = 0
    i = start
    while total < budget:
        ids = tok.encode(" " + sentences[i % len(sentences)])
        hay.append(ids)
        total += len(ids)
        i += 1
    flat_sent_ends = np.cumsum([len(h) for h in hay])
    # insertion point: depth% of the haystack, moved back to the previous sentence boundary
    target = int(budget * depth)
    cut = int(flat_sent_ends[flat_sent_ends <= target][-1]) if (flat_sent_ends <= target).any() else 0
    flat = [t for h in hay for t in h][:budget]
    return head_ids + flat[:cut] + needle_ids + flat[cut:] + q_ids


def score(text: str, answer: str, rule: str) -> float:
    if rule == "first_int":
        m = re.search(r"\d+", text)
        return float(m is not None and m.group(0) == answer)
    return float(answer.lower() in text.lower())


@torch.no_grad()
def answer(model, tok, ids: list[int], window: int, max_new: int) -> str:
    """Prefill through the recurrent state `window` tokens at a time, then decode greedily."""
    cache = model.new_cache()
    device = next(model.parameters()).device
    for s in range(0, len(ids) - 1, window):
        model(torch.tensor([ids[s : min(s + window, len(ids) - 1)]], device=device), cache=cache)
    last = torch.tensor([ids[-1:]], device=device)
    nl = tok.encode("\n")

    def stop(new: torch.Tensor) -> torch.Tensor:
        return torch.tensor([bool(nl) and new[0, -1].item() in nl], device=new.device)

    out = model.generate(last, max_new, cache=cache, eos_token_id=tok.eos_id, stop=stop)
    return tok.decode([t for t in out[0, 1:].tolist() if t != tok.eos_id])


def weighted_average(grid: np.ndarray, alpha_depth: float = 1.1, alpha_len: float = 1.1) -> float:
    """SL's weighted average: deeper and longer cells weigh more (w_i = alpha^i), weights from the outer product."""
    wd = alpha_depth ** np.arange(grid.shape[0])
    wl = alpha_len ** np.arange(grid.shape[1])
    w = np.outer(wd, wl)
    return float((grid * w).sum() / w.sum())


def summarize(grid: np.ndarray, lengths: list[int], depths: list[float]) -> dict:
    per_len = grid.mean(axis=0)
    return {
        "acc_at": {str(L): float(a) for L, a in zip(lengths, per_len)},
        "acc_upto": {str(L): float(per_len[: i + 1].mean()) for i, L in enumerate(lengths)},
        "avg": float(grid.mean()),
        "weighted": weighted_average(grid),
        "lengths": lengths,
        "depths": depths,
        "grid": grid.tolist(),
    }


def heatmap(grid: np.ndarray, lengths: list[int], depths: list[float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.35 * len(depths)), dpi=120)
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(checkpoint: str, mode: str, lengths: list[int], n_depths: int, samples: int, out: Path,
        haystack: list[str], window: int = 2048, max_new: int = 12, seed: int = 0, device: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(exist_ok=True)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model_and_tokenizer(checkpoint, device=dev)
    sentences = load_sentences(haystack)
    depths = [float(d) for d in np.linspace(0, 1, n_depths)]
    grid = np.zeros((len(depths), len(lengths)))
    memory = {}
    cells = [(i, j) for j in range(len(lengths)) for i in range(len(depths))]
    for i, j in tqdm(cells, desc=f"niah {mode}"):
        L, d = lengths[j], depths[i]
        cell_file = out / "cells" / f"L{L}_D{round(100 * d):03d}.json"
        if cell_file.is_file():
            grid[i, j] = json.loads(cell_file.read_text())["score"]
            continue
        # needles and haystack offsets depend only on (seed, mode, cell): reruns and resumed runs agree
        rng = random.Random(zlib.crc32(f"{seed}:{mode}:{L}:{round(100 * d)}".encode()))
        rows = []
        t0 = time.time()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(samples):
            needle, question, ans, rule = make_needle(mode, rng)
            ids = build_prompt(tok, sentences, L, d, needle, question, rng)
            text = answer(model, tok, ids, window, max_new)
            rows.append({"answer": ans, "generated": text, "score": score(text, ans, rule), "tokens": len(ids)})
        peak = (torch.cuda.max_memory_allocated() if dev == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        memory.setdefault(str(L), peak / 2**20)
        grid[i, j] = float(np.mean([r["score"] for r in rows]))
        cell_file.write_text(json.dumps({"mode": mode, "length": L, "depth": d, "score": grid[i, j],
                                         "seconds": round(time.time() - t0, 3), "samples": rows}, indent=1))
    summary = summarize(grid, lengths, depths)
    cache = model.new_cache()
    model(torch.tensor([[tok.eos_id]], device=dev), cache=cache)
    summary.update({"mode": mode, "samples_per_cell": samples, "checkpoint": checkpoint, "prefill_window": window,
                    "decode_cache_bytes": cache.nbytes(), "peak_memory_MiB_by_length": memory,
                    "memory_note": "CUDA peak allocated per length" if dev == "cuda"
                    else "process peak RSS (monotonic) when each length was first run"})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    heatmap(grid, lengths, depths, out / "heatmap.png", f"NIAH ({mode}) - weighted {100 * summary['weighted']:.1f}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--mode", choices=["passkey", "qa", "multikey"], default="qa")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="prompt lengths in tokens")
    ap.add_argument("--depths", type=int, default=11, help="number of depths in [0, 100%%]")
    ap.add_argument("--samples", type=int, default=10, help="seeded samples per cell")
    ap.add_argument("--haystack", nargs="+", default=[str(p) for p in sorted((ROOT / "data/demo").glob("*.jsonl.zst"))])
    ap.add_argument("--window", type=int, default=2048, help="prefill window (memory does not grow with length)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default: CHECKPOINT/eval/niah_<mode>")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    out = args.out or Path(args.checkpoint) / "eval" / f"niah_{args.mode}"
    lengths = [int(x) for x in args.lengths.split(",")]
    summary = run(args.checkpoint, args.mode, lengths, args.depths, args.samples, out, args.haystack, args.window,
                  args.max_new_tokens, args.seed, args.device)
    print(f"NIAH {args.mode}: " + ", ".join(f"acc@{k} {100 * v:.1f}" for k, v in summary["acc_at"].items()) +
          f"; avg {100 * summary['avg']:.1f}; weighted {100 * summary['weighted']:.1f}")
    print(f"wrote {out / 'summary.json'} and {out / 'heatmap.png'}")
    return summary


if __name__ == "__main__":
    main()
