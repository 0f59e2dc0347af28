"""Data-stage benchmark: `data_prep.prepare` against raw SentencePiece and `datasets.map` + `save_to_disk`.

For a 32k BPE and a 32k unigram tokenizer trained on the bundled corpus, in one run on the same text:
  - raw encode: `sp.encode(texts)` on one thread (list output, the default) and with numpy output, on texts
    already in memory (no reading, parsing or writing);
  - our pipeline with 1 and 2 workers (read .jsonl.zst, parse, split, tokenize, write shards + manifest; the
    default `--encoder auto`: distinct spans encoded once for BPE, whole texts for unigram): tokens/s,
    tokens/s per worker, and tokens per CPU-second (all processes counted, the reader included);
  - the plain `datasets` baseline: load_dataset("json") + map(batched, num_proc) + save_to_disk;
  - the packed loader on one core (seq 2048, batch 16).
Correctness first: the pipeline's shards must hold exactly the raw encoder's tokens (+ EOS) for every document.

Steady state: ours with 1 worker also runs on a quarter of the copies in every round; (tokens difference) /
(seconds difference) is the rate without the fixed cost of a run (worker start, tokenizer load, final shard and
manifest: ~0.1 s here), reported beside the end-to-end rate, paired with raw encode the same way. The workers' task
function is also timed in this process on the same blocks (no worker process, no reader beside it), and ours with
1 worker runs on the same text as one plain .jsonl (no zstd decompression beside the worker).

Shared and small machines drift by 10-30 % within minutes, so raw encode and our pipeline are measured alternately
for `--rounds` rounds; the headline ratio is the median over rounds of ours / raw within the same round (raw = the
faster of the two raw variants in that round). Best against best is reported too.

Writes bench/results/<yyyymmdd>_cpu_data_prep.json and prints a table.

Example:
    python -m bench.data_prep --repeat 4
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
    P._WORKER.update(tok=tok, include=frozenset(), exclude=frozenset(), val_fraction=defaults["val_fraction"],
                     split_seed=defaults["split_seed"], dtype=np.uint16, encoder="auto", spill_dir="")
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


def datasets_baseline(model: str, plain: Path, out: Path, workers: int) -> dict:
    import datasets
    import sentencepiece as spm

    datasets.disable_progress_bars()
    shutil.rmtree(out, ignore_errors=True)
    cache = out.parent / "hf-cache"
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(plain), split="train", cache_dir=str(cache))

    def tok(batch, _sp={}):
        if "sp" not in _sp:
            _sp["sp"] = spm.SentencePieceProcessor(model_file=model)
        sp = _sp["sp"]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=4, help="copies of the 7.9 MB demo corpus to tokenize")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--skip-datasets", action="store_true", help="leave out the datasets.map baseline")
    ap.add_argument("--rounds", type=int, default=3, help="alternating raw/ours measurement rounds")
    args = ap.parse_args()
    texts = load_texts()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        inputs, plain = build_inputs(tmp, texts, args.repeat)
        for model_type in ("bpe", "unigram"):
            model = train_tokenizer(tmp, model_type)
            runs: dict = {"list": [], "numpy": [], 1: [], 2: [], "datasets": [], "marginal": [], "in_process": [],
                          "plain_jsonl": []}
            for _ in range(args.rounds):
                for variant in RAW_VARIANTS:
                    runs[variant].append(raw_encode(model, texts, args.repeat, variant))
                for w in (1, 2):
                    runs[w].append(pipeline(model, inputs, tmp / f"ours-{w}", w))
                # the same pipeline on a quarter of the copies: the difference is the steady-state rate, free of
                # the fixed cost of a run (worker start, tokenizer load, the last shard and manifest), which a
                # run over the Pile pays once in hours but a few-second benchmark pays in full
                part = pipeline(model, inputs[: max(1, args.repeat // 4)], tmp / "ours-part", 1)
                runs["in_process"].append(in_process(model, inputs))
                # the same text as one plain .jsonl: no zstd decompression in the reader beside the worker
                runs["plain_jsonl"].append(pipeline(model, [str(plain)], tmp / "ours-plain", 1))
                full = runs[1][-1]
                runs["marginal"].append({
                    "tokens_per_s": (full["tokens"] - part["tokens"]) / (full["seconds"] - part["seconds"]),
                    "fixed_seconds": part["seconds"] - part["tokens"] * (full["seconds"] - part["seconds"])
                    / (full["tokens"] - part["tokens"])})
                if not args.skip_datasets:
                    # every round, like ours: one run of each on a shared 2-core machine is too noisy to compare
                    runs["datasets"].append(datasets_baseline(model, plain, tmp / "hf", 2))
            raw = {variant: best_and_median(runs[variant]) for variant in RAW_VARIANTS}
            pipes = [best_and_median(runs[w]) for w in (1, 2)]
            raw_best = max(raw.values(), key=lambda r: r["tokens_per_s"])
            paired = sorted(runs[1][i]["tokens_per_s"] / max(runs[v][i]["tokens_per_s"] for v in RAW_VARIANTS)
                            for i in range(args.rounds))
            marginal = sorted(runs["marginal"][i]["tokens_per_s"] / max(runs[v][i]["tokens_per_s"] for v in RAW_VARIANTS)
                              for i in range(args.rounds))
            inproc = sorted(runs["in_process"][i]["tokens_per_s"] / max(runs[v][i]["tokens_per_s"] for v in RAW_VARIANTS)
                            for i in range(args.rounds))
            plain_ratio = sorted(runs["plain_jsonl"][i]["tokens_per_s"]
                                 / max(runs[v][i]["tokens_per_s"] for v in RAW_VARIANTS) for i in range(args.rounds))
            correct = check_pipeline(model, texts, tmp / "ours-1", pipes[0]["manifest"], args.repeat)
            base = best_and_median(runs["datasets"]) if runs["datasets"] else None
            vs_datasets = sorted(runs[2][i]["tokens_per_s"] / runs["datasets"][i]["tokens_per_s"]
                                 for i in range(len(runs["datasets"])))
            loader = loader_speed(tmp / "ours-1")
            for p in pipes:
                p.pop("manifest")
            row = {"tokenizer": f"{model_type}-32k", "correct": correct, "raw_encode": raw, "ours": pipes,
                   "datasets_map_save_to_disk": base, "loader": loader,
                   "ratio_ours1_vs_raw_paired_median": paired[len(paired) // 2], "ratio_ours1_vs_raw_paired": paired,
                   "ours1_steady_state": runs["marginal"],
                   "ratio_ours1_steady_state_vs_raw_paired_median": marginal[len(marginal) // 2],
                   "ratio_ours1_steady_state_vs_raw_paired": marginal,
                   "worker_task_in_process": best_and_median(runs["in_process"]),
                   "ours1_plain_jsonl": {k: v for k, v in best_and_median(runs["plain_jsonl"]).items() if k != "manifest"},
                   "ratio_ours1_plain_jsonl_vs_raw_paired_median": plain_ratio[len(plain_ratio) // 2],
                   "ratio_ours1_plain_jsonl_vs_raw_paired": plain_ratio,
                   "ratio_worker_task_in_process_vs_raw_paired_median": inproc[len(inproc) // 2],
                   "ratio_worker_task_in_process_vs_raw_paired": inproc,
                   "ratio_ours1_vs_raw_best": pipes[0]["tokens_per_s"] / raw_best["tokens_per_s"],
                   "ratio_ours1_vs_raw_best_median": pipes[0]["median_tokens_per_s"] / raw_best["median_tokens_per_s"],
                   "ratio_ours1_vs_raw_list": pipes[0]["tokens_per_s"] / raw["list"]["tokens_per_s"],
                   "ratio_ours1_vs_raw_numpy": pipes[0]["tokens_per_s"] / raw["numpy"]["tokens_per_s"],
                   "ratio_ours1_per_cpu_s_vs_raw_numpy": pipes[0]["tokens_per_cpu_second"] / raw["numpy"]["tokens_per_s"],
                   "scaling_2_workers": pipes[1]["tokens_per_s"] / pipes[0]["tokens_per_s"],
                   "ratio_ours2_vs_datasets2": None if base is None else pipes[1]["tokens_per_s"] / base["tokens_per_s"],
                   "ratio_ours2_vs_datasets2_paired": vs_datasets,
                   "ratio_ours2_vs_datasets2_paired_median": vs_datasets[len(vs_datasets) // 2] if vs_datasets else None}
            rows.append(row)
    result = {"bench": "data_prep", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "corpus": {"documents": len(texts) * args.repeat, "repeat": args.repeat}, "rounds": args.rounds,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d')}_cpu_data_prep.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\n{'tokenizer':<12} {'ok':<5} {'raw list':>10} {'raw numpy':>10} {'ours w=1':>10} {'ours w=2':>10} "
          f"{'tok/cpu-s':>10} {'datasets':>10} {'loader':>10} {'ours/raw':>9}  (M tokens/s: best of {args.rounds}; ratio: median of rounds)")
    for r in rows:
        base = r["datasets_map_save_to_disk"]
        print(f"{r['tokenizer']:<12} {str(r['correct']):<5} {r['raw_encode']['list']['tokens_per_s'] / 1e6:>10.2f} "
              f"{r['raw_encode']['numpy']['tokens_per_s'] / 1e6:>10.2f} {r['ours'][0]['tokens_per_s'] / 1e6:>10.2f} "
              f"{r['ours'][1]['tokens_per_s'] / 1e6:>10.2f} {r['ours'][0]['tokens_per_cpu_second'] / 1e6:>10.2f} "
              f"{(base['tokens_per_s'] / 1e6 if base else float('nan')):>10.2f} {r['loader']['tokens_per_s'] / 1e6:>10.1f} {r['ratio_ours1_vs_raw_paired_median']:>9.3f}")
    for r in rows:
        fixed = sorted(m["fixed_seconds"] for m in r["ours1_steady_state"])
        print(f"{r['tokenizer']}: ours (1 worker) steady state / raw: paired median "
              f"{r['ratio_ours1_steady_state_vs_raw_paired_median']:.3f} (fixed cost of a run {fixed[len(fixed) // 2]:.2f} s); "
              f"the worker's task function in this process / raw: {r['ratio_worker_task_in_process_vs_raw_paired_median']:.3f}; "
              f"ours (1 worker) on plain .jsonl / raw: {r['ratio_ours1_plain_jsonl_vs_raw_paired_median']:.3f}")
    for r in rows:
        if r["ratio_ours2_vs_datasets2"] is not None:
            print(f"{r['tokenizer']}: ours (2 workers) / datasets.map (num_proc 2): best {r['ratio_ours2_vs_datasets2']:.2f}x,"
                  f" paired median {r['ratio_ours2_vs_datasets2_paired_median']:.2f}x")
    print(f"wrote {path}")
    if not all(r["correct"] for r in rows):
        raise SystemExit("correctness check failed: the shards do not hold the raw encoder's tokens")


if __name__ == "__main__":
    main()
