"""Learned adaptive rules vs Adaptive Guidance vs the best static policies (issue 7).

    python experiments/adaptive_bench.py [--budgets 35 40 45] [--spaces adaptive_cosine adaptive_thresholds]
                                         [--samples 1000] [--seed 1]

For every space and budget it runs the adaptive search (``experiments/adaptive_cosine.yaml`` with
``--model.space``, a normal ``agsearch search`` run): ``adaptive_cosine`` learns per-step thresholds
and the stop scales, ``adaptive_thresholds`` per-step thresholds only. Then it evaluates on
held-out samples (seed 1, DDIM 25, w = 1.1): full CFG, the learned policies and AG over a
threshold sweep. AG's MSE and accuracy at the learned policy's mean NFE are interpolated linearly
between the two sweep points around it. The best static policies at each budget come from
``results/search_polish_starts/sweep.json`` (``agsearch sweep``, the same samples and protocol).
Writes ``results/adaptive/bench.md``, ``bench.json``, ``front.png``, ``thresholds.png`` and
``policies/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

AG_THRESHOLDS = [0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995, 0.9998]


def interpolate(records: list[dict], nfe: float, key: str) -> float:
    points = sorted((r["nfe"], r[key]) for r in records)
    return float(np.interp(nfe, [p[0] for p in points], [p[1] for p in points]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[35, 40, 45])
    parser.add_argument("--spaces", nargs="+", default=["adaptive_cosine", "adaptive_thresholds"])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--config", default="experiments/adaptive_cosine.yaml")
    parser.add_argument("--static", default="results/search_polish_starts/sweep.json",
                        help="agsearch sweep JSON with the static policies")
    parser.add_argument("--out-dir", type=Path, default=Path("results/adaptive"))
    parser.add_argument("--root", default="runs/adaptive_bench", help="search run directories")
    args = parser.parse_args(argv)

    from agsearch.baselines import make_baseline
    from agsearch.cli.search import run_search
    from agsearch.eval.digits import DigitsEvaluator
    from agsearch.io import atomic_write_bytes, atomic_write_text
    from agsearch.models.digits import benchmark_settings
    from agsearch.policy import Policy

    settings = benchmark_settings()
    T, w = settings["num_inference_steps"], settings["guidance_scale"]
    learned: dict[tuple[str, int], Policy] = {}
    for space in args.spaces:
        for budget in args.budgets:
            path = args.out_dir / "policies" / f"{space}-b{budget}.json"
            policy, _, _ = run_search([f"--config={args.config}", f"--model.space={space}", f"--model.budget={budget}",
                                       "--eval.samples=0", f"--out={path}", f"--trainer.default_root_dir={args.root}",
                                       "--progress=false"])
            learned[space, budget] = policy

    evaluator = DigitsEvaluator(samples=args.samples, seed=args.seed, progress=True)
    started = time.perf_counter()
    teacher = {**evaluator.evaluate(Policy.static(["cfg"] * T, w, name="full CFG")).as_dict(), "role": "full CFG"}
    ag = [{**evaluator.evaluate(make_baseline("ag", T, w, threshold=g)).as_dict(), "role": "AG", "threshold": g}
          for g in AG_THRESHOLDS]
    rows = []
    for (space, budget), policy in learned.items():
        record = {**evaluator.evaluate(policy).as_dict(), "role": "learned", "space": space, "budget": budget,
                  "search_seconds": policy.provenance["search"]["seconds"],
                  "thresholds": policy.rule["thresholds"], "stop_scales": policy.rule.get("stop_scales")}
        rows.append(record)
    eval_seconds = time.perf_counter() - started

    static = json.loads(Path(args.static).read_text("utf-8"))["records"] if Path(args.static).is_file() else []
    lines = [
        "# Learned adaptive rules vs Adaptive Guidance vs static policies",
        "",
        f"Produced by `python experiments/adaptive_bench.py --budgets {' '.join(map(str, args.budgets))} "
        f"--spaces {' '.join(args.spaces)} --samples {args.samples} --seed {args.seed}`: DDIM {T} steps, w = {w}, "
        f"{args.samples} held-out samples (seed {args.seed}), MSE against full CFG from the same noise. Learned: "
        f"`agsearch search --config {args.config} --model.space=SPACE --model.budget=B` (thresholds calibrated to B "
        f"on 512 pairs of seed 2); adaptive_cosine learns per-step thresholds and stop scales (the scale of the "
        f"step at which a sample stops), adaptive_thresholds per-step thresholds only. AG at the learned "
        f"policy's NFE: linear interpolation between the two AG sweep points around it. Best static: the lowest-MSE "
        f"static policy at that budget in `{args.static}` (searched spaces, cutoff, best interval; same samples).",
        "",
        "| budget | space | learned NFE | learned acc % | learned MSE | AG MSE at that NFE | learned / AG | AG acc % | "
        "best static | static MSE | static acc % | search s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        ag_mse, ag_acc = interpolate(ag, r["nfe"], "mse"), interpolate(ag, r["nfe"], "accuracy")
        r.update(ag_mse=ag_mse, ag_accuracy=ag_acc, ratio=r["mse"] / ag_mse)
        candidates = [s for s in static if s.get("budget") == r["budget"] and s.get("policy_nfe") == r["budget"]]
        best = min(candidates, key=lambda s: s["mse"]) if candidates else None
        r["best_static"] = None if best is None else {k: best[k] for k in ("name", "role", "nfe", "mse", "accuracy")}
        static_cells = (f"{best['name']} ({best['role']}) | {best['mse']:.7f} | {100 * best['accuracy']:.1f}"
                        if best else "– | – | –")
        lines.append(f"| {r['budget']} | {r['space']} | {r['nfe']:.2f} | {100 * r['accuracy']:.1f} | {r['mse']:.7f} | {ag_mse:.7f} | "
                     f"{r['ratio']:.2f} | {100 * ag_acc:.1f} | {static_cells} | {r['search_seconds']:.0f} |")
    lines += ["", f"Full CFG: {100 * teacher['accuracy']:.1f}% accuracy, FD {teacher['fd']:.3f}. "
              f"Evaluation of every policy here took {eval_seconds:.0f} s.", "",
              "AG threshold sweep (x̂₀-space cosine, the same samples):", "",
              "| γ̄ | NFE | accuracy % | MSE | FD |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['threshold']:g} | {r['nfe']:.2f} | {100 * r['accuracy']:.1f} | {r['mse']:.7f} | {r['fd']:.3f} |"
              for r in ag]
    lines += ["", "Learned thresholds θ_t (steps 0–23; the last step's is unused):", ""]
    lines += [f"- {r['space']}, budget {r['budget']}: " + " ".join(f"{v:.5f}" for v in r["thresholds"][:-1]) for r in rows]
    lines += ["", f"Learned stop scales (steps 0–23; w = {w} is AG's convention, 1 is cond at the stopping step):", ""]
    lines += [f"- {r['space']}, budget {r['budget']}: " + " ".join(f"{v:.3f}" for v in r["stop_scales"][:-1])
              for r in rows if r["stop_scales"]]
    lines += ["", "![front](front.png)", "", "![thresholds](thresholds.png)", ""]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "bench.md", "\n".join(lines))
    atomic_write_text(args.out_dir / "bench.json", json.dumps({"teacher": teacher, "ag": ag, "learned": rows,
                                                               "eval_seconds": eval_seconds}, indent=1) + "\n")
    atomic_write_bytes(args.out_dir / "front.png", _front(ag, rows, static, args.budgets))
    atomic_write_bytes(args.out_dir / "thresholds.png", _thresholds(rows))
    print("\n".join(lines[:8 + len(rows)]))
    return 0


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _front(ag, rows, static, budgets) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pts = sorted((r["nfe"], r["mse"]) for r in ag)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color="tab:blue", label="AG, threshold sweep")
    for space, marker, color in (("adaptive_cosine", "s", "tab:red"), ("adaptive_thresholds", "D", "tab:orange")):
        sel = [r for r in rows if r["space"] == space]
        label = "learned θ_t + stop scales" if space == "adaptive_cosine" else f"learned θ_t ({space})"
        ax.plot([r["nfe"] for r in sel], [r["mse"] for r in sel], marker, ms=7, color=color, label=label)
    for role, marker, color in (("cutoff", "v", "tab:gray"), ("searched (cfg_scales)", "^", "tab:green")):
        sel = [s for s in static if s.get("role") == role and s.get("budget") in budgets]
        ax.plot([s["nfe"] for s in sel], [s["mse"] for s in sel], marker, ms=6, color=color, label=f"static: {role}")
    ax.set_yscale("log")
    ax.set_xlabel("mean NFE per sample (of 50)")
    ax.set_ylabel("MSE to full CFG")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _thresholds(rows) -> bytes:
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6.5, 6.4), sharex=True)
    for r in rows:
        th = np.array(r["thresholds"][:-1])
        style = "o-" if r["stop_scales"] else "x--"
        ax.plot(range(len(th)), -np.log10(np.clip(1 - th, 1e-12, None)), style, ms=3,
                label=f"{r['space']}, budget {r['budget']}")
        if r["stop_scales"]:
            bx.plot(range(len(th)), r["stop_scales"][:-1], style, ms=3, label=f"budget {r['budget']}")
    ax.set_ylabel("θ_t as −log10(1 − θ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.set_ylabel("stop scale (adaptive_cosine)")
    bx.set_xlabel("sampling step (0 = most noisy)")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


if __name__ == "__main__":
    sys.exit(main())
