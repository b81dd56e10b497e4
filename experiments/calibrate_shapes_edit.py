"""Calibrate the built-in shapes editor: edit success and preservation against both guidance scales.

    python experiments/calibrate_shapes_edit.py            # results/shapes_edit/calibration.* (CPU: see the page)
    python experiments/calibrate_shapes_edit.py --samples 100 --text-scales 2 4 --image-scales 1.5 \\
        --out-dir /tmp/cal --no-settings                    # a quick look
    python experiments/calibrate_shapes_edit.py --split train --text-scales 3 --image-scales 2 \\
        --out-dir results/shapes_edit/calibration_train     # the same on training instructions

DDIM, 25 steps, ``--samples`` noises of the calibration seed 2 (held out: the search draws seed 0,
evaluations seed 1) and edits of held-out instructions (``--split train``: of training instructions,
on scenes and noise no training batch drew) drawn by the same seed (the kinds in turn):
``cond`` (the image-and-instruction pass alone, no guidance), then full two-condition guidance at
every pair (s_T, s_I) of ``--text-scales`` × ``--image-scales`` (InstructPix2Pix:
ε_∅ + s_T (ε_IT − ε_I) + s_I (ε_I − ε_∅)), all in one streamed pass. Writes into ``--out-dir``:

- ``calibration.md`` / ``calibration.json``: one row per policy — NFE, edit success overall and per
  kind, preservation, both ("edited"), seconds — and the gain of the best pair over ``cond``;
- ``calibration.png``: edit success, preservation and both against s_T, one line per s_I;
- ``calibration_grid.png``: the same edits and noise: the source, ``cond`` and full guidance at the best pair;

and the best pair (the highest held-out share of edits both done and kept) into the editor's
benchmark settings, ``agsearch/models/shapes/weights/shapes_edit_benchmark.json``
(``--no-settings`` leaves them alone), which the editing benchmark and search read. The settings come
from held-out instructions only: ``--split train`` never writes them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

from agsearch.eval.bench import save_figure
from agsearch.eval.records import format_table
from agsearch.eval.shapes_edit import ShapesEditEvaluator
from agsearch.eval.shapes_edit_bench import edit_grid
from agsearch.io import atomic_write_text
from agsearch.models.shapes import EDIT_BENCHMARK_FILE
from agsearch.policy import Policy

STEPS = 25
CALIBRATION_SEED = 2  # disjoint from search (0), evaluation (1) and search validation (3)


def full(s_t: float, s_i: float) -> Policy:
    return Policy.static(["edit"] * STEPS, s_t, image_guidance_scale=s_i, conditions=2,
                         name=f"full s_T={s_t:g} s_I={s_i:g}")


def plot_curves(rows: list[dict], best: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cond = rows[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for s_i in sorted({r["image_guidance_scale"] for r in rows[1:]}):
        line = sorted((r for r in rows[1:] if r["image_guidance_scale"] == s_i), key=lambda r: r["guidance_scale"])
        for ax, key in zip(axes, ("edit_success", "preservation", "edited")):
            ax.plot([r["guidance_scale"] for r in line], [100 * r[key] for r in line], "o-", label=f"s_I = {s_i:g}")
    for ax, key, title in zip(axes, ("edit_success", "preservation", "edited"),
                              ("edit success", "preservation", "edit done and the rest kept")):
        ax.axhline(100 * cond[key], color="grey", ls="--", lw=1, label="cond (no guidance)")
        ax.axvline(best["guidance_scale"], color="grey", ls=":", lw=1)
        ax.set_xlabel("text guidance scale s_T")
        ax.set_ylabel(f"{title} %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="the instructions: held out from training (the default), or training ones")
    p.add_argument("--text-scales", type=float, nargs="+", default=[2, 3, 4, 5, 7.5])
    p.add_argument("--image-scales", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", type=Path, default=Path("results/shapes_edit"))
    p.add_argument("--no-settings", action="store_true", help="do not write the editor's benchmark settings")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    start = time.time()
    ev = ShapesEditEvaluator(samples=args.samples, seed=args.seed, split=args.split, batch_size=args.batch_size,
                             device=args.device, progress=not args.no_progress)
    policies = [Policy.static(["cond"] * STEPS, 1.0, image_guidance_scale=1.0, conditions=2, name="cond")]
    policies += [full(s_t, s_i) for s_t, s_i in itertools.product(args.text_scales, args.image_scales)]
    rows = ev.records(policies, compare=False)
    cond, best = rows[0], max(rows[1:], key=lambda r: (r["edited"], r["edit_success"], -r["guidance_scale"]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    gain = {k: 100 * (best[k] - cond[k]) for k in ("edit_success", "preservation", "edited")}
    instructions = "held-out instructions" if args.split == "heldout" else "training instructions"
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python", "experiments/calibrate_shapes_edit.py", *map(shlex.quote, given)])
    lines = [
        "# Shapes editor: guidance-scale calibration",
        "",
        f"Produced by `{command}` ({time.time() - start:.0f} s on {args.device}). DDIM, {STEPS} steps, "
        f"{args.samples} edits of {instructions} and noise of seed {args.seed} (the calibration seed), "
        "the kinds recolour, move, add, remove in turn. `cond` is the image-and-instruction pass alone; "
        "`full` is two-condition guidance at text scale s_T and image scale s_I. Edit success: the scorer "
        "reads the edited region as the target; preserved: the rest as the source; both: the two at once.",
        "",
        f"Best pair (the highest share of edits both done and kept): **s_T = {best['guidance_scale']:g}, "
        f"s_I = {best['image_guidance_scale']:g}**. Against `cond`: edit success {100 * best['edit_success']:.1f}% "
        f"vs {100 * cond['edit_success']:.1f}% ({gain['edit_success']:+.1f} points), preserved "
        f"{100 * best['preservation']:.1f}% vs {100 * cond['preservation']:.1f}%, both {100 * best['edited']:.1f}% "
        f"vs {100 * cond['edited']:.1f}% ({gain['edited']:+.1f} points).",
        "",
        format_table(rows),
        "",
        "![edit success, preservation and both against the scales](calibration.png)",
        "",
        "![the same edits under cond and full guidance](calibration_grid.png)",
    ]
    atomic_write_text(args.out_dir / "calibration.md", "\n".join(lines) + "\n")
    atomic_write_text(args.out_dir / "calibration.json", json.dumps(dict(
        best={"guidance_scale": best["guidance_scale"], "image_guidance_scale": best["image_guidance_scale"]},
        gain_points=gain, steps=STEPS, samples=args.samples, seed=args.seed, split=args.split, command=command,
        rows=rows),
        indent=1) + "\n")
    plot_curves(rows, best, args.out_dir / "calibration.png")
    edit_grid(ev, {"cond": policies[0], f"full {best['guidance_scale']:g}/{best['image_guidance_scale']:g}":
                   full(best["guidance_scale"], best["image_guidance_scale"])},
              args.out_dir / "calibration_grid.png", rows=12)
    if not args.no_settings and args.split == "heldout":
        atomic_write_text(EDIT_BENCHMARK_FILE, json.dumps(dict(
            scheduler="ddim", num_inference_steps=STEPS, guidance_scale=best["guidance_scale"],
            image_guidance_scale=best["image_guidance_scale"],
            source=f"experiments/calibrate_shapes_edit.py, {args.samples} held-out edits"), indent=1) + "\n")
    print("\n".join(lines[:6]))
    print(f"wrote {args.out_dir}/calibration.md, .json, .png, calibration_grid.png")


if __name__ == "__main__":
    main()
