"""`data_prep.prepare`: shards round-trip to the input text, runs are deterministic, resumable and survive bad input."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import zstandard

from data_prep.documents import is_validation
from data_prep import prepare
from data_prep.prepare import STOP_AFTER_ENV
from data_prep.prepare import main as prepare_main
from data_prep.shards import ShardView
from data_prep.tokenizer import Tokenizer
from tests.corpus import demo_documents

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl_zst(path, records):
    lines = b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in records)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    return str(path)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = [{"text": t, "meta": {"pile_set_name": f"S{i % 3}", "license": "PD"}} for i, t in enumerate(demo_documents(1)[:500])]
    a = write_jsonl_zst(d / "00.jsonl.zst", docs[:250])
    b = write_jsonl_zst(d / "01.jsonl.zst", docs[250:])
    return [a, b], docs


def run_prepare(inputs, tok, out, *extra):
    return prepare_main(["--input", *inputs, "--tokenizer", tok, "--output", str(out), *extra])


def read_split(out, manifest, split):
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        view = ShardView(out / shard["file"])
        for i in range(view.num_docs):
            docs.append(view.tokens[view.offsets[i] : view.offsets[i + 1]].tolist())
    return docs


def test_shards_roundtrip_to_the_input(small_corpus, tokenizer_model, tmp_path):
    inputs, docs = small_corpus
    out = tmp_path / "out"
    m = run_prepare(inputs, tokenizer_model, out, "--workers", "2", "--val-fraction", "0.1",
                    "--shard-tokens", "40000", "--task-bytes", "30000")
    tok = Tokenizer(tokenizer_model)
    assert m["dtype"] == "uint16" and m["tokenizer"]["sha256"] == tok.sha256 and m["tokenizer"]["eos_id"] == 2
    assert len(m["splits"]["train"]["shards"]) > 2
    decoded = {"train": [], "val": []}
    for split in decoded:
        for ids in read_split(out, m, split):
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            decoded[split].append(tok.decode(ids[:-1]))
    texts = [d["text"] for d in docs]
    # order is preserved within each split, and the split is the deterministic text hash
    assert decoded["train"] == [t for t in texts if not is_validation(t, 0.1, 1234)]
    assert decoded["val"] == [t for t in texts if is_validation(t, 0.1, 1234)]
    assert 0 < len(decoded["val"]) < len(texts) * 0.2
    train = m["splits"]["train"]
    assert train["docs"] == len(decoded["train"])
    assert train["tokens"] == sum(s["tokens"] for s in train["shards"])
    assert sum(train["subsets"].values()) == train["docs"] and set(train["subsets"]) == {"S0", "S1", "S2"}
    assert m["licenses"] == {"PD": 500} and m["records"] == 500
    assert not list(out.glob("*.tmp")) and not (out / "progress.json").exists()


def test_deterministic_across_worker_counts_and_start_methods(small_corpus, tokenizer_model, tmp_path, monkeypatch):
    inputs, _ = small_corpus
    # blocks and token ids travel between the processes through a private spill folder: it must be gone afterwards
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))
    shas = []
    for workers, method in (("0", "fork"), ("1", "fork"), ("2", "fork"), ("2", "spawn")):
        m = run_prepare(inputs, tokenizer_model, tmp_path / f"{workers}-{method}", "--workers", workers,
                        "--start-method", method, "--val-fraction", "0.05", "--shard-tokens", "50000",
                        "--task-bytes", "20000")
        shas.append([s["sha256"] for split in ("train", "val") for s in m["splits"][split]["shards"]])
        assert list(spill_root.iterdir()) == []
    assert len(shas[0]) > 2 and all(s == shas[0] for s in shas)


def test_parquet_records_reach_the_workers_through_the_spill_folder(small_corpus, tokenizer_model, tmp_path,
                                                                       monkeypatch):
    """Decoded records (parquet, HF) go to the workers as pickles in the spill folder, like JSON blocks: what the
    parent sends a worker must stay small (data_prep.workers). Same shards as in-process and as the jsonl input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs, docs = small_corpus
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "all.parquet", row_group_size=50)
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))
    args = ("--shard-tokens", "50000", "--task-bytes", "20000")
    two = run_prepare([str(tmp_path / "all.parquet")], tokenizer_model, tmp_path / "two", "--workers", "2", *args)
    zero = run_prepare([str(tmp_path / "all.parquet")], tokenizer_model, tmp_path / "zero", "--workers", "0", *args)
    # the records parsed by the reader instead: the workers get documents, not pickled records
    reader = run_prepare([str(tmp_path / "all.parquet")], tokenizer_model, tmp_path / "reader", "--workers", "1",
                         "--parse-in", "reader", *args)
    jsonl = run_prepare(inputs, tokenizer_model, tmp_path / "jsonl", "--workers", "2", *args)
    assert list(spill_root.iterdir()) == [] and two["records"] == len(docs)
    assert reader["last_run"]["tasks_parsed_by"]["workers"] == 0 and reader["last_run"]["tasks_parsed_by"]["reader"] > 1
    assert read_split(tmp_path / "two", two, "train") == read_split(tmp_path / "zero", zero, "train")
    assert read_split(tmp_path / "reader", reader, "train") == read_split(tmp_path / "zero", zero, "train")
    assert read_split(tmp_path / "two", two, "train") == read_split(tmp_path / "jsonl", jsonl, "train")
    assert two["splits"]["train"]["subsets"] == jsonl["splits"]["train"]["subsets"]


def test_worker_init_takes_the_forked_tokenizer_or_loads_and_checks_the_file(tokenizer_model, tmp_path):
    tok = Tokenizer(tokenizer_model)
    # forked workers get the parent's object itself: no second load; and they leave Ctrl-C to the parent
    sigint = signal.getsignal(signal.SIGINT)
    try:
        prepare._init_worker(tok, tok.sha256, {"encoder": "whole"})
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert prepare._WORKER["tok"] is tok and prepare._WORKER["encoder"] == "whole"
    # spawned workers get the path: loaded afresh, and refused if the file is not the one the parent hashed
    prepare._init_worker(str(tok.path), tok.sha256, {})
    assert prepare._WORKER["tok"] is not tok and prepare._WORKER["tok"].sha256 == tok.sha256
    with pytest.raises(RuntimeError, match="changed while preparing"):
        prepare._init_worker(str(tok.path), "0" * 64, {})
    prepare._WORKER.clear()


def test_resume_after_interruption(small_corpus, tokenizer_model, tmp_path, monkeypatch):
    inputs, _ = small_corpus
    args = ("--workers", "1", "--val-fraction", "0.05", "--shard-tokens", "30000", "--task-bytes", "20000")
    full = run_prepare(inputs, tokenizer_model, tmp_path / "full", *args)
    out = tmp_path / "resumed"
    monkeypatch.setenv(STOP_AFTER_ENV, "2")
    with pytest.raises(SystemExit, match="stopped after 2 shards"):
        run_prepare(inputs, tokenizer_model, out, *args)
    progress = json.loads((out / "progress.json").read_text())
    assert len(progress["shards"]["train"]) == 2 and not (out / "manifest.json").exists()
    done = {p.name: os.stat(p).st_mtime_ns for p in out.glob("train-*.arrow")}
    # a shard half-written after the last progress record must not survive the restart
    (out / "train-00002.arrow").write_bytes(b"partial")
    monkeypatch.delenv(STOP_AFTER_ENV)
    resumed = run_prepare(inputs, tokenizer_model, out, *args)
    for name, mtime in done.items():
        assert os.stat(out / name).st_mtime_ns == mtime, f"{name} was rewritten"
    for split in ("train", "val"):
        assert [s["sha256"] for s in resumed["splits"][split]["shards"]] == [
            s["sha256"] for s in full["splits"][split]["shards"]
        ]
        assert resumed["splits"][split]["docs"] == full["splits"][split]["docs"]
    assert resumed["skipped"] == full["skipped"]
    # a finished output is left alone; different settings are refused
    again = run_prepare(inputs, tokenizer_model, out, *args)
    assert again["fingerprint"] == resumed["fingerprint"]
    with pytest.raises(SystemExit, match="different inputs or settings"):
        run_prepare(inputs, tokenizer_model, out, "--val-fraction", "0.2")
    redone = run_prepare(inputs, tokenizer_model, out, "--val-fraction", "0.2", "--overwrite")
    assert redone["settings"]["val_fraction"] == 0.2


def test_stopping_early_ends_the_workers_and_leaves_a_resumable_output(small_corpus, tokenizer_model, tmp_path,
                                                                         monkeypatch):
    inputs, _ = small_corpus
    args = ("--workers", "2", "--shard-tokens", "20000", "--task-bytes", "20000")
    done = run_prepare(inputs, tokenizer_model, tmp_path / "done", *args)
    assert mp.active_children() == []
    # stopped after a shard, and interrupted (Ctrl-C in the parent while tasks are in flight): the workers are gone
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(SystemExit, match="stopped after 1 shards"):
        run_prepare(inputs, tokenizer_model, tmp_path / "stopped", *args)
    assert mp.active_children() == []
    monkeypatch.delenv(STOP_AFTER_ENV)
    absorb, seen = prepare.Preparer._absorb, []

    def interrupted(self, res):
        seen.append(res["index"])
        if len(seen) == 3:
            raise KeyboardInterrupt
        absorb(self, res)

    monkeypatch.setattr(prepare.Preparer, "_absorb", interrupted)
    with pytest.raises(SystemExit, match="interrupted"):
        run_prepare(inputs, tokenizer_model, tmp_path / "interrupted", *args)
    assert mp.active_children() == []
    monkeypatch.setattr(prepare.Preparer, "_absorb", absorb)
    assert len(list((tmp_path / "stopped").glob("train-*.arrow"))) == 1
    for name in ("stopped", "interrupted"):
        resumed = run_prepare(inputs, tokenizer_model, tmp_path / name, *args)
        assert resumed["splits"] == done["splits"]


# a run whose second task kills a worker the way the out-of-memory killer would, in a process of its own (so that
# a regression hangs that process, which the test times out, not the test session). First argument, how: "self"
# (the task's own worker, mid-task), "torn-result" (the task's worker, halfway through writing an answer on its
# pipe) or "sibling" (the other worker, busy with its own tasks; the dying task then finishes). Second, when: "now",
# or "late-wait" (the parent first waits for an answer 1 s after the death, as a loaded box might)
_DYING_WORKER = """
import os, signal, struct, sys, time
from data_prep import prepare, workers
HOW, WHEN = sys.argv.pop(1), sys.argv.pop(1)
OUT = sys.argv[sys.argv.index("--output") + 1]
task_fn = prepare.tokenize_task
def dying(task):
    if task.index != 1:
        return task_fn(task)
    if HOW == "sibling":
        for pid in open(OUT + ".pids").read().split():
            if int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        return task_fn(task)
    if HOW == "torn-result":  # an answer's length header and the start of its bytes, no more
        frame = sys._getframe()
        while frame.f_code.co_name != "_serve":
            frame = frame.f_back
        frame.f_locals["conn"]._send(struct.pack("!i", 1 << 20) + bytes(100))
    os.kill(os.getpid(), signal.SIGKILL)
prepare.tokenize_task = dying
init = workers.Workers.__init__
def started(self, *args, **kwargs):
    init(self, *args, **kwargs)
    open(OUT + ".pids", "w").write(" ".join(map(str, self.pids)))
workers.Workers.__init__ = started
if WHEN == "late-wait":
    receive = workers.Workers._receive
    def late(self, early):
        time.sleep(1.0)
        receive(self, early)
    workers.Workers._receive = late
prepare.main(sys.argv[1:])
"""


@pytest.mark.parametrize("how,when", [("self", "now"), ("self", "late-wait"), ("torn-result", "now"),
                                      ("sibling", "now")])
def test_a_worker_killed_mid_run_stops_the_run_with_its_reason(how, when, small_corpus, tokenizer_model, tmp_path):
    """The old Pool-based run hung on a torn result and on queue locks a dead worker held, and once (CI, a loaded
    box) missed a worker that died before its first look."""
    inputs, _ = small_corpus
    out = tmp_path / "out"
    extra = ["--workers", "2", "--shard-tokens", "20000", "--task-bytes", "20000"]
    args = ["--input", *inputs, "--tokenizer", tokenizer_model, "--output", str(out), *extra]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _DYING_WORKER, how, when, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and time.monotonic() - t0 < 30, proc.stderr[-2000:]
    assert "a tokenizer worker (pid " in proc.stderr
    assert "was killed by signal 9 (SIGKILL: often the out-of-memory killer); the task it held is lost" in proc.stderr
    assert "rerun the same command to resume" in proc.stderr
    assert mp.active_children() == []
    if (how, when) == ("self", "now"):
        # what was written before stays resumable: the same command without the dying task finishes the run
        done = run_prepare(inputs, tokenizer_model, out, *extra)
        assert done["splits"]["train"]["docs"] + done["splits"]["val"]["docs"] == len(small_corpus[1])


def test_bad_input_is_skipped_counted_and_reported(tokenizer_model, tmp_path):
    big = "All the world's a stage, and all the men and women merely players. " * 150_000  # ~10 MB
    records = [
        {"text": "A good document.", "meta": {"pile_set_name": "A"}},
        b'{"text": "broken json\n',
        {"meta": {"pile_set_name": "A"}},
        b'{"text": "\xff\xfe invalid utf-8"}\n',
        {"text": "", "meta": {}},
        {"text": big, "meta": {"pile_set_name": "Big"}},
        {"text": "Another good one.", "meta": {"pile_set_name": "A"}},
    ]
    good = write_jsonl_zst(tmp_path / "good.jsonl.zst", records)
    # large enough (several 128 KiB zstd blocks) that the first half of the file decodes to whole records
    n_cut = 30_000
    blob = zstandard.ZstdCompressor().compress(
        b"".join(json.dumps({"text": f"doc {i} {i * 7919 % 104729}"}).encode() + b"\n" for i in range(n_cut))
    )
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(blob[: len(blob) // 2])
    unreadable = tmp_path / "folder.jsonl"
    unreadable.mkdir()
    m = run_prepare([good, str(cut), str(unreadable)], tokenizer_model, tmp_path / "out", "--workers", "1")
    assert m["skipped"]["invalid_json"] == 1 and m["skipped"]["missing_text"] == 1
    assert m["skipped"]["invalid_utf8"] == 1 and m["skipped"]["empty_text"] == 1
    assert {(e["file"], e["kind"]) for e in m["read_errors"]} == {
        (str(cut), "truncated_or_corrupt"),
        (str(unreadable), "unreadable"),
    }
    tok = Tokenizer(tokenizer_model)
    docs = [tok.decode(ids[:-1]) for ids in read_split(tmp_path / "out", m, "train")]
    assert docs[:3] == ["A good document.", big, "Another good one."]
    # the records of the truncated file before the cut are kept
    assert 0 < len(docs) - 3 < n_cut and docs[3] == "doc 0 0"
    examples = {(e["file"], e["reason"]) for e in m["skipped_examples"]}
    assert (good, "invalid_json") in examples
    logged = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert {"file": good, "line": 2, "reason": "invalid_json"} in logged


def test_where_records_are_parsed_changes_nothing_in_the_output(small_corpus, tokenizer_model, tmp_path,
                                                                 monkeypatch):
    """The reader parses a task while its workers are busy (`--parse-in auto`), and the worker then gets the
    documents instead of the JSON. Every shard byte, count, skip example and log line is the same wherever the records
    were parsed, bad records and the validation split included; the manifest says who parsed how many tasks."""
    _, docs = small_corpus
    bad = [b'{"text": "broken json\n', {"meta": {"pile_set_name": "S0"}}, b'{"text": "\xff\xfe not utf-8"}\n',
           {"text": "  ", "meta": {}},
           {"text": "Caf\u00e9 \u2014 \U0001f600 na\u00efve", "meta": {"pile_set_name": "S1"}}]
    records = [r for i, d in enumerate(docs[:300]) for r in ([d] + ([bad[i // 30 % 5]] if i % 30 == 7 else []))]
    inputs = [write_jsonl_zst(tmp_path / "mixed.jsonl.zst", records)]
    args = ("--val-fraction", "0.1", "--shard-tokens", "30000", "--task-bytes", "20000",
            "--exclude-subsets", "S2")
    monkeypatch.setattr(prepare, "usable_cores", lambda: 2)  # as on CI's 2-core box, wherever this runs
    runs = {}
    for name, extra in {"in-process": ("--workers", "0"), "workers": ("--workers", "2", "--parse-in", "workers"),
                        "reader": ("--workers", "2", "--parse-in", "reader"),
                        "auto": ("--workers", "1", "--parse-in", "auto"),
                        "auto, no spare core": ("--workers", "2", "--parse-in", "auto")}.items():
        out = tmp_path / name
        m = run_prepare(inputs, tokenizer_model, out, *args, *extra)
        runs[name] = (m, (out / "skipped.jsonl").read_text())
    m0, log0 = runs["in-process"]
    n_tasks = runs["workers"][0]["last_run"]["tasks_parsed_by"]["workers"]
    assert n_tasks > 5 and m0["skipped"]["filtered_subset"] > 0 and m0["splits"]["val"]["docs"] > 0
    assert all(m0["skipped"][r] > 0 for r in ("invalid_json", "missing_text", "invalid_utf8", "empty_text"))
    for name, (m, log) in runs.items():
        for key in ("splits", "skipped", "skipped_examples", "licenses", "records"):
            assert m[key] == m0[key], (name, key)
        assert log == log0, name
    assert runs["in-process"][0]["last_run"]["tasks_parsed_by"] == {"reader": 0, "workers": 0}
    assert runs["reader"][0]["last_run"]["tasks_parsed_by"] == {"reader": n_tasks, "workers": 0}
    # auto: the first task goes to a worker that waits for it; the next, taken while that worker is busy, the reader
    auto = runs["auto"][0]["last_run"]["tasks_parsed_by"]
    assert auto["workers"] >= 1 and auto["reader"] >= 1 and auto["reader"] + auto["workers"] == n_tasks
    # as many workers as cores: the reader has no core of its own to parse on
    assert runs["auto, no spare core"][0]["last_run"]["tasks_parsed_by"] == {"reader": 0, "workers": n_tasks}


def test_bad_arguments(tokenizer_model, tmp_path):
    with pytest.raises(SystemExit):
        run_prepare([str(tmp_path / "missing.jsonl")], tokenizer_model, tmp_path / "o")
    with pytest.raises(SystemExit):
        run_prepare([str(tmp_path)], tokenizer_model, tmp_path / "o", "--val-fraction", "1.5")


def test_span_encoder_writes_the_same_shards(small_corpus, bpe_tokenizer_model, tokenizer_model, tmp_path):
    inputs, _ = small_corpus
    shas, used = [], []
    for encoder in ("whole", "spans", "auto"):
        m = run_prepare(inputs, bpe_tokenizer_model, tmp_path / encoder, "--workers", "1", "--encoder", encoder,
                        "--shard-tokens", "50000", "--val-fraction", "0.05")
        shas.append([s["sha256"] for split in ("train", "val") for s in m["splits"][split]["shards"]])
        used.append(m["encoder"]["used"])
    assert used == ["whole", "spans", "spans"] and len(shas[0]) > 2 and shas[0] == shas[1] == shas[2]
    # a unigram model cannot be encoded by spans exactly: asking for it is a clear error before any work
    with pytest.raises(SystemExit, match="would not be exact: not a BPE model"):
        run_prepare(inputs, tokenizer_model, tmp_path / "uni", "--encoder", "spans")
    assert not (tmp_path / "uni" / "manifest.json").exists()


def test_shard_bytes_match_arrow_builders_without_importing_pandas(tmp_path):
    """A shard's columns are built from numpy buffers: the file is byte for byte what Arrow's own `pa.array` /
    `dictionary_encode` build (so shards written before and after stay interchangeable, and resumed runs agree), and
    writing one does not import pandas (`pa.array` does, 0.15 s at the end of every run)."""
    import subprocess
    import sys

    import numpy as np
    import pyarrow as pa

    from data_prep.shards import write_shard

    rng = np.random.default_rng(0)
    for n_docs, dtype in ((200, np.uint16), (3, np.uint32), (0, np.uint16)):
        lengths = rng.integers(1, 300, n_docs)
        tokens = rng.integers(0, 60000, int(lengths.sum())).astype(np.uint32)
        subsets = [str(rng.choice(["Pile-CC", "ArXiv", "Straße"])) for _ in range(n_docs)]
        ours = write_shard(tmp_path / f"ours{n_docs}.arrow", tokens, lengths, subsets, dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens.astype(dtype))),
                          "source": pa.array(subsets, type=pa.string()).dictionary_encode()})
        ref = tmp_path / f"ref{n_docs}.arrow"
        with pa.OSFile(str(ref), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_batch(table.to_batches(max_chunksize=n_docs or 1)[0] if n_docs else
                               pa.RecordBatch.from_pylist([], schema=table.schema))
        assert (tmp_path / f"ours{n_docs}.arrow").read_bytes() == ref.read_bytes(), n_docs
        assert ours["rows"] == n_docs and ours["tokens"] == tokens.size
    probe = ("import sys, numpy as np, pathlib, tempfile\nfrom data_prep.shards import write_shard\n"
             "write_shard(pathlib.Path(tempfile.mkdtemp()) / 's.arrow', np.arange(10), np.array([4, 6]), ['a', 'b'], "
             "np.uint16)\nprint('pandas' in sys.modules)")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"
