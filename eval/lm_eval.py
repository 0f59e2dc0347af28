"""Zero-shot evaluation with lm-evaluation-harness.

    python -m eval.lm_eval --checkpoint runs/demo/train --tasks local
    python -m eval.lm_eval --checkpoint exported/metala-360m --tasks paper --batch-size 16

--tasks: "paper" (the MetaLA paper's zero-shot suite: commonsense, LAMBADA, ARC-e, SuperGLUE; needs the Hugging
Face hub), "local" (offline tasks over JSONL files shipped in eval/tasks/data), or a comma-separated list of task
names. Writes OUT/lm_eval_results.json (lm-eval's output) and OUT/lm_eval_results.md (the paper's column order,
with the metric the paper reports for each task: acc_norm for HellaSwag, ARC-c and OBQA, acc elsewhere, perplexity
and acc for LAMBADA).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from eval.tasks import (
    LOCAL_TASKS,
    PAPER_COMMONSENSE,
    PAPER_EXTRA,
    PAPER_METRIC,
    PAPER_SUPERGLUE,
    write_local_tasks,
)


def resolve_tasks(spec: str) -> list[str]:
    if spec == "paper":
        return PAPER_COMMONSENSE + PAPER_EXTRA + PAPER_SUPERGLUE
    if spec == "local":
        return list(LOCAL_TASKS)
    return [t.strip() for t in spec.split(",") if t.strip()]


def metric_of(task: str, metrics: dict) -> tuple[str, float | None]:
    want = PAPER_METRIC.get(task, "acc")
    for key in (f"{want},none", f"{want},remove_whitespace", f"{want},strict-match"):
        if key in metrics:
            return want, metrics[key]
    return want, None


def markdown_table(results: dict, tasks: list[str]) -> str:
    """One row, the paper's columns in its order; lambada also gets its accuracy."""
    cols, vals = [], []
    for task in tasks:
        m = results.get(task)
        if m is None:
            continue
        name, value = metric_of(task, m)
        cols.append(f"{task} ({name})")
        vals.append(value)
        if task == "lambada_openai" and "acc,none" in m:
            cols.append("lambada_openai (acc)")
            vals.append(m["acc,none"])
    scored = [v for c, v in zip(cols, vals) if v is not None and "perplexity" not in c]
    fmt = lambda c, v: "-" if v is None else (f"{v:.2f}" if "perplexity" in c else f"{100 * v:.2f}")
    head = "| " + " | ".join(cols + ["avg (acc-type)"]) + " |"
    sep = "|" + "---|" * (len(cols) + 1)
    row = "| " + " | ".join(fmt(c, v) for c, v in zip(cols, vals)) + \
        f" | {100 * sum(scored) / len(scored):.2f} |" if scored else ""
    return "\n".join([head, sep, row])


def evaluate(checkpoint: str, tasks: list[str], out_dir: Path, batch_size: int = 8, limit: int | None = None,
             max_length: int = 4096, device: str | None = None, include_path: str | None = None) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_adapter import MetaLALM

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(write_local_tasks(Path(tmp) / "local"))]
        if include_path:
            paths.append(include_path)
        manager = TaskManager(include_path=paths, include_defaults=True)
        model = MetaLALM(checkpoint=checkpoint, batch_size=batch_size, max_length=max_length, device=device)
        res = simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0,
                              log_samples=False, num_fewshot=0)
    results = res["results"]
    clean = {t: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
             for t, m in results.items()}
    payload = {"checkpoint": checkpoint, "tasks": tasks, "limit": limit, "max_length": max_length,
               "prefix": "EOS before every context", "results": clean, "versions": res.get("versions"),
               "n-samples": res.get("n-samples")}
    (out_dir / "lm_eval_results.json").write_text(json.dumps(payload, indent=2, default=str))
    table = markdown_table(clean, tasks)
    (out_dir / "lm_eval_results.md").write_text(
        f"# lm-eval zero-shot: {checkpoint}\n\nmetric per task as the MetaLA paper reports it; "
        f"limit={limit}, max_length={max_length}, prefix token EOS\n\n{table}\n")
    return payload


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run dir, step_* folder or exported folder")
    ap.add_argument("--tasks", default="paper", help="paper | local | comma-separated task names")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: CHECKPOINT/eval)")
    ap.add_argument("--batch-size", type=int, default=8, help="fixed batch size (never 'auto')")
    ap.add_argument("--limit", type=int, default=None, help="examples per task (for quick checks)")
    ap.add_argument("--max-length", type=int, default=4096, help="rolling-perplexity window (state carries over)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--include-path", default=None, help="an extra folder of task YAMLs")
    args = ap.parse_args(argv)
    out = args.out or Path(args.checkpoint) / "eval"
    payload = evaluate(args.checkpoint, resolve_tasks(args.tasks), out, args.batch_size, args.limit,
                       args.max_length, args.device, args.include_path)
    print((out / "lm_eval_results.md").read_text())
    print(f"wrote {out / 'lm_eval_results.json'}")
    return payload


if __name__ == "__main__":
    main()
