"""Tokenize a corpus into Arrow IPC shards with a manifest.

Input: `.jsonl`, `.jsonl.zst` (the Pile's own format), `.parquet` files or HF dataset ids, and a SentencePiece
`.model` (trained by `data_prep.train_tokenizer` or any existing one).
Output, in OUT:
  - `train-NNNNN.arrow`, `val-NNNNN.arrow`: Arrow IPC files, one row per document: `input_ids` (the document's
    tokens followed by EOS; uint16 when the vocabulary fits, else uint32) and `source` (the Pile subset name).
  - `manifest.json`: shards with rows, tokens and sha256, document and token counts, tokenizer checksum, sources,
    licences, skipped records by reason (with examples as file:line), unreadable or truncated inputs.
  - `skipped.jsonl`: file, line and reason of skipped records (capped).

The reader streams records in a fixed order and cuts them into tasks of about `--task-bytes`; worker processes
parse and tokenize tasks (ordered, with back-pressure so the reader cannot run ahead); where the reader has a core
beside the workers it parses a task itself while no worker waits for work (`--parse-in`, `data_prep.documents`); the
main process writes a shard (temp file, fsync, rename) whenever a task ends with at least `--shard-tokens` train
tokens buffered. The validation split is a deterministic hash of each document's text. After every shard,
`progress.json` records the task to restart from, so rerunning the same command after an interruption finishes the
missing shards without redoing the done ones.

Example:
    python -m data_prep.prepare --input data/demo/*.jsonl.zst --tokenizer runs/tok/tokenizer.model \\
        --output runs/data --workers 2 --val-fraction 0.01
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.documents import DocRules, TaskDocs, classify
from data_prep.readers import (
    SKIP_REASONS,
    RawRecord,
    ReadErrors,
    block_lines,
    input_kind,
    iter_hf,
    iter_parquet,
    jsonl_blocks,
)
from data_prep.tokenizer import ENCODERS, Tokenizer
from data_prep.workers import WorkerDied, Workers

# bump when the shard layout or the task cutting changes: an old progress.json then no longer matches
SHARD_SCHEMA_VERSION = 1

SKIP_LOG_CAP = 100_000
# test hook: stop (as if killed) after this many train shards were committed
STOP_AFTER_ENV = "METALA_PREPARE_STOP_AFTER_SHARDS"
DEFAULT_START_METHOD = "fork" if sys.platform == "linux" else "spawn"
# where a task's records are parsed (`PrepareConfig.parse_in`)
PARSE_IN = ("auto", "reader", "workers")


@dataclass(kw_only=True, slots=True)
class PrepareConfig:
    inputs: list[str]
    tokenizer: str
    output: str
    workers: int = 1
    shard_tokens: int = 100_000_000
    val_fraction: float = 0.0
    split_seed: int = 1234
    task_bytes: int = 4 << 20
    include_subsets: list[str] = field(default_factory=list)
    exclude_subsets: list[str] = field(default_factory=list)
    overwrite: bool = False
    # how worker processes start: "fork" (Linux default) reuses the loaded interpreter (~10 ms per worker instead
    # of ~0.2 s of imports with "spawn"); the workers start before this run starts any thread of its own
    start_method: str = DEFAULT_START_METHOD
    # "spans": each distinct span of a task encoded once (exact for BPE models like ours, 2-3x faster); "whole":
    # every text through sentencepiece as it is; "auto": spans where they are exact (Tokenizer.resolve_encoder)
    encoder: str = "auto"
    # "auto": where there are more cores than workers, the reader parses a task while every worker has one to work
    # on (its core is otherwise idle), the worker when one is waiting (the reader must not hold it up); "reader" /
    # "workers": always there. Same output.
    parse_in: str = "auto"

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one input file or dataset id")
        for spec in self.inputs:
            kind = input_kind(spec)
            if kind != "hf" and not Path(spec).exists():
                raise ValueError(f"inputs: {spec} does not exist")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = in-process), got {self.workers}")
        if self.shard_tokens < 1 or self.task_bytes < 1:
            raise ValueError("shard_tokens and task_bytes must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.parse_in not in PARSE_IN:
            raise ValueError(f"parse_in must be one of {PARSE_IN}, got {self.parse_in!r}")
        if self.start_method not in mp.get_all_start_methods():
            raise ValueError(f"start_method must be one of {mp.get_all_start_methods()}, got {self.start_method!r}")


@dataclass
class Task:
    index: int
    source: int
    # either a block of whole JSON lines starting at line `first_line` (shipped as one bytes object, so the reader
    # does no per-record work) or decoded records (parquet, HF datasets)
    first_line: int = 0
    block: bytes = b""
    records: list[RawRecord] = field(default_factory=list)
    # bytes of input read when the task was cut (for the progress bar)
    bytes_read: int = 0
    # the block (.jsonl), the pickled records (.pickle) or the documents parsed by the reader (.docs) moved to this
    # file (see `_spill_payloads`)
    spill: str = ""

    def documents(self, rules: DocRules) -> TaskDocs:
        """The task's documents: as the reader parsed them, else parsed here."""
        if self.spill.endswith(".docs"):
            docs = TaskDocs.unpack(_take_file(self.spill))
            self.spill = ""
            return docs
        return classify(self.raw_records(), rules)

    def raw_records(self) -> Iterator[RawRecord]:
        if self.spill:
            data = _take_file(self.spill)
            if self.spill.endswith(".pickle"):
                self.records = pickle.loads(data)
            else:
                self.block = data
            self.spill = ""
        if self.block:
            for line_no, line in block_lines(self.first_line, self.block):
                yield RawRecord(self.source, line_no, line)
        yield from self.records


@dataclass
class SplitBuffer:
    tokens: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    subsets: list[str] = field(default_factory=list)
    n_tokens: int = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, subsets: list[str]) -> None:
        if len(lengths):
            self.tokens.append(tokens)
            self.lengths.append(lengths)
            self.subsets.extend(subsets)
            self.n_tokens += int(tokens.size)

    def take(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        tokens = np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.uint32)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        subsets = self.subsets
        self.tokens, self.lengths, self.subsets, self.n_tokens = [], [], [], 0
        return tokens, lengths, subsets


_WORKER: dict = {}


# Big buffers (a task's 4 MB block, a result's token ids) travel between the processes through files in a private
# temp folder rather than through the workers' pipes: a pipe moves them 64 KB at a time, each chunk a wake-up of the
# other side, which cost ~25-50 ms per task here (10-15 % of the worker's time); one write and one read of a file
# that lives in the page cache cost ~5 ms. Small things (lengths, subset names, counters) still go by pickle.
def _give_file(folder: str, name: str, data: bytes | np.ndarray) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as fh:
        fh.write(data if isinstance(data, bytes) else data.data)
    return path


def _take_file(path: str, dtype: type | None = None) -> bytes | np.ndarray:
    with open(path, "rb") as fh:
        data = fh.read() if dtype is None else np.fromfile(fh, dtype=dtype)
    os.unlink(path)
    return data


def _spill_payloads(tasks: Iterator[Task], folder: str, reader_parses: Callable[[], bool], rules: DocRules,
                    parsed_in: Counter) -> Iterator[Task]:
    """Tasks with their block or records moved to files: what the parent sends a worker stays small (see
    `data_prep.workers`: the parent must never block on a full pipe). Where `reader_parses()` says so, the records
    are parsed here and the worker gets the documents; `parsed_in` counts the tasks parsed by "reader" / "workers"."""
    for task in tasks:
        if reader_parses():
            parsed_in["reader"] += 1
            task.spill = _give_file(folder, f"task-{task.index}.docs", classify(task.raw_records(), rules).pack())
            task.block, task.records = b"", []
        else:
            parsed_in["workers"] += 1
            if task.block:
                task.spill = _give_file(folder, f"task-{task.index}.jsonl", task.block)
                task.block = b""
            elif task.records:
                task.spill = _give_file(folder, f"task-{task.index}.pickle", pickle.dumps(task.records, protocol=5))
                task.records = []
        yield task


def _init_worker(model: str | Tokenizer, sha256: str, cfg: dict) -> None:
    """`model`: the parent's loaded Tokenizer when the worker is forked (it inherits the object: no second load of
    the model, ~50 ms of every run's start here), else the model file, loaded and checked against the parent's.
    Ctrl-C is the parent's to handle: it stops the run and ends the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tok = model if isinstance(model, Tokenizer) else Tokenizer(model)
    if tok.sha256 != sha256:
        raise RuntimeError(f"{model} changed while preparing (sha256 {tok.sha256} != {sha256})")
    _WORKER.update(tok=tok, **cfg)


def tokenize_task(task: Task) -> dict:
    """Worker: parse (unless the reader did), split and tokenize one task. Returns plain arrays and counters (cheap
    to pickle)."""
    tok: Tokenizer = _WORKER["tok"]
    docs = task.documents(_WORKER["rules"])
    out = {"index": task.index, "bytes_read": task.bytes_read, "skips": docs.skips, "examples": docs.examples,
           "licenses": docs.licenses, "n_records": docs.n_records}
    for split in ("train", "val"):
        tokens, lengths = tok.encode_documents(docs.texts[split], _WORKER["dtype"], _WORKER["encoder"])
        if _WORKER["spill_dir"] and tokens.size:
            tokens = _give_file(_WORKER["spill_dir"], f"result-{task.index}-{split}.bin", tokens)
        out[split] = (tokens, lengths, docs.subsets[split])
    return out


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a SLURM or container limit), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_tasks(inputs: list[str], task_bytes: int, start: int, errors: ReadErrors) -> Iterator[Task]:
    """Cut every input into tasks of about `task_bytes`; tasks before `start` (already in shards) are not emitted.

    Task boundaries depend only on the inputs and `task_bytes`, so a resumed run cuts the same tasks.
    """
    index = 0
    for source, spec in enumerate(inputs):
        kind = input_kind(spec)
        if kind in ("jsonl", "jsonl.zst"):
            for first_line, block in jsonl_blocks(spec, errors, kind == "jsonl.zst", task_bytes):
                if index >= start:
                    yield Task(index, source, first_line=first_line, block=block, bytes_read=errors.bytes_read)
                index += 1
            continue
        records = iter_hf(spec, source, errors) if kind == "hf" else iter_parquet(spec, source, errors)
        batch, size = [], 0
        for rec in records:
            batch.append(rec)
            size += len(str(rec.payload.get("text", "")))
            if size >= task_bytes:
                if index >= start:
                    yield Task(index, source, records=batch, bytes_read=errors.bytes_read)
                index, batch, size = index + 1, [], 0
        if batch:
            if index >= start:
                yield Task(index, source, records=batch, bytes_read=errors.bytes_read)
            index += 1


def _fingerprint(cfg: PrepareConfig, tok: Tokenizer) -> str:
    sources = []
    for spec in cfg.inputs:
        p = Path(spec)
        sources.append([spec, p.stat().st_size if p.exists() else None])
    key = {
        "schema": SHARD_SCHEMA_VERSION,
        "sources": sources,
        "tokenizer": tok.sha256,
        "shard_tokens": cfg.shard_tokens,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "task_bytes": cfg.task_bytes,
        "include": sorted(cfg.include_subsets),
        "exclude": sorted(cfg.exclude_subsets),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Preparer:
    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg
        self.tok = Tokenizer(cfg.tokenizer)
        self.out = Path(cfg.output)
        self.dtype = np.uint16 if self.tok.vocab_size <= 1 << 16 else np.uint32
        # an impossible request ("spans" on a model where they are not exact) fails here, before any work
        self.encoder = self.tok.resolve_encoder(cfg.encoder)
        self.fingerprint = _fingerprint(cfg, self.tok)
        self.state = {
            "fingerprint": self.fingerprint,
            "next_task": 0,
            "shards": {"train": [], "val": []},
            "docs": {"train": 0, "val": 0},
            "tokens": {"train": 0, "val": 0},
            "subsets": {"train": {}, "val": {}},
            "skipped": {r: 0 for r in SKIP_REASONS},
            "skipped_examples": [],
            "licenses": {},
            "records": 0,
        }
        self.buffers = {"train": SplitBuffer(), "val": SplitBuffer()}
        self.pending = {"docs": {"train": 0, "val": 0}, "subsets": {"train": Counter(), "val": Counter()},
                        "skipped": Counter(), "examples": [], "licenses": Counter(), "records": 0}

    def _prepare_output(self) -> dict | None:
        """Decide between finished / resume / fresh; returns the finished manifest if there is nothing to do."""
        self.out.mkdir(parents=True, exist_ok=True)
        manifest, progress = self.out / "manifest.json", self.out / "progress.json"
        if self.cfg.overwrite:
            for f in list(self.out.glob("*.arrow")) + [manifest, progress, self.out / "skipped.jsonl"]:
                f.unlink(missing_ok=True)
        if manifest.exists():
            m = json.loads(manifest.read_text())
            if m.get("fingerprint") == self.fingerprint:
                return m
            raise SystemExit(
                f"{self.out} already holds a finished dataset made with different inputs or settings; "
                "choose another --output or pass --overwrite"
            )
        if progress.exists():
            saved = json.loads(progress.read_text())
            if saved.get("fingerprint") != self.fingerprint:
                raise SystemExit(
                    f"{self.out} holds an interrupted run with different inputs or settings; "
                    "rerun with the original arguments to resume, or pass --overwrite"
                )
            self.state = saved
            # shards written after the last progress record are incomplete work: they will be redone
            keep = {s["file"] for split in ("train", "val") for s in saved["shards"][split]}
            for f in self.out.glob("*.arrow"):
                if f.name not in keep:
                    f.unlink()
            print(f"resuming: {len(saved['shards']['train'])} train shards done, restarting at task "
                  f"{saved['next_task']}", file=sys.stderr)
        for f in self.out.glob("*.tmp"):
            f.unlink()
        return None

    def _absorb(self, res: dict) -> None:
        p = self.pending
        for split in ("train", "val"):
            tokens, lengths, subsets = res[split]
            if isinstance(tokens, str):
                tokens = _take_file(tokens, self.dtype)
            self.buffers[split].add(tokens, lengths, subsets)
            p["docs"][split] += len(lengths)
            p["subsets"][split].update(subsets)
        p["skipped"].update(res["skips"])
        p["licenses"].update(res["licenses"])
        p["records"] += res["n_records"]
        for ex in res["examples"]:
            if len(self.state["skipped_examples"]) + len(p["examples"]) < 50:
                p["examples"].append({**ex, "file": self.cfg.inputs[ex["source"]]})
        self._log_skips(res)

    def _log_skips(self, res: dict) -> None:
        if not res["examples"] or self._skip_log_lines >= SKIP_LOG_CAP:
            return
        with open(self.out / "skipped.jsonl", "a") as fh:
            for ex in res["examples"]:
                fh.write(json.dumps({"file": self.cfg.inputs[ex["source"]], "line": ex["line"], "reason": ex["reason"]}) + "\n")
                self._skip_log_lines += 1

    def _commit(self, next_task: int, final: bool) -> None:
        """Write the buffered shards and record progress; only whole tasks are ever committed."""
        st, p = self.state, self.pending
        for split in ("train", "val"):
            buf = self.buffers[split]
            if buf.n_tokens == 0:
                continue
            tokens, lengths, subsets = buf.take()
            # pyarrow is imported here only: tokenizer workers never need it (and are forked before its threads exist)
            from data_prep.shards import write_shard

            name = f"{split}-{len(st['shards'][split]):05d}.arrow"
            st["shards"][split].append(write_shard(self.out / name, tokens, lengths, subsets, self.dtype))
            st["tokens"][split] += int(tokens.size)
        for split in ("train", "val"):
            st["docs"][split] += p["docs"][split]
            for k, v in p["subsets"][split].items():
                st["subsets"][split][k] = st["subsets"][split].get(k, 0) + v
        for k, v in p["skipped"].items():
            st["skipped"][k] = st["skipped"].get(k, 0) + v
        for k, v in p["licenses"].items():
            st["licenses"][k] = st["licenses"].get(k, 0) + v
        st["skipped_examples"].extend(p["examples"])
        st["records"] += p["records"]
        st["next_task"] = next_task
        self.pending = {"docs": {"train": 0, "val": 0}, "subsets": {"train": Counter(), "val": Counter()},
                        "skipped": Counter(), "examples": [], "licenses": Counter(), "records": 0}
        if not final:
            _atomic_json(self.out / "progress.json", st)

    def run(self) -> dict:
        done = self._prepare_output()
        if done is not None:
            print(f"{self.out}: already complete ({done['splits']['train']['tokens']:,} train tokens); nothing to do")
            return done
        self._skip_log_lines = 0
        cfg = self.cfg
        errors = ReadErrors()
        total_bytes = sum(Path(s).stat().st_size for s in cfg.inputs if input_kind(s) != "hf") or None
        # the spill folder (only with worker processes) is private to this run and removed at the end
        spill_dir = tempfile.mkdtemp(prefix="metala-prepare-") if cfg.workers > 0 else None
        rules = DocRules(include=frozenset(cfg.include_subsets), exclude=frozenset(cfg.exclude_subsets),
                         val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
        worker_cfg = {"rules": rules, "dtype": self.dtype, "encoder": self.encoder, "spill_dir": spill_dir}
        # tasks parsed by the reader and by the workers (the manifest's last_run says how the run shared the work)
        parsed_in: Counter = Counter()
        stop_after = int(os.environ.get(STOP_AFTER_ENV, "0"))
        tasks = make_tasks(cfg.inputs, cfg.task_bytes, self.state["next_task"], errors)
        t0 = time.time()
        new_tokens = 0
        from tqdm import tqdm

        workers = None
        bar = None
        try:
            if cfg.workers == 0:
                _init_worker(str(self.tok.path), self.tok.sha256, worker_cfg)
                results: Iterator[dict] = map(tokenize_task, tasks)
            else:
                # before the progress bar: tqdm's monitor thread must not exist when the workers are forked
                ctx = mp.get_context(cfg.start_method)
                # forked workers inherit the loaded tokenizer; other start methods pickle initargs: the path
                model = self.tok if cfg.start_method == "fork" else str(self.tok.path)
                # two tasks a worker at most between being cut and being written: the reader cannot run ahead
                workers = Workers(cfg.workers, tokenize_task, _init_worker, (model, self.tok.sha256, worker_cfg),
                                  context=ctx, per_worker=2, name="tokenizer worker")
                results = workers.imap(_spill_payloads(tasks, spill_dir, self._reader_parses(workers), rules,
                                                       parsed_in))
            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr, smoothing=0.1)
            for res in results:
                self._absorb(res)
                new_tokens += sum(int(res[s][1].sum()) for s in ("train", "val"))
                bar.update(res["bytes_read"] - bar.n)
                elapsed = max(time.time() - t0, 1e-9)
                bar.set_postfix(docs_s=f"{(self.state['docs']['train'] + self.pending['docs']['train']) / elapsed:,.0f}",
                                tok_s=f"{new_tokens / elapsed:,.0f}", refresh=False)
                if self.buffers["train"].n_tokens >= cfg.shard_tokens:
                    self._commit(res["index"] + 1, final=False)
                    if stop_after and len(self.state["shards"]["train"]) >= stop_after:
                        raise SystemExit(f"stopped after {stop_after} shards ({STOP_AFTER_ENV})")
            self._commit(self.state["next_task"], final=True)
            if workers is not None:
                workers.close()
        except KeyboardInterrupt:
            raise SystemExit("interrupted: rerun the same command to resume from the last written shard")
        except WorkerDied as e:
            raise SystemExit(f"{e}: rerun the same command to resume from the last written shard") from e
        finally:
            if bar is not None:
                bar.close()
            if workers is not None:
                # a run that stops early discards the tasks in flight: killing the workers loses nothing
                workers.close(kill=True)
            if spill_dir is not None:
                shutil.rmtree(spill_dir, ignore_errors=True)
        elapsed = time.time() - t0
        manifest = self._manifest(errors, elapsed, new_tokens, parsed_in)
        _atomic_json(self.out / "manifest.json", manifest)
        (self.out / "progress.json").unlink(missing_ok=True)
        self._report(manifest)
        return manifest

    def _reader_parses(self, workers: Workers) -> Callable[[], bool]:
        """Asked as each task is cut: whether the reader parses it. Under "auto" only where the reader has a core of
        its own (with as many workers as cores, parsing there only adds the documents' packing to the same CPU
        time: 2 % slower at 2 workers on 2 cores), and only while no worker waits for work: a reader that parses
        slower than the workers encode (many workers) then leaves the parsing to them, task by task, instead of
        holding them up."""
        if self.cfg.parse_in == "auto":
            if usable_cores() <= self.cfg.workers:
                return lambda: False
            return lambda: not workers.has_idle_worker()
        return (lambda: True) if self.cfg.parse_in == "reader" else (lambda: False)

    def _manifest(self, errors: ReadErrors, elapsed: float, new_tokens: int, parsed_in: Counter) -> dict:
        st, cfg = self.state, self.cfg
        sources = []
        for spec in cfg.inputs:
            p = Path(spec)
            sources.append({"input": spec, "kind": input_kind(spec), "bytes": p.stat().st_size if p.exists() else None})
        splits = {
            split: {"docs": st["docs"][split], "tokens": st["tokens"][split], "shards": st["shards"][split],
                    "subsets": st["subsets"][split]}
            for split in ("train", "val")
        }
        return {
            "format": "metala-arrow-shards",
            "schema_version": SHARD_SCHEMA_VERSION,
            "fingerprint": self.fingerprint,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tokenizer": {"file": str(self.tok.path.resolve()), "sha256": self.tok.sha256,
                          "vocab_size": self.tok.vocab_size, "eos_id": self.tok.eos_id, "bos_id": self.tok.bos_id},
            "dtype": np.dtype(self.dtype).name,
            "eos_appended": True,
            # how the ids were computed (the same ids either way; "spans" is exact by the tokenizer's own checks)
            "encoder": {"used": self.encoder, "span_rule": self.tok.span_rule[0], "why_not_spans": self.tok.span_problem},
            "splits": splits,
            "sources": sources,
            "licenses": st["licenses"],
            "records": st["records"],
            "skipped": st["skipped"],
            "skipped_examples": st["skipped_examples"],
            "read_errors": errors.errors,
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("inputs", "tokenizer", "output", "overwrite")},
            "last_run": {"seconds": round(elapsed, 3), "tokens": new_tokens,
                         "tokens_per_s": round(new_tokens / max(elapsed, 1e-9)),
                         # tasks whose records the reader parsed, and those its workers parsed (none: in-process)
                         "tasks_parsed_by": {"reader": parsed_in["reader"], "workers": parsed_in["workers"]}},
        }

    def _report(self, m: dict) -> None:
        tr, va = m["splits"]["train"], m["splits"]["val"]
        print(f"wrote {len(tr['shards'])} train shards ({tr['docs']:,} docs, {tr['tokens']:,} tokens) and "
              f"{len(va['shards'])} val shards ({va['docs']:,} docs, {va['tokens']:,} tokens) to {self.out}")
        skipped = {k: v for k, v in m["skipped"].items() if v}
        if skipped:
            print(f"skipped records: {skipped} (examples in {self.out / 'skipped.jsonl'})")
        for err in m["read_errors"]:
            print(f"WARNING {err['file']}: {err['kind']}: {err['detail']}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="input files (.jsonl, .jsonl.zst, .parquet) or HF ids")
    ap.add_argument("--tokenizer", required=True, help="SentencePiece .model file (or a folder holding tokenizer.model)")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="tokenizer processes (0 = in-process); default: cores - 1")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="train tokens per shard (about)")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for validation")
    ap.add_argument("--split-seed", type=int, default=1234, help="key of the validation hash")
    ap.add_argument("--task-bytes", type=int, default=4 << 20, help="input bytes per worker task")
    ap.add_argument("--include-subsets", nargs="*", default=[], help="keep only these pile_set_name values")
    ap.add_argument("--exclude-subsets", nargs="*", default=[], help="drop these pile_set_name values")
    ap.add_argument("--overwrite", action="store_true", help="discard whatever OUT holds")
    ap.add_argument("--encoder", choices=ENCODERS, default="auto",
                    help="spans: encode each distinct span once (exact for BPE, faster); whole: whole texts; "
                         "auto: spans where exact")
    ap.add_argument("--parse-in", choices=PARSE_IN, default="auto",
                    help="where JSON records are parsed: auto (the reader, if it has a core beside the workers and "
                         "every worker is busy; else the workers), reader, workers; the same output either way")
    ap.add_argument("--start-method", choices=mp.get_all_start_methods(), default=DEFAULT_START_METHOD,
                    help="how worker processes start (default: fork on Linux, else spawn)")
    a = ap.parse_args(argv)
    try:
        return PrepareConfig(inputs=a.input, tokenizer=a.tokenizer, output=a.output, workers=a.workers,
                             shard_tokens=a.shard_tokens, val_fraction=a.val_fraction, split_seed=a.split_seed,
                             task_bytes=a.task_bytes, include_subsets=a.include_subsets,
                             exclude_subsets=a.exclude_subsets, overwrite=a.overwrite, start_method=a.start_method,
                             encoder=a.encoder, parse_in=a.parse_in)
    except ValueError as e:
        ap.error(str(e))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    try:
        prep = Preparer(cfg)
    except ValueError as e:
        raise SystemExit(f"prepare: {e}")
    return prep.run()


if __name__ == "__main__":
    main()
