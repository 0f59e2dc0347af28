"""Multi-query associative recall (MQAR, the Zoology protocol) for the MetaLA layer, with a softmax-attention
reference on the same data.

    python -m eval.mqar --setting paper --jobs 8     # GPU: seq 512 / 80 pairs at d = 64, 128; seq 256 / 16 pairs
    python -m eval.mqar --setting cpu-smoke          # about a minute on a CPU

Data (our implementation of Zoology's `multiquery_ar`, with its figure-2 options): a sequence starts with N
key-value pairs (distinct keys from the lower half of the vocabulary, distinct values from the upper half), then the
keys are asked again at positions drawn with a power-law gap distribution (power_a = 0.01), token 0 elsewhere
(`--random-fill` puts random tokens there instead); only the positions after a queried key are scored (their target
is the key's value). Model: 2 blocks of (MetaLA token mixer, SwiGLU channel mixer), H = 2, d_k = d_v = d, conv
kernel 2 (the paper's MQAR setting, metala.md section 10); `--model-overrides` changes any MetaLAConfig field for
ablations. Training follows Zoology's trainer: AdamW (torch defaults), cosine decay to 0 over the epochs, no
warm-up, held-out accuracy after every epoch, early stop above 99 %; the best epoch of the best learning rate of the
paper's sweep is reported per width. `--jobs N` runs N trials at once on one device (these models are far too small
to fill a GPU). Outputs JSON and a plot of accuracy against width, saved after every finished width.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metala import MetaLAConfig, MetaLAForCausalLM

IGNORE = -100
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class MQARData:
    vocab: int
    seq_len: int
    pairs: int
    n_train: int
    n_test: int
    power_a: float = 0.01
    seed: int = 0
    random_fill: bool = False


def make_mqar(vocab: int, seq_len: int, pairs: int, n: int, power_a: float, rng: np.random.Generator,
              random_fill: bool = False):
    """inputs, labels [n, seq_len] int64; labels are -100 except after each queried key.

    Non-query positions hold token 0, as in Zoology's figure-2 config (`random_non_queries=False`) that the paper
    follows; `random_fill=True` draws them at random instead (Zoology's generator default, a harder task: every
    filler token then writes into a recurrent state)."""
    ctx = 2 * pairs
    if ctx * 2 > seq_len:
        raise ValueError(f"{pairs} pairs need a sequence of at least {4 * pairs} tokens, got {seq_len}")
    half = vocab // 2
    if pairs >= half:
        raise ValueError(f"{pairs} distinct keys need a vocabulary above {2 * pairs + 1}, got {vocab}")
    keys = np.stack([rng.choice(np.arange(1, half), pairs, replace=False) for _ in range(n)])
    values = np.stack([rng.choice(np.arange(half, vocab), pairs, replace=False) for _ in range(n)])
    kv = np.empty((n, ctx), dtype=np.int64)
    kv[:, 0::2], kv[:, 1::2] = keys, values
    space = (seq_len + 1 - ctx) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p /= p.sum()
    gaps = np.stack([rng.choice(space, pairs, replace=False, p=p) for _ in range(n)])
    order = np.stack([rng.permutation(pairs) for _ in range(n)])
    rest = np.zeros((n, seq_len + 1 - ctx), dtype=np.int64)
    tgt = np.full((n, seq_len + 1 - ctx), IGNORE, dtype=np.int64)
    rows = np.arange(n)[:, None]
    rest[rows, 2 * gaps] = np.take_along_axis(keys, order, 1)
    tgt[rows, 2 * gaps + 1] = np.take_along_axis(values, order, 1)
    full = np.concatenate([kv, rest], 1)
    labels_full = np.concatenate([np.full((n, ctx), IGNORE), tgt], 1)
    inputs, labels = full[:, :-1].copy(), labels_full[:, 1:].copy()
    if random_fill:
        filler = (inputs == 0) & (np.arange(seq_len)[None, :] >= ctx)
        inputs[filler] = rng.integers(1, vocab, size=int(filler.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def query_only_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """A `loss_fn` that projects only the scored positions onto the vocabulary (80 of 512 here)."""
    keep = labels != IGNORE
    logits = F.linear(hidden[keep], weight.to(hidden.dtype)).float()
    return F.cross_entropy(logits, labels[keep], reduction="sum"), keep.sum()


def metala_model(vocab: int, d: int, backend: str, overrides: dict | None = None) -> MetaLAForCausalLM:
    fields = dict(vocab_size=vocab, d_model=d, n_layers=2, n_heads=2, qk_dim=d, conv_size=2, ffn_multiple_of=16,
                  tie_embeddings=False, attn_backend=backend, name=f"mqar-metala-d{d}")
    model = MetaLAForCausalLM(MetaLAConfig(**{**fields, **(overrides or {})}), seed=0)
    model.loss_fn = query_only_loss
    return model


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of x [B, heads, T, dh]."""
    T, dh = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype), torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class AttentionLM(nn.Module):
    """The softmax reference: 2 pre-norm blocks of causal multi-head attention (SDPA) + MLP, rotary positions
    ("learned": Zoology's absolute embeddings).

    By default a depthwise causal conv (kernel 2, MetaLA's MQAR conv) runs ahead of q/k/v. Without it, attention on
    this data (token 0 between the queries) stalls at "some value from the context" (accuracy 1 / pairs): it never
    forms the previous-token head an induction circuit needs, in any protocol we tried (rotary or learned positions,
    1 or 2 heads, with or without MLP, dropout, tied embeddings, warm-up and clipping); with the kernel-2 shift it
    reaches ~99 %. `conv_size=0` gives the plain model."""

    def __init__(self, vocab: int, d: int, seq_len: int, heads: int = 2, positions: str = "rope",
                 mlp: bool = True, dropout: float = 0.0, conv_size: int = 2) -> None:
        super().__init__()
        if positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', got {positions!r}")
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d) if positions == "learned" else None
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"n1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "out": nn.Linear(d, d),
                           "n2": nn.LayerNorm(d), "up": nn.Linear(d, 4 * d), "down": nn.Linear(4 * d, d),
                           **({"conv": nn.Conv1d(d, d, conv_size, groups=d, padding=conv_size - 1)}
                              if conv_size else {})})
            for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.heads, self.mlp, self.dropout = heads, mlp, dropout

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(T, device=ids.device))
        x = F.dropout(x, self.dropout, self.training)
        for b in self.blocks:
            u = b["n1"](x)
            if "conv" in b:  # depthwise causal conv ahead of the projections, as MetaLA's token mixer has
                u = b["conv"](u.transpose(1, 2))[..., :T].transpose(1, 2)
            q, k, v = b["qkv"](u).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            if self.pos is None:
                q, k = rotary(q), rotary(k)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
            a = a.transpose(1, 2).reshape(B, T, -1)
            x = x + b["out"](a)
            if self.mlp:
                x = x + b["down"](F.gelu(b["up"](b["n2"](x))))
        return self.norm(x)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor):
        h = self.hidden(ids)
        loss_sum, n = query_only_loss(h.reshape(-1, h.shape[-1]), self.head.weight, labels.reshape(-1))
        return loss_sum / n.clamp(min=1)


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int, device) -> float:
    """Fraction of scored positions whose argmax is the value."""
    model.eval()
    hits = total = 0
    for s in range(0, len(inputs), batch):
        ids, lab = inputs[s : s + batch].to(device), labels[s : s + batch].to(device)
        if isinstance(model, MetaLAForCausalLM):
            hidden = model.norm(_trunk(model, ids))
            head = model.lm_head.weight
        else:
            hidden, head = model.hidden(ids), model.head.weight
        keep = lab != IGNORE
        pred = F.linear(hidden[keep], head.to(hidden.dtype)).argmax(-1)
        hits += int((pred == lab[keep]).sum())
        total += int(keep.sum())
    model.train()
    return hits / max(total, 1)


def _trunk(model: MetaLAForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    h = model.embed(ids)
    for layer in model.layers:
        h = layer(h)
    return h


MODELS = ("metala", "attention")
EARLY_STOP = 0.99  # Zoology's early-stopping threshold on held-out accuracy


@dataclass
class Trial:
    kind: str  # "metala" | "attention"
    d: int
    lr: float
    data: MQARData
    epochs: int
    batch: int
    overrides: dict | None = None
    time_budget_s: float | None = None
    compile: bool = False
    attention: dict | None = None  # AttentionLM keyword arguments (positions, conv_size, ...)


def train_one(trial: Trial, train, test, device, dtype=torch.bfloat16) -> dict:
    """Zoology's trainer: AdamW, cosine to 0 over the epochs, held-out accuracy after every epoch, early stop."""
    torch.manual_seed(0)
    if trial.kind == "metala":
        model = metala_model(trial.data.vocab, trial.d, "auto", trial.overrides).to(device)
        if trial.compile:  # Inductor fuses the many small elementwise kernels that bound this tiny model's step
            from pretrain.parallelize import apply_compile

            apply_compile(model)
    else:
        model = AttentionLM(trial.data.vocab, trial.d, trial.data.seq_len, **(trial.attention or {})).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=trial.lr)
    per_epoch = math.ceil(len(train[0]) / trial.batch)
    steps = trial.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    train = (train[0].to(device), train[1].to(device))  # a few hundred MB at most: no loader, no host syncs
    g = torch.Generator(device=device).manual_seed(1)
    t0, step, curve, stop = time.time(), 0, [], "epochs"
    for epoch in range(trial.epochs):
        perm = torch.randperm(len(train[0]), generator=g, device=device)
        losses = []
        for s in range(0, len(perm), trial.batch):
            idx = perm[s : s + trial.batch]
            with autocast:
                loss = model(train[0][idx], labels=train[1][idx]).loss if trial.kind == "metala" else \
                    model(train[0][idx], train[1][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.detach())
        with autocast:
            acc = accuracy(model, test[0], test[1], trial.batch, device)
        curve.append({"epoch": epoch + 1, "step": step, "train_loss": float(torch.stack(losses).float().mean()),
                      "accuracy": acc, "seconds": round(time.time() - t0, 1)})
        if acc > EARLY_STOP:
            stop = "early_stop"
            break
        if trial.time_budget_s and (time.time() - t0) * (epoch + 2) / (epoch + 1) > trial.time_budget_s:
            stop = "time_budget"  # the next epoch would overrun the budget
            break
    best = max(curve, key=lambda c: c["accuracy"])
    return {"model": trial.kind, "d_model": trial.d, "lr": trial.lr, "accuracy": best["accuracy"],
            "best_epoch": best["epoch"], "final_accuracy": curve[-1]["accuracy"], "steps": step,
            "epochs_run": len(curve), "stopped_by": stop, "seconds": round(time.time() - t0, 1),
            "final_loss": curve[-1]["train_loss"], "overrides": trial.overrides or {},
            **({"attention": trial.attention or {}} if trial.kind == "attention" else {}), "curve": curve}


def _data_for(data: MQARData) -> tuple:
    rng = np.random.default_rng(data.seed)
    train = make_mqar(data.vocab, data.seq_len, data.pairs, data.n_train, data.power_a, rng, data.random_fill)
    test = make_mqar(data.vocab, data.seq_len, data.pairs, data.n_test, data.power_a, rng, data.random_fill)
    return train, test


def _run_trial_in_worker(trial: Trial) -> dict:
    """One trial in a fresh process: regenerates the (seeded, identical) data rather than pickling 100k examples."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, test = _data_for(trial.data)
    row = train_one(trial, train, test, device)
    _print_trial(trial.data, row)
    return row


def _print_trial(data: MQARData, r: dict) -> None:
    print(f"  seq {data.seq_len} pairs {data.pairs} d {r['d_model']} {r['model']} lr {r['lr']:.1e}: "
          f"{100 * r['accuracy']:.2f}% (epoch {r['best_epoch']}/{r['epochs_run']}, {r['stopped_by']}, "
          f"{r['seconds']:.0f}s)", flush=True)


SETTINGS = {
    # the paper's Table A7 (seq 512, 80 pairs) and the seq-256 setting of Fig. 3 (16 pairs, as the issue asks)
    "paper": [dict(seq_len=512, pairs=80, widths=[64, 128], batch=128, lrs=list(np.logspace(-4, -2, 4)) +
                   list(np.logspace(-5, -3, 4))),
              dict(seq_len=256, pairs=16, widths=[64, 128], batch=256, lrs=list(np.logspace(-4, -2, 4)))],
    # the CI test's setting: a few thousand examples of a 64-token vocabulary, about a minute on one CPU core
    "cpu-smoke": [dict(seq_len=32, pairs=4, widths=[32], batch=64, lrs=[1e-2], vocab=64, n_train=2000,
                       n_test=500, epochs=10)],
}


@dataclass
class RunOptions:
    """How a sweep runs; `None` sizes take the setting's value, else Zoology's (vocab 8192, 100k/3k, 64 epochs)."""
    models: tuple[str, ...] = MODELS
    vocab: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    epochs: int | None = None
    max_lrs: int | None = None  # keep only the N largest lrs of the sweep
    only: str | None = None  # "seq:pairs[,seq:pairs]": run just those of the setting
    random_fill: bool = False
    overrides: dict | None = None  # MetaLAConfig fields (ablations)
    attention: dict | None = None  # AttentionLM keyword arguments
    jobs: int = 1
    time_budget_s: float | None = None
    compile: bool = False
    tag: str = ""


def run(setting: str, device, out: Path, opts: RunOptions | None = None) -> dict:
    opts = opts or RunOptions()
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y%m%d')}_{'cpu' if device.type == 'cpu' else 'gpu'}_mqar_{setting}{opts.tag}.json"
    protocol = {**{k: v for k, v in asdict(opts).items() if k not in ("only", "tag", "jobs")},
                "optimizer": "AdamW(torch defaults), cosine to 0, no warm-up, no clipping (Zoology trainer)"}

    def save(done: list[dict]) -> dict:  # after every width, so a cut-off run keeps what it measured
        result = {"bench": "mqar", "setting": setting, "device": str(device) if device.type == "cpu" else
                  torch.cuda.get_device_name(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "protocol": protocol, "paper": {"seq512_pairs80": {"d64": 0.285, "d128": 0.904}}, "rows": done}
        path.write_text(json.dumps(result, indent=2))
        plot(done, path.with_suffix(".png"))
        return result

    for spec in SETTINGS[setting]:
        if opts.only and f"{spec['seq_len']}:{spec['pairs']}" not in opts.only.split(","):
            continue
        data = MQARData(vocab=opts.vocab or spec.get("vocab", 8192), seq_len=spec["seq_len"], pairs=spec["pairs"],
                        n_train=opts.n_train or spec.get("n_train", 100_000),
                        n_test=opts.n_test or spec.get("n_test", 3_000), random_fill=opts.random_fill)
        rows += run_setting(data, spec, opts.epochs or spec.get("epochs", 64), device, opts,
                            on_row=lambda new: save(rows + new))
    result = save(rows)
    print(f"wrote {path}")
    return result


def variant(kind: str, opts: RunOptions) -> str:
    """The row's model as plotted: attention names its conv, MetaLA its ablation overrides."""
    if kind == "attention":
        conv = (opts.attention or {}).get("conv_size", 2)
        return f"attention+conv{conv}" if conv else "attention"
    return "metala" + "".join(f" {k}={v}" for k, v in sorted((opts.overrides or {}).items()))


def run_setting(data: MQARData, spec: dict, epochs: int, device, opts: RunOptions, on_row=None) -> list[dict]:
    """Every width of one (seq, pairs) setting: MetaLA over the lr sweep, attention over its two largest lrs (the
    second largest only, when the sweep is cut with max_lrs) unless the spec names `baseline_lrs`."""
    lrs = sorted(set(round(float(x), 8) for x in spec["lrs"]))
    if opts.max_lrs:
        lrs = lrs[-opts.max_lrs :]
    base_lrs = spec.get("baseline_lrs") or (lrs[-2:-1] if opts.max_lrs else lrs[-2:])
    trials = [Trial(kind, d, lr, data, epochs, spec["batch"], opts.overrides if kind == "metala" else None,
                    opts.time_budget_s, opts.compile, opts.attention if kind == "attention" else None)
              for d in spec["widths"] for kind in opts.models for lr in (lrs if kind == "metala" else base_lrs)]
    print(f"seq {data.seq_len} pairs {data.pairs}: {len(trials)} trials, {opts.jobs} at a time", flush=True)
    if opts.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(opts.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_run_trial_in_worker, trials))
    else:
        train, test = _data_for(data)
        results = []
        for t in trials:
            results.append(train_one(t, train, test, device))
            _print_trial(data, results[-1])
    rows = []
    for d in spec["widths"]:
        for kind in opts.models:
            mine = [r for r in results if r["d_model"] == d and r["model"] == kind]
            best = max(mine, key=lambda r: r["accuracy"])
            rows.append({**asdict(data), "model": kind, "variant": variant(kind, opts), "d_model": d,
                         "best_lr": best["lr"],
                         "accuracy": best["accuracy"], "chance": 1 / (data.vocab - data.vocab // 2),
                         "trials": mine, "epochs": epochs})
            print(f"seq {data.seq_len} pairs {data.pairs} d {d} {kind}: best {100 * best['accuracy']:.2f}% "
                  f"(lr {best['lr']:.1e})", flush=True)
            if on_row:
                on_row(rows)
    return rows


PAPER_SEQ512 = {64: 0.285, 128: 0.904}  # P Table A7, MetaLA at seq 512 / 80 pairs


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    keys = sorted({(r["seq_len"], r["pairs"], r.get("variant", r["model"])) for r in rows})
    for seq, pairs, name in keys:
        pts = sorted((r["d_model"], r["accuracy"]) for r in rows
                     if (r["seq_len"], r["pairs"], r.get("variant", r["model"])) == (seq, pairs, name))
        ax.plot(*zip(*pts), "o-" if name.startswith("metala") else "s--", label=f"{name}, seq {seq} / {pairs} pairs")
    if any((r["seq_len"], r["pairs"]) == (512, 80) for r in rows):
        ax.plot(list(PAPER_SEQ512), list(PAPER_SEQ512.values()), "k*", ms=10, label="paper MetaLA, seq 512 / 80")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model width d")
    ax.set_ylabel("MQAR accuracy (held out)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge(files: list[Path], out: Path) -> dict:
    """One summary (JSON + plot + a markdown table on stdout) from several result files, e.g. runs of one sweep
    split over device calls. For a (setting, variant, width) measured in more than one file the best is kept."""
    best: dict[tuple, dict] = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["rows"]:
            key = (r["seq_len"], r["pairs"], r["random_fill"], r.get("variant", r["model"]), r["d_model"])
            if key not in best or r["accuracy"] > best[key]["accuracy"]:
                best[key] = {**r, "source": Path(f).name}
    rows = [best[k] for k in sorted(best)]
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"bench": "mqar", "summary_of": [Path(f).name for f in files], "rows": rows,
              "paper": {"seq512_pairs80": {f"d{d}": a for d, a in PAPER_SEQ512.items()}}}
    out.write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"))
    print("| seq / pairs | fill | model | d | accuracy | paper | best lr | epochs run |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        paper = PAPER_SEQ512.get(r["d_model"]) if (r["seq_len"], r["pairs"], r["model"]) == (512, 80, "metala") else None
        ran = next(t.get("epochs_run", r["epochs"]) for t in r["trials"] if t["lr"] == r["best_lr"])
        print(f"| {r['seq_len']} / {r['pairs']} | {'random' if r['random_fill'] else 'zeros'} | "
              f"{r.get('variant', r['model'])} | {r['d_model']} | {100 * r['accuracy']:.1f} % | "
              f"{'' if paper is None else f'{100 * paper:.1f} %'} | {r['best_lr']:.1e} | {ran} |")
    print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="paper")
    ap.add_argument("--vocab", type=int, default=None, help="default: the setting's (Zoology: 8192)")
    ap.add_argument("--train-examples", type=int, default=None, help="default: the setting's (Zoology: 100k)")
    ap.add_argument("--test-examples", type=int, default=None, help="default: the setting's (Zoology: 3k)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the setting's (Zoology: 64)")
    ap.add_argument("--settings", default=None, help="comma list of seq:pairs to run, e.g. 512:80 (default: all)")
    ap.add_argument("--widths", default=None, help="comma list overriding the setting's widths, e.g. 128")
    ap.add_argument("--lrs", default=None, help="comma list overriding the setting's lr sweep")
    ap.add_argument("--max-lrs", type=int, default=None, help="keep only the N largest learning rates of the sweep")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of metala, attention")
    ap.add_argument("--no-baseline", action="store_true", help="skip the softmax-attention reference")
    ap.add_argument("--baseline-lrs", default=None,
                    help="comma list of the attention reference's lrs (default: the sweep's two largest)")
    ap.add_argument("--random-fill", action="store_true",
                    help="random tokens at non-query positions (Zoology's generator default; the paper's figure-2 "
                         "config and ours use token 0)")
    ap.add_argument("--model-overrides", type=json.loads, default=None,
                    help='MetaLAConfig fields for an ablation, as JSON, e.g. \'{"use_key": true}\'')
    ap.add_argument("--jobs", type=int, default=1, help="trials run at once on the device (spawned processes)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds per trial; a trial stops after the last epoch that fits (recorded as stopped_by)")
    ap.add_argument("--attention-conv", type=int, default=2,
                    help="kernel of the depthwise causal conv ahead of the reference's q/k/v (0: plain attention)")
    ap.add_argument("--attention-positions", choices=["rope", "learned"], default="rope")
    ap.add_argument("--compile", action="store_true", help="torch.compile the MetaLA blocks (GPU runs)")
    ap.add_argument("--tag", default="", help="suffix for the output file name")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                    help="write a summary of these result files to --out (a .json path) instead of training")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = tuple(m for m in args.models.split(",") if not (args.no_baseline and m == "attention"))
    if not models or set(models) - set(MODELS):
        ap.error(f"--models takes a non-empty comma list of {MODELS}")
    floats = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    override = {**({"widths": [int(w) for w in args.widths.split(",")]} if args.widths else {}),
                **({"lrs": floats(args.lrs)} if args.lrs else {}),
                **({"baseline_lrs": floats(args.baseline_lrs)} if args.baseline_lrs else {})}
    if override:  # a copy of the setting with the overrides (SETTINGS itself stays as published)
        SETTINGS[args.setting] = [{**spec, **override} for spec in SETTINGS[args.setting]]
    attention = {"conv_size": args.attention_conv, "positions": args.attention_positions}
    opts = RunOptions(models=models, vocab=args.vocab, n_train=args.train_examples, n_test=args.test_examples,
                      epochs=args.epochs, max_lrs=args.max_lrs, only=args.settings, random_fill=args.random_fill,
                      overrides=args.model_overrides, attention=attention, jobs=args.jobs,
                      time_budget_s=args.time_budget, compile=args.compile, tag=args.tag)
    return run(args.setting, device, args.out, opts)


if __name__ == "__main__":
    main()
