"""Calibrate the built-in shapes model: prompt adherence and FD against the guidance scale.

    python experiments/calibrate_shapes.py               # results/shapes_calibration/ (~30 min on 2 CPU cores)
    python experiments/calibrate_shapes.py --samples 100 --scales 1.5 3 --out-dir /tmp/cal   # a quick look

The benchmark protocol (DDIM, 25 steps) on ``--samples`` noises of the calibration seed 2 (held out:
the search draws seed 0, evaluations seed 1, search validation seed 3), with held-out captions and
with training captions drawn by the same seed: conditional-only sampling first, then full CFG at every
scale of ``--scales``. Writes into ``--out-dir``:

- ``calibration.md`` / ``calibration.json``: one row per (captions, policy) — NFE, adherence
  overall and per category, FD, MSE/PSNR against full CFG at the best scale, seconds;
- ``calibration.png``: adherence and FD against w, both caption sets, conditional-only as w = 1;
- ``grid.png``: the same captions and noise, conditional-only beside CFG at the best scale;
- ``cosine.png``: the x̂₀-space cosine of the conditional and unconditional predictions per step
  under full CFG at the best scale (median and 10–90% band), as ``results/cosine.png`` on digits;

and the best scale (the highest held-out adherence) into the model's benchmark settings,
``agsearch/models/shapes/weights/shapes_benchmark.json`` (``--no-settings`` leaves them alone), which
``agsearch baseline --model shapes`` and ``agsearch eval --model shapes`` read.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from agsearch.eval import shapes_bench
from agsearch.eval.bench import save_figure
from agsearch.eval.records import format_table, mse_psnr
from agsearch.eval.shapes import ShapesEvaluator
from agsearch.io import atomic_write_text
from agsearch.models.shapes import BENCHMARK_FILE
from agsearch.policy import Policy

STEPS = 25
CALIBRATION_SEED = 2  # disjoint from search (0), evaluation (1) and search validation (3)


def sweep(split: str, args, pipe, scorer) -> tuple[list[dict], ShapesEvaluator]:
    ev = ShapesEvaluator(samples=args.samples, seed=args.seed, captions=split, batch_size=args.batch_size,
                         device=args.device, progress=not args.no_progress, pipe=pipe, scorer=scorer)
    records = []
    for w in [None, *args.scales]:
        policy = Policy.static(["cond"] * STEPS, 1.0, name="cond-only") if w is None else \
            Policy.static(["cfg"] * STEPS, w, name=f"cfg w={w:g}")
        r = ev.evaluate(policy, compare=False, keep=True)  # compared with the best scale's CFG once it is known
        r["w"] = 1.0 if w is None else w
        r["_images"] = ev.last[1]
        records.append(r)
        print(f"[{split}] {r['name']}: adherence {100 * r['adherence']:.1f}%  FD {r['fd']:.2f}  {r['seconds']:.0f}s",
              flush=True)
        if w is not None:  # keep the cosines of every full-CFG run for the best scale's plot
            r["_cosine_x0"] = ev.last[0].cosine_x0.cpu().numpy()
    return records, ev


def plot_curves(rows: dict, best: float, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, records in rows.items():
        w = [r["w"] for r in records]
        axes[0].plot(w, [100 * r["adherence"] for r in records], "o-", label=f"{split} captions")
        axes[1].plot(w, [r["fd"] for r in records], "o-", label=f"{split} captions")
    for ax, label in zip(axes, ("prompt adherence %", "FD (scorer features)")):
        ax.axvline(best, color="grey", ls=":", lw=1)
        ax.set_xlabel("guidance scale w (w = 1: conditional only)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("prompt adherence (scorer)")
    axes[1].set_title("Fréchet distance to renders")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_cosine(cos: np.ndarray, path: Path, best: float):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(len(cos))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.fill_between(steps, np.nanquantile(cos, 0.1, axis=1), np.nanquantile(cos, 0.9, axis=1), alpha=0.3,
                    label="10–90%")
    ax.plot(steps, np.nanmedian(cos, axis=1), "o-", ms=3, label="median")
    ax.set_xlabel("DDIM step")
    ax.set_ylabel("cos(x̂₀ cond, x̂₀ uncond)")
    ax.set_title(f"shapes, full CFG w={best:g}, {cos.shape[1]} samples")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def sample_grid(pipe, scorer, best: float, path: Path, device, seed: int):
    """Held-out captions (two per category), conditional-only beside CFG at the best scale."""
    policies = {"conditional only": Policy.static(["cond"] * STEPS, 1.0),
                f"CFG w={best:g}": Policy.static(["cfg"] * STEPS, best)}
    shapes_bench.sample_grid(pipe, scorer, policies, path, device, seed, per_caption=4)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    p.add_argument("--scales", type=float, nargs="+", default=[1.5, 2, 3, 4, 5, 6, 7.5, 10])
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", type=Path, default=Path("results/shapes_calibration"))
    p.add_argument("--no-settings", action="store_true", help="do not write the model's benchmark settings")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv  # for the files' command line
    from agsearch.models.shapes import load_pipeline, load_scorer

    start = time.time()
    pipe, scorer = load_pipeline(device=args.device), load_scorer().to(args.device)
    rows, evaluators = {}, {}
    for split in ("heldout", "train"):
        rows[split], evaluators[split] = sweep(split, args, pipe, scorer)
    cfg_rows = [r for r in rows["heldout"] if r["name"] != "cond-only"]
    best_row = max(cfg_rows, key=lambda r: (r["adherence"], -r["w"]))
    best = best_row["w"]
    cosine = best_row["_cosine_x0"]
    for split, records in rows.items():  # MSE/PSNR against full CFG at the best scale, same noise
        ref = next(r for r in records if r["w"] == best and r["name"] != "cond-only")["_images"]
        for r in records:
            r["mse"], r["psnr"] = mse_psnr(r.pop("_images"), ref)
            r.pop("_cosine_x0", None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cond = {s: rows[s][0] for s in rows}
    gap = {s: max(r["adherence"] for r in rows[s][1:]) - cond[s]["adherence"] for s in rows}
    lines = [
        "# Shapes model: guidance-scale calibration",
        "",
        f"Produced by `{' '.join(['python', 'experiments/calibrate_shapes.py', *map(shlex.quote, given)])}` "
        f"({time.time() - start:.0f} s). DDIM, {STEPS} steps, {args.samples} samples per row, noise seed "
        f"{args.seed} (the calibration seed, held out), captions drawn by the same seed (categories in turn); the unconditional "
        "pass is the empty prompt. MSE/PSNR: against full CFG at the best scale from the same noise. "
        "FD: scorer features against renders of the same captions.",
        "",
        f"Best scale (highest held-out adherence): **w = {best:g}**. Full CFG there against conditional-only: "
        f"held-out captions {100 * best_row['adherence']:.1f}% vs {100 * cond['heldout']['adherence']:.1f}% "
        f"(+{100 * (best_row['adherence'] - cond['heldout']['adherence']):.1f} points); training captions: best "
        f"gain +{100 * gap['train']:.1f} points.",
        "",
    ]
    for split, records in rows.items():
        lines += [f"## {split} captions", "", format_table(records), ""]
    lines += ["![adherence and FD against w](calibration.png)", "", "![samples](grid.png)", "",
              "![cosine per step](cosine.png)", "",
              "Median x̂₀-space cosine per step (full CFG at the best scale): "
              + ", ".join(f"{v:.3f}" for v in np.nanmedian(cosine, axis=1)) + "."]
    atomic_write_text(args.out_dir / "calibration.md", "\n".join(lines) + "\n")
    atomic_write_text(args.out_dir / "calibration.json", json.dumps(dict(
        best_scale=best, steps=STEPS, samples=args.samples, seed=args.seed, rows=rows,
        cosine_x0_median=np.nanmedian(cosine, axis=1).tolist()), indent=1) + "\n")
    plot_curves(rows, best, args.out_dir / "calibration.png")
    plot_cosine(cosine, args.out_dir / "cosine.png", best)
    sample_grid(pipe, scorer, best, args.out_dir / "grid.png", args.device, args.seed)
    if not args.no_settings:
        atomic_write_text(BENCHMARK_FILE, json.dumps(dict(
            scheduler="ddim", num_inference_steps=STEPS, guidance_scale=best,
            source=f"experiments/calibrate_shapes.py, {args.samples} held-out samples"), indent=1) + "\n")
    print("\n".join(lines[:8]))
    print(f"wrote {args.out_dir}/calibration.md, .json, .png, grid.png, cosine.png")


if __name__ == "__main__":
    main()
