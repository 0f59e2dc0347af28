"""What a checkpoint holds: `python -m pretrain.inspect CKPT` (a run dir, its checkpoints/ folder or a step_* folder).

Prints the step, tokens seen, model and parallel layout, the training config's key settings, and whether every file
listed in the manifest is present with its recorded size. Exits 1 when the checkpoint is torn or incomplete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain import checkpoint as ckpt


def find_folder(path: Path) -> Path:
    if ckpt.TAG_RE.match(path.name):
        return path
    for root in (path / "checkpoints", path):
        tags = ckpt.list_tags(root)
        if tags:
            latest = root / "latest"
            tag = latest.read_text().strip() if latest.is_file() else tags[-1]
            return root / (tag if tag in tags else tags[-1])
    raise SystemExit(f"no step_* checkpoint under {path}")


def describe(folder: Path) -> tuple[list[str], bool]:
    manifest = ckpt.read_manifest(folder)
    problem = ckpt.check_checkpoint(folder)
    lines = [f"checkpoint  {folder}"]
    if manifest is None:
        return lines + [f"status      TORN: {problem}"], False
    cfg = manifest.get("config", {})
    model = cfg.get("model", {})
    train = cfg.get("train", {})
    layout = manifest.get("layout", {})
    size = sum(manifest["files"].values())
    lines += [
        f"step        {manifest['step']} (saved {manifest.get('created_utc', '?')}, git {str(manifest.get('git_sha', '?'))[:10]})",
        f"data        {manifest.get('consumed_samples', 0):,} samples = {manifest.get('tokens', 0):,} tokens consumed",
        f"model       preset {model.get('preset', '?')} "
        + " ".join(f"{k}={v}" for k, v in model.items() if k != "preset"),
        f"layout      world {manifest.get('world_size')} = DP {layout.get('dp')} x SP {layout.get('sp')} x TP "
        f"{layout.get('tp')}; ZeRO-{manifest.get('zero_stage')}",
        f"schedule    {train.get('steps')} steps, global batch {train.get('global_batch')} x seq "
        f"{cfg.get('data', {}).get('seq_len')}, lr {cfg.get('optim', {}).get('lr')}",
        f"files       {len(manifest['files'])} files, {size / 2**20:,.1f} MiB",
    ]
    state_file = folder / "trainer_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        lines.append(f"trainer     skipped (non-finite) steps {state.get('skipped_steps', 0)}; data "
                     f"{json.dumps(state.get('data', {}))}")
    lines.append("status      OK: every file present with its recorded size" if not problem else f"status      TORN: {problem}")
    return lines, not problem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--json", action="store_true", help="print the manifest as JSON instead")
    args = ap.parse_args(argv)
    folder = find_folder(args.checkpoint)
    if args.json:
        print(json.dumps(ckpt.read_manifest(folder), indent=2))
        return 0 if not ckpt.check_checkpoint(folder) else 1
    lines, ok = describe(folder)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
