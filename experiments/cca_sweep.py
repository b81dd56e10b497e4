"""CCA on the built-in AR digits model: CFG scale sweep, λ sweep, one table and one plot.

    python experiments/cca_sweep.py          # writes results/cca/cca.md, cca.json, cca_lambda.png

On 1000 held-out samples (seed 1, balanced classes; every row shares the per-sample randomness):
the base model without guidance and with CFG at each ``--scales``; one CCA fine-tune per
``--lams`` (β = 0.02, null ratio 0.1, ``--steps`` steps of batch 64 at lr 3e-4), each sampled
without guidance; the ``--cfg-lam`` fine-tune also with CFG at ``--cfg-scales``. The plot is the analogue of the
paper's Fig. 4: FD against class accuracy as λ (CCA, 1 pass per token) and s (CFG, 2 passes) grow.
The "done when" check of issue 6 is printed and recorded: does CCA without guidance (λ = the
default) close ≥ 80% of the accuracy gap between the base model without and with its best CFG,
with FD no more than 10% above that CFG's?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from agsearch.cca import ARDigitsEvaluator, finetune, format_rows
from agsearch.io import atomic_write_bytes, atomic_write_text
from agsearch.models.digits_ar import load_model


def plot(rows: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    base = [r for r in rows if r["role"] == "base"]
    cfg = [r for r in rows if r["role"] in ("base", "cfg")]
    cca = [r for r in rows if r["role"] == "cca"]
    ax.plot([100 * r["accuracy"] for r in cfg], [r["fd"] for r in cfg], "o-", label="base + CFG (2 NFE/token), s =")
    for r in cfg:
        ax.annotate(f"{r['guidance_scale']:g}", (100 * r["accuracy"], r["fd"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([100 * r["accuracy"] for r in cca], [r["fd"] for r in cca], "s-", label="CCA, no guidance (1 NFE/token), λ =")
    for r in cca:
        ax.annotate(f"{r['lam']:g}", (100 * r["accuracy"], r["fd"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.plot([100 * base[0]["accuracy"]], [base[0]["fd"]], "k*", ms=12, label="base, no guidance")
    ax.set_xlabel("class accuracy % (higher: fidelity)")
    ax.set_ylabel("Fréchet distance (lower: closer to the data)")
    ax.set_title("AR digits: CCA λ sweep vs CFG scale sweep (1000 samples)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0, 5.0])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.3, 1.0, 10.0, 100.0])
    parser.add_argument("--cfg-lam", type=float, default=1.0, help="the λ (the default run's) also sampled with CFG")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[2.0, 3.0], help="CFG scales on that CCA model")
    parser.add_argument("--steps", type=int, default=80,
                        help="fine-tune steps per λ (short: the CPU budget; as `agsearch cca`)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=Path("results/cca"))
    args = parser.parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"--out-dir {args.out_dir} is a file")
    torch.manual_seed(0)
    evaluator = ARDigitsEvaluator(args.samples, args.seed)
    base = load_model()
    rows = [{**evaluator.evaluate(base, "base, no guidance"), "role": "base"}]
    rows += [{**evaluator.evaluate(base, "base + CFG", s), "role": "cfg"} for s in args.scales]
    print(format_rows(rows), flush=True)
    for lam in args.lams:
        tuned, seconds = finetune(lam=lam, steps=args.steps)
        extra = {"role": "cca", "lam": lam, "beta": 0.02, "steps": args.steps, "finetune_seconds": round(seconds, 1)}
        rows.append({**evaluator.evaluate(tuned, f"CCA λ={lam:g}, no guidance"), **extra})
        print(f"λ={lam:g}: fine-tuned in {seconds:.0f} s; accuracy {100 * rows[-1]['accuracy']:.1f}%, FD {rows[-1]['fd']:.3f}", flush=True)
        if lam == args.cfg_lam:
            rows += [{**evaluator.evaluate(tuned, f"CCA λ={lam:g} + CFG", s), **extra, "role": "cca+cfg"}
                     for s in args.cfg_scales]

    base_row = rows[0]
    best = max((r for r in rows if r["role"] == "cfg"), key=lambda r: (r["accuracy"], -r["fd"]))
    done = []
    for r in (r for r in rows if r["role"] == "cca"):
        gap = best["accuracy"] - base_row["accuracy"]
        closed = (r["accuracy"] - base_row["accuracy"]) / gap if gap > 0 else float("nan")
        done.append({"lam": r["lam"], "gap_closed": closed, "fd_ratio": r["fd"] / best["fd"],
                     "pass": bool(closed >= 0.8 and r["fd"] <= 1.1 * best["fd"])})
    summary = {"best_cfg_scale": best["guidance_scale"], "samples": args.samples, "seed": args.seed,
               "steps": args.steps, "done_when": done, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "cca.json", json.dumps(summary, indent=1) + "\n")
    check = "\n".join(f"| {d['lam']:g} | {100 * d['gap_closed']:.0f}% | {d['fd_ratio']:.2f} | {'yes' if d['pass'] else 'no'} |" for d in done)
    md = (f"{format_rows(rows)}\n\nBest base CFG: s = {best['guidance_scale']:g}. CCA fine-tunes: {args.steps} steps "
          f"of batch 64, β = 0.02, null ratio 0.1, lr 3e-4; {args.samples} held-out samples (seed {args.seed}).\n\n"
          f"| CCA λ | accuracy gap closed | FD / best-CFG FD | ≥ 80% and ≤ 1.10 |\n|---:|---:|---:|---|\n{check}\n")
    atomic_write_text(args.out_dir / "cca.md", md)
    plot(rows, args.out_dir / "cca_lambda.png")
    print(md)
    print(f"wrote {args.out_dir / 'cca.md'}, {args.out_dir / 'cca.json'}, {args.out_dir / 'cca_lambda.png'}")


if __name__ == "__main__":
    main()
