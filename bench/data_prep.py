"""Data-stage benchmark: `data_prep.prepare` against raw SentencePiece and `datasets.map` + `save_to_disk`.

For a 32k BPE and a 32k unigram tokenizer trained on the bundled corpus, in one run on the same text:
  - raw encode: `sp.encode(texts)` on one thread (list output, the default) and with numpy output, on texts
    already in memory (no reading, parsing or writing);
  - our pipeline with 1 worker and with each of `--workers` (read .jsonl.zst, parse, split, tokenize, write shards
    + manifest; the default `--encoder auto`: distinct spans encoded once for BPE, whole texts for unigram; the
    default `--parse-in auto`: the reader parses JSON where it has a core beside the workers, i.e. with 1 worker here):
    tokens/s, scaling over 1 worker, and tokens per CPU-second (all processes counted, the reader included);
  - the plain `datasets` baseline: load_dataset("json") + map(batched, num_proc) + save_to_disk, against ours with
    as many workers;
  - the packed loader on one core (seq 2048, batch 16);
  - raw encode beside a busy core (a spinning process) against alone: how much the machine's cores slow each other.
Correctness first: the pipeline's shards must hold exactly the raw encoder's tokens (+ EOS) for every document.

Steady state: ours with 1 worker also runs on a quarter of the copies in every round; (tokens difference) /
(seconds difference) is the rate without the fixed cost of a run (worker start, tokenizer load, final shard and
manifest: ~0.1 s here), reported beside the end-to-end rate, paired with raw encode the same way. The workers' task
function is also timed in this process on the same blocks (no worker process, no reader beside it), and ours with
1 worker runs on the same text as one plain .jsonl (no zstd decompression beside the worker).

Shared and small machines drift by 10-30 % within minutes (the same encode call on this 2-core box ran at 2.7M and
at 4.8M tokens/s within one minute), so every round brackets ours with 1 worker between two raw encodes, the one
right before (the faster of the two variants) and one right after (numpy output); the headline ratio is the median
over rounds of ours / the mean of its two brackets. Ours with `--datasets-procs` workers is bracketed the same way
by a datasets run right before and one right after it. Best against best is reported too.

Writes bench/results/<yyyymmdd>_cpu_data_prep[_tag].json and prints a table.

Example:
    python -m bench.data_prep --repeat 8
    python -m bench.data_prep --repeat 8 --workers 1,2,4,8 --datasets-procs 8 --tag h200_host   # a bigger host
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[1]
DEMO = [ROOT / "data/demo/00.jsonl.zst", ROOT / "data/demo/01.jsonl.zst"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def load_texts() -> list[str]:
    texts = []
    for path in DEMO:
        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
        texts += [json.loads(line)["text"] for line in raw.decode().splitlines()]
    return texts


def build_inputs(tmp: Path, texts: list[str], repeat: int) -> tuple[list[str], Path]:
    """`repeat` copies of the corpus as jsonl.zst files (our input) and one plain .jsonl (the datasets input)."""
    lines = "".join(json.dumps({"text": t, "meta": {"pile_set_name": "demo"}}) + "\n" for t in texts).encode()
    zst = []
    for i in range(repeat):
        p = tmp / f"in-{i:02d}.jsonl.zst"
        p.write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
        zst.append(str(p))
    plain = tmp / "all.jsonl"
    plain.write_bytes(lines * repeat)
    return zst, plain


def train_tokenizer(tmp: Path, model_type: str) -> str:
    from data_prep.train_tokenizer import main

    out = tmp / f"tok-{model_type}"
    main(["--input", *map(str, DEMO), "--vocab-size", "32000", "--model-type", model_type, "--output", str(out),
          "--num-threads", str(os.cpu_count() or 1)])
    return str(out / "tokenizer.model")


RAW_VARIANTS = {"list": {}, "numpy": {"return_type": "numpy"}}


def raw_encode(model: str, texts: list[str], repeat: int, variant: str) -> dict:
    """One timed pass of plain `sp.encode` over `repeat` copies of the texts."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeat):
        n += sum(len(x) for x in sp.encode(texts, num_threads=1, **RAW_VARIANTS[variant]))
    return {"tokens": n, "tokens_per_s": n / (time.perf_counter() - t0)}


def raw_beside_busy_core(model: str, texts: list[str], repeat: int, pairs: int = 3) -> dict:
    """Raw encode alone and with a process spinning beside it (`while True: pass`, nothing shared with the
    encoder), alternating: how much a busy second core slows this one. On a machine whose cores are independent
    the ratio is ~1; below 1, every process beside a worker (the reader, the writer, a second worker) costs the
    worker that much while it runs."""
    import subprocess
    import sys

    alone, busy = [], []
    for _ in range(pairs):
        alone.append(raw_encode(model, texts, repeat, "list")["tokens_per_s"])
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.2)
            busy.append(raw_encode(model, texts, repeat, "list")["tokens_per_s"])
        finally:
            spinner.kill()
            spinner.wait()
    return {"alone_tokens_per_s": alone, "beside_busy_core_tokens_per_s": busy,
            "ratio_median": median([b / a for a, b in zip(alone, busy)])}


def in_process(model: str, inputs: list[str]) -> dict:
    """The workers' per-task function (parse, split hash, encode, uint16 packing) called in this process over the
    same blocks the pipeline cuts, reading and decompression done beforehand and not timed: what a worker costs
    apart from being a worker process."""
    from data_prep import prepare as P
    from data_prep.readers import ReadErrors, jsonl_blocks
    from data_prep.tokenizer import Tokenizer

    defaults = {f.name: f.default for f in dataclasses.fields(P.PrepareConfig)}
    blocks = [b for path in inputs for _, b in jsonl_blocks(path, ReadErrors(), True, defaults["task_bytes"])]
    tok = Tokenizer(model)
    rules = P.DocRules(val_fraction=defaults["val_fraction"], split_seed=defaults["split_seed"])
    P._WORKER.update(tok=tok, rules=rules, dtype=np.uint16, encoder="auto", spill_dir="")
    t0 = time.perf_counter()
    n = sum(int(P.tokenize_task(P.Task(i, 0, block=b))["train"][0].size) for i, b in enumerate(blocks))
    return {"tokens": n, "tokens_per_s": n / (time.perf_counter() - t0)}


def best_and_median(runs: list[dict]) -> dict:
    rates = sorted(r["tokens_per_s"] for r in runs)
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {**best, "median_tokens_per_s": rates[len(rates) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def pipeline(model: str, inputs: list[str], out: Path, workers: int) -> dict:
    from data_prep.prepare import main

    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    m = main(["--input", *inputs, "--tokenizer", model, "--output", str(out), "--workers", str(workers),
              "--shard-tokens", "2000000"])
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    tokens = m["splits"]["train"]["tokens"]
    return {"workers": workers, "encoder": m["encoder"]["used"], "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall,
            "tokens_per_s_per_worker": tokens / wall / workers, "cpu_seconds": cpu,
            "tokens_per_cpu_second": tokens / cpu, "manifest": m}


def check_pipeline(model: str, texts: list[str], out: Path, manifest: dict, repeat: int) -> bool:
    """Every document's tokens in the shards equal the raw encoder's, followed by EOS."""
    import sentencepiece as spm

    from data_prep.shards import ShardView

    sp = spm.SentencePieceProcessor(model_file=model)
    ref = sp.encode(texts)
    docs = []
    for s in manifest["splits"]["train"]["shards"]:
        v = ShardView(out / s["file"])
        docs += [v.tokens[v.offsets[i] : v.offsets[i + 1]] for i in range(v.num_docs)]
    if len(docs) != len(ref) * repeat:
        return False
    return all(np.array_equal(d[:-1], ref[i % len(ref)]) and d[-1] == sp.eos_id() for i, d in enumerate(docs))


_DATASETS_SP: dict = {}


def datasets_baseline(model: str, plain: Path, out: Path, workers: int) -> dict:
    import datasets
    import sentencepiece as spm

    datasets.disable_progress_bars()
    shutil.rmtree(out, ignore_errors=True)
    cache = out.parent / "hf-cache"
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(plain), split="train", cache_dir=str(cache))

    def tok(batch):
        # one processor per datasets worker process, loaded on its first batch
        if model not in _DATASETS_SP:
            _DATASETS_SP[model] = spm.SentencePieceProcessor(model_file=model)
        sp = _DATASETS_SP[model]
        return {"input_ids": [ids + [sp.eos_id()] for ids in sp.encode(batch["text"])]}

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint16"))})
    ds = ds.map(tok, batched=True, num_proc=workers if workers > 1 else None, remove_columns=ds.column_names,
                features=features)
    ds.save_to_disk(str(out), num_proc=workers if workers > 1 else None)
    wall = time.perf_counter() - t0
    tokens = int(sum(len(x) for x in ds["input_ids"]))
    shutil.rmtree(cache, ignore_errors=True)
    return {"workers": workers, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def loader_speed(data_dir: Path) -> dict:
    import torch

    from pretrain.data import PackedDataset, PackedLoader

    torch.set_num_threads(1)
    ds = PackedDataset(data_dir, "train", 2048, verify="size")
    ld = PackedLoader(ds, global_batch=16, micro_batch=16)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        for mb in ld.next_step():
            n += mb["input_ids"].numel()
    return {"seq_len": 2048, "batch": 16, "tokens_per_s": n / (time.perf_counter() - t0)}


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def measure_tokenizer(model_type: str, model: str, texts: list[str], inputs: list[str], plain: Path, tmp: Path,
                      args: argparse.Namespace) -> dict:
    """All rounds for one tokenizer; returns its result row."""
    workers = sorted(set(args.workers) | {1})
    runs: dict = {"raw_before": [], "raw_after": [], "datasets": [], "datasets_after": [], "marginal": [],
                  "in_process": [], "plain_jsonl": [], **{v: [] for v in RAW_VARIANTS}, **{w: [] for w in workers}}
    for _ in range(args.rounds):
        # raw encode right before and right after ours with one worker: the box's speed drifts by 10-30 % over
        # minutes, and the mean of the two brackets is what raw would have done while ours ran
        before = [raw_encode(model, texts, args.repeat, v) for v in RAW_VARIANTS]
        for v, r in zip(RAW_VARIANTS, before):
            runs[v].append(r)
        runs["raw_before"].append(max(r["tokens_per_s"] for r in before))
        runs[1].append(pipeline(model, inputs, tmp / "ours-1", 1))
        after = raw_encode(model, texts, args.repeat, "numpy")
        runs["numpy"].append(after)
        runs["raw_after"].append(after["tokens_per_s"])
        for w in workers[1:]:
            if w == args.datasets_procs and not args.skip_datasets:
                # datasets right before and right after ours with as many processes: the mean of the two is
                # what datasets would have done while ours ran, as raw encode brackets ours with one worker
                runs["datasets"].append(datasets_baseline(model, plain, tmp / "hf", args.datasets_procs))
                runs[w].append(pipeline(model, inputs, tmp / f"ours-{w}", w))
                runs["datasets_after"].append(datasets_baseline(model, plain, tmp / "hf", args.datasets_procs))
            else:
                runs[w].append(pipeline(model, inputs, tmp / f"ours-{w}", w))
        # the same pipeline on a quarter of the copies: the difference is the steady-state rate, free of the fixed
        # cost of a run (worker start, tokenizer load, the last shard and manifest), which a run over the Pile pays
        # once in hours but a few-second benchmark pays in full
        part = pipeline(model, inputs[: max(1, args.repeat // 4)], tmp / "ours-part", 1)
        runs["in_process"].append(in_process(model, inputs))
        # the same text as one plain .jsonl: no zstd decompression in the reader beside the worker
        runs["plain_jsonl"].append(pipeline(model, [str(plain)], tmp / "ours-plain", 1))
        full = runs[1][-1]
        runs["marginal"].append({
            "tokens_per_s": (full["tokens"] - part["tokens"]) / (full["seconds"] - part["seconds"]),
            "fixed_seconds": part["seconds"] - part["tokens"] * (full["seconds"] - part["seconds"])
            / (full["tokens"] - part["tokens"])})
        if not args.skip_datasets and args.datasets_procs not in workers[1:]:
            # every round, like ours: one run of each on a shared small machine is too noisy to compare
            runs["datasets"].append(datasets_baseline(model, plain, tmp / "hf", args.datasets_procs))
    bracket = [(b + a) / 2 for b, a in zip(runs["raw_before"], runs["raw_after"])]

    def vs_raw(key: str) -> list[float]:
        return sorted(runs[key][i]["tokens_per_s"] / bracket[i] for i in range(args.rounds))

    raw = {variant: best_and_median(runs[variant]) for variant in RAW_VARIANTS}
    pipes = {w: best_and_median(runs[w]) for w in workers}
    raw_best = max(raw.values(), key=lambda r: r["tokens_per_s"])
    correct = check_pipeline(model, texts, tmp / "ours-1", pipes[1]["manifest"], args.repeat)
    base = best_and_median(runs["datasets"] + runs["datasets_after"]) if runs["datasets"] else None
    ours_vs_datasets = args.datasets_procs if args.datasets_procs in pipes else None
    # with 1 datasets process ours with 1 worker is paired with the datasets run of its round; else each ours run
    # against the mean of the datasets runs right before and after it
    datasets_bracket = [(b["tokens_per_s"] + a["tokens_per_s"]) / 2
                        for b, a in zip(runs["datasets"], runs["datasets_after"] or runs["datasets"])]
    vs_datasets = [] if ours_vs_datasets is None else sorted(
        runs[ours_vs_datasets][i]["tokens_per_s"] / datasets_bracket[i] for i in range(len(datasets_bracket)))
    loader = loader_speed(tmp / "ours-1")
    contention = raw_beside_busy_core(model, texts, args.repeat)
    for p in pipes.values():
        p.pop("manifest")
    paired, marginal, inproc, plain_ratio = vs_raw(1), vs_raw("marginal"), vs_raw("in_process"), vs_raw("plain_jsonl")
    return {
        "tokenizer": f"{model_type}-32k", "correct": correct, "raw_encode": raw,
        "raw_bracket_tokens_per_s": bracket, "ours": [pipes[w] for w in workers],
        "scaling_vs_1_worker": {str(w): pipes[w]["tokens_per_s"] / pipes[1]["tokens_per_s"] for w in workers},
        "datasets_map_save_to_disk": base, "datasets_procs": args.datasets_procs,
        "datasets_bracket_tokens_per_s": datasets_bracket, "loader": loader,
        "raw_encode_beside_a_busy_core": contention,
        "ratio_ours1_vs_raw_paired_median": median(paired), "ratio_ours1_vs_raw_paired": paired,
        "ours1_steady_state": runs["marginal"],
        "ratio_ours1_steady_state_vs_raw_paired_median": median(marginal),
        "ratio_ours1_steady_state_vs_raw_paired": marginal,
        "worker_task_in_process": best_and_median(runs["in_process"]),
        "ours1_plain_jsonl": {k: v for k, v in best_and_median(runs["plain_jsonl"]).items() if k != "manifest"},
        "ratio_ours1_plain_jsonl_vs_raw_paired_median": median(plain_ratio),
        "ratio_ours1_plain_jsonl_vs_raw_paired": plain_ratio,
        "ratio_worker_task_in_process_vs_raw_paired_median": median(inproc),
        "ratio_worker_task_in_process_vs_raw_paired": inproc,
        "ratio_ours1_vs_raw_best": pipes[1]["tokens_per_s"] / raw_best["tokens_per_s"],
        "ratio_ours1_vs_raw_best_median": pipes[1]["median_tokens_per_s"] / raw_best["median_tokens_per_s"],
        "ratio_ours1_per_cpu_s_vs_raw_numpy": pipes[1]["tokens_per_cpu_second"] / raw["numpy"]["tokens_per_s"],
        "ratio_ours_vs_datasets": None if base is None or ours_vs_datasets is None
        else pipes[ours_vs_datasets]["tokens_per_s"] / base["tokens_per_s"],
        "ratio_ours_vs_datasets_paired": vs_datasets,
        "ratio_ours_vs_datasets_paired_median": median(vs_datasets) if vs_datasets else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=4, help="copies of the 7.9 MB demo corpus to tokenize")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--skip-datasets", action="store_true", help="leave out the datasets.map baseline")
    ap.add_argument("--rounds", type=int, default=5, help="measurement rounds (each brackets ours with raw encode)")
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="worker counts of our pipeline (1 is always run: the ratios against raw use it)")
    ap.add_argument("--datasets-procs", type=int, default=2,
                    help="num_proc of the datasets baseline; compared with ours at the same worker count")
    ap.add_argument("--tokenizers", default="bpe,unigram")
    args = ap.parse_args()
    texts = load_texts()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        inputs, plain = build_inputs(tmp, texts, args.repeat)
        for model_type in args.tokenizers.split(","):
            model = train_tokenizer(tmp, model_type)
            rows.append(measure_tokenizer(model_type, model, texts, inputs, plain, tmp, args))
    result = {"bench": "data_prep", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
              "corpus": {"documents": len(texts) * args.repeat, "repeat": args.repeat}, "rounds": args.rounds,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    path = args.out / f"{time.strftime('%Y%m%d')}_cpu_data_prep{tag}.json"
    path.write_text(json.dumps(result, indent=2))
    workers = [o["workers"] for o in rows[0]["ours"]] if rows else []
    print(f"\n{'tokenizer':<12} {'ok':<5} {'raw list':>9} {'raw numpy':>9} "
          + " ".join(f"{f'ours w={w}':>9}" for w in workers)
          + f" {'tok/cpu-s':>9} {'datasets':>9} {'loader':>8} {'ours/raw':>8}"
          f"  (M tokens/s: best of {args.rounds}; ratio: median of rounds, raw bracketing ours)")
    for r in rows:
        base = r["datasets_map_save_to_disk"]
        print(f"{r['tokenizer']:<12} {r['correct']!s:<5} {r['raw_encode']['list']['tokens_per_s'] / 1e6:>9.2f} "
              f"{r['raw_encode']['numpy']['tokens_per_s'] / 1e6:>9.2f} "
              + " ".join(f"{o['tokens_per_s'] / 1e6:>9.2f}" for o in r["ours"])
              + f" {r['ours'][0]['tokens_per_cpu_second'] / 1e6:>9.2f} "
              f"{(base['tokens_per_s'] / 1e6 if base else float('nan')):>9.2f} {r['loader']['tokens_per_s'] / 1e6:>8.1f} "
              f"{r['ratio_ours1_vs_raw_paired_median']:>8.3f}")
    for r in rows:
        fixed = median([m["fixed_seconds"] for m in r["ours1_steady_state"]])
        print(f"{r['tokenizer']}: ours (1 worker) / raw, paired: {', '.join(f'{x:.3f}' for x in r['ratio_ours1_vs_raw_paired'])}; "
              f"steady state / raw: median {r['ratio_ours1_steady_state_vs_raw_paired_median']:.3f} (fixed cost of a "
              f"run {fixed:.2f} s); the worker's task function in this process / raw: "
              f"{r['ratio_worker_task_in_process_vs_raw_paired_median']:.3f}; ours (1 worker) on plain .jsonl / raw: "
              f"{r['ratio_ours1_plain_jsonl_vs_raw_paired_median']:.3f}; scaling "
              + ", ".join(f"w={w}: {x:.2f}x" for w, x in r["scaling_vs_1_worker"].items()))
    for r in rows:
        c = r["raw_encode_beside_a_busy_core"]
        print(f"{r['tokenizer']}: raw encode beside a busy core / alone: median {c['ratio_median']:.2f} "
              f"({', '.join(f'{b / 1e6:.2f}M / {a / 1e6:.2f}M' for a, b in zip(c['alone_tokens_per_s'], c['beside_busy_core_tokens_per_s']))})")
    for r in rows:
        if r["ratio_ours_vs_datasets"] is not None:
            print(f"{r['tokenizer']}: ours ({r['datasets_procs']} workers) / datasets.map (num_proc "
                  f"{r['datasets_procs']}): best {r['ratio_ours_vs_datasets']:.2f}x, paired median "
                  f"{r['ratio_ours_vs_datasets_paired_median']:.2f}x")
    print(f"wrote {path}")
    if not all(r["correct"] for r in rows):
        raise SystemExit("correctness check failed: the shards do not hold the raw encoder's tokens")


if __name__ == "__main__":
    main()
