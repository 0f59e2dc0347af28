"""Evaluate a trained model end to end and write report.md: lm-eval zero-shot results, needle-in-a-haystack,
the training loss curve.

    python -m eval.run --checkpoint runs/demo/train --tasks local --niah-lengths 256,512,1024
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eval import lm_eval as lme
from eval import niah


def find_run_dir(checkpoint: Path) -> Path | None:
    """The training out_dir of a checkpoint (for its metrics.jsonl), if it can be found."""
    for p in (checkpoint, *checkpoint.parents):
        if (p / "metrics.jsonl").is_file():
            return p
    return None


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: CHECKPOINT/eval")
    ap.add_argument("--tasks", default="paper", help="lm-eval tasks: paper | local | comma-separated names")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--niah-mode", default="qa", choices=["passkey", "qa", "multikey"])
    ap.add_argument("--niah-lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--niah-depths", type=int, default=11)
    ap.add_argument("--niah-samples", type=int, default=10)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    out = args.out or args.checkpoint / "eval"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("[eval] lm-evaluation-harness", flush=True)
    lm = lme.evaluate(str(args.checkpoint), lme.resolve_tasks(args.tasks), out, args.batch_size, args.limit,
                      device=args.device)
    print("[eval] needle in a haystack", flush=True)
    lengths = [int(x) for x in args.niah_lengths.split(",")]
    haystack = [str(p) for p in sorted((niah.ROOT / "data/demo").glob("*.jsonl.zst"))]
    nh = niah.run(str(args.checkpoint), args.niah_mode, lengths, args.niah_depths, args.niah_samples,
                  out / f"niah_{args.niah_mode}", haystack, device=args.device)
    run_dir = find_run_dir(args.checkpoint.resolve())
    loss_png = None
    if run_dir is not None:
        from pretrain.plot import plot_loss_curve

        loss_png = plot_loss_curve(run_dir / "metrics.jsonl", out / "loss_curve.png", run_dir.name)
    lines = [
        f"# Evaluation report: `{args.checkpoint}`",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {time.time() - t0:.0f} s.",
        "",
        "## Zero-shot (lm-evaluation-harness)",
        "",
        "Metric per task as the MetaLA paper reports it (acc_norm for HellaSwag, ARC-c, OBQA; perplexity and acc for "
        "LAMBADA; acc elsewhere). Every context is prefixed with EOS, as every training document was.",
        "",
        lme.markdown_table(lm["results"], lm["tasks"]),
        "",
        f"## Needle in a haystack ({args.niah_mode}, {args.niah_samples} samples per cell)",
        "",
        "| length | " + " | ".join(str(L) for L in lengths) + " |",
        "|---|" + "---|" * len(lengths),
        "| acc@L | " + " | ".join(f"{100 * nh['acc_at'][str(L)]:.1f}" for L in lengths) + " |",
        "| acc<=L | " + " | ".join(f"{100 * nh['acc_upto'][str(L)]:.1f}" for L in lengths) + " |",
        "",
        f"Avg {100 * nh['avg']:.1f}, weighted (alpha = 1.1) {100 * nh['weighted']:.1f}. Decoding state: "
        f"{nh['decode_cache_bytes']:,} bytes whatever the context length (prefill window {nh['prefill_window']}).",
        "",
        f"![NIAH heatmap](niah_{args.niah_mode}/heatmap.png)",
        "",
    ]
    if loss_png is not None:
        lines += ["## Training loss", "", "![loss curve](loss_curve.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({"lm_eval": lm["results"], "niah": nh}, indent=2, default=str))
    print(f"[eval] report: {report}")
    return report


if __name__ == "__main__":
    main()
