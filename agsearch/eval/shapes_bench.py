"""The benchmark on the built-in shapes text-to-image model: two tables, fronts, cosines, a sample grid.

    agsearch bench --model shapes                      # results/shapes/, ≈ 50 policies × 2 caption sets
    agsearch bench --model shapes --policy P.json ...  # also searched policies (family "policy file")

Protocol: the model's benchmark settings (DDIM, 25 steps, the calibrated best scale,
``agsearch/models/shapes/weights/shapes_benchmark.json``), ``--samples`` held-out seeds (evaluation seed 1; the
search draws seed 0), the same noise for every policy, once on **training captions** and once on
**held-out captions** (combinations no training caption holds). Each caption set is one streamed
pass: per batch full CFG once, then every policy (the shared suite of ``agsearch.eval.bench``, the
cutoff and intervals at each searched budget, the policy files, then AG at the thresholds of
:data:`LATE_AG_X0`, which reach 45 NFE). Writes into ``out_dir``:

- ``benchmark.md`` / ``benchmark.json``: one table per caption set — NFE, adherence overall and
  per category, FD, MSE and PSNR to full CFG, seconds;
- ``fronts.png``: adherence–NFE and MSE–NFE, both caption sets;
- ``cosine.png``: γ_t under full CFG on held-out captions, x̂₀ and ε space;
- ``grid.png``: the same held-out captions and noise under full CFG, conditional-only, the cutoff
  at 35 NFE and the policy file closest to 35 NFE (when one is given).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from agsearch.eval.base import is_full_cfg
from agsearch.eval.bench import (
    FAMILY_ORDER,
    FAMILY_STYLES,
    benchmark_suite,
    family_tables,
    plot_cosine,
    plot_front,
    save_figure,
    select_families,
    suite_records,
)
from agsearch.eval.records import format_table
from agsearch.io import atomic_write_text
from agsearch.policy import Policy, load_policies

SPLITS = ("heldout", "train")  # held-out first: the goals are judged there
SPLIT_TITLES = {"train": "training captions", "heldout": "held-out captions"}
GRID_NFE = 35
BUDGETS = (30, 35, 40, 45)  # the searches' NFE: a cutoff and guidance intervals at each
INTERVAL_STARTS = (1, 2, 4)  # first guided step of the intervals added at each budget
CHECKPOINT_POLICIES = 8  # policies per checkpoint of a caption set (--resume goes on from the last one)


def run_shapes_benchmark(out_dir: Path, samples: int = 1000, seed: int = 1, batch_size: int = 500,
                         device: str = "cpu", progress: bool = True, quick: bool = False,
                         policies: list[Path] = (), families: list[str] | None = None,
                         splits: tuple[str, ...] = SPLITS, resume: bool = False) -> dict[str, list[dict]]:
    """Every baseline (and each policy file, as family ``policy file``) on ``samples`` evaluation
    noises per caption set; writes the tables, JSON and figures; returns the records per set.

    Each caption set is checkpointed in ``out_dir/benchmark.<set>.partial.json`` after every
    :data:`CHECKPOINT_POLICIES` policies, until the tables are written; with ``resume``, the records
    a file of the same samples, seed and settings holds for the policies this suite starts with are
    taken from it and the run goes on with the policies after them (so policy files may be added)."""
    from agsearch.eval.shapes import ShapesEvaluator
    from agsearch.models.shapes import benchmark_settings, load_pipeline, load_scorer

    settings = benchmark_settings()
    steps, scale = settings["num_inference_steps"], float(settings["guidance_scale"])
    suite = benchmark_suite(steps, scale, None, quick=quick, model="shapes")  # LinearAG with the shipped shapes fit
    if not quick:
        suite += budget_baselines(suite, steps, scale)
    suite = select_families(suite, families)
    suite += [("policy file", p) for p in load_policies(policies, steps, 1, "the shapes model")]
    if not quick and (not families or "ag-x0" in families):
        suite += late_ag(steps, scale)
    if not any(is_full_cfg(p) for _, p in suite):
        suite.insert(0, ("cfg", Policy.static(["cfg"] * steps, scale, name="cfg")))  # the tables' reference row
    pipe, scorer = load_pipeline(device=device), load_scorer().to(device)
    out_dir = Path(out_dir)
    records, cosines, protocols = {}, {}, {}
    for split in splits:
        partial = out_dir / f"benchmark.{split}.partial.json"
        protocol = {"samples": samples, "seed": seed, "captions": split, "settings": settings,
                    "policies": [[family, policy.to_dict()] for family, policy in suite]}
        done, cosine, source = [], None, partial
        if resume:  # the partial of a run cut short, else a finished run's benchmark.json (it keeps its protocols)
            for source in (partial, out_dir / "benchmark.json"):
                done, cosine = _read_partial(source, protocol, split)
                if done:
                    break
        if done:
            print(f"{SPLIT_TITLES[split]}: reusing {len(done)} of {len(suite)} policies from {source} (--resume)",
                  file=sys.stderr)
        if len(done) < len(suite):
            evaluator = ShapesEvaluator(samples=samples, seed=seed, captions=split, scheduler=settings["scheduler"],
                                        batch_size=batch_size, device=device, progress=progress, pipe=pipe,
                                        scorer=scorer)
        for lo in range(len(done), len(suite), CHECKPOINT_POLICIES):  # a checkpoint after each group of policies
            done = done + suite_records(evaluator, suite[lo:lo + CHECKPOINT_POLICIES])
            cosine = cosine if cosine is not None else evaluator.full_cfg_cosines.get((steps, scale))
            atomic_write_text(partial, json.dumps({"protocol": protocol, "records": done, "cosines": (
                None if cosine is None else [c.tolist() for c in cosine])}) + "\n")
        records[split], cosines[split], protocols[split] = done, cosine, protocol

    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else []
    command = " ".join(["agsearch", "bench", *map(shlex.quote, argv)])
    title = (f"built-in shapes model, {settings['scheduler'].upper()} {steps} steps, w = {scale:g}, "
             f"{samples} samples per caption set, seed {seed}")
    plot_fronts(records, out_dir / "fronts.png", title)
    last = "heldout" if "heldout" in cosines else splits[-1]
    cosine_title = title.replace(", w = ", ",\nw = ", 1) + f"; {SPLIT_TITLES[last]}"  # two lines: the plot is narrow
    plot_cosine(*cosines[last], out_dir / "cosine.png", cosine_title)
    grid = grid_policies(suite, steps, scale, records.get("heldout", ()))
    sample_grid(pipe, scorer, grid, out_dir / "grid.png", device, seed)
    md = ["# Benchmark on the built-in shapes text-to-image model", "",
          f"Produced by `{command}` ({title}). Every policy sees the same noise and captions; MSE and PSNR are",
          "against full CFG from that noise (decoded images in [-1, 1]); adherence is the share of samples whose",
          "caption the exact scorer finds fully satisfied; FD is the Fréchet distance of scorer features against",
          "renders of the same captions.", ""]
    for split, rows in records.items():
        md += _key_rows(rows, SPLIT_TITLES[split])
    md += ["", "![adherence and MSE against NFE](fronts.png)", "",
           f"![samples: {', '.join(grid)}](grid.png)", ""]
    for split, rows in records.items():
        table = _matched_table(rows)
        if table:
            md += [f"## Policy files against the baselines at their NFE, {SPLIT_TITLES[split]}", "",
                   "Adherence % / MSE to full CFG; the best interval is chosen on these samples.", "", *table, ""]
    for split, rows in records.items():
        md += [f"## {SPLIT_TITLES[split].capitalize()}", "", *family_tables(rows, FAMILY_ORDER, heading="###")]
    atomic_write_text(out_dir / "benchmark.md", "\n".join(md))
    atomic_write_text(out_dir / "benchmark.json", json.dumps(
        {"command": command, "settings": settings, "samples": samples, "seed": seed, "records": records,
         "protocols": protocols, "cosines": {split: None if c is None else [x.tolist() for x in c]
                                             for split, c in cosines.items()}},
        indent=2) + "\n")
    for split in splits:
        (out_dir / f"benchmark.{split}.partial.json").unlink(missing_ok=True)  # the tables hold them now
    for split, rows in records.items():
        print(f"{SPLIT_TITLES[split]}:\n{format_table(rows, markdown=False)}\n")
    print(f"wrote {out_dir / 'benchmark.md'}, benchmark.json, fronts.png, cosine.png, grid.png")
    return records


def _read_partial(path: Path, protocol: dict, split: str | None = None) -> tuple[list[dict], tuple | None]:
    """(records, cosines) an earlier run left for a caption set under the same samples, seed and
    settings: the records of the longest run of policies both suites start with (so a resumed run
    may add or change policies after them), and full CFG's γ_t (None until its group ran); ([], None)
    when there is nothing to take. ``path`` is a checkpoint (one caption set), or with ``split`` a
    finished run's benchmark.json, which keeps every set's protocol, records and cosines."""
    import torch

    try:
        kept = json.loads(path.read_text())
        if split is not None and "protocols" in kept:
            kept = {"protocol": kept["protocols"].get(split), "records": kept["records"].get(split, []),
                    "cosines": (kept.get("cosines") or {}).get(split)}
    except (OSError, ValueError, AttributeError):
        return [], None  # absent, or cut short: evaluate again
    old, new = kept.get("protocol") or {}, json.loads(json.dumps(protocol))
    if {k: v for k, v in old.items() if k != "policies"} != {k: v for k, v in new.items() if k != "policies"}:
        return [], None
    shared = 0
    for before, now, _ in zip(old.get("policies", []), new["policies"], kept["records"]):
        if before != now:
            break
        shared += 1
    if not shared:
        return [], None
    cosines = kept.get("cosines")
    return kept["records"][:shared], None if cosines is None else tuple(torch.tensor(c) for c in cosines)


# AG thresholds past the shared suite's, so that AG reaches 40-45 NFE of 50 on this model (0.999 stops
# near 39) and the adaptive policies have AG beside them there. They come last in the suite, so that a
# run resumed from a checkpoint made before they were added keeps all its records.
LATE_AG_X0 = (0.9995, 0.9998, 0.9999)


def late_ag(steps: int, scale: float) -> list[tuple[str, Policy]]:
    from agsearch.baselines import make_baseline

    return [("ag-x0", make_baseline("ag", steps, scale, threshold=g)) for g in LATE_AG_X0]


def budget_baselines(suite, steps: int, scale: float) -> list[tuple[str, Policy]]:
    """The cutoff and the intervals starting at :data:`INTERVAL_STARTS` at each of :data:`BUDGETS`
    NFE (of 2·steps) that ``suite`` lacks, so every searched budget has baselines at its own NFE."""
    from agsearch.baselines import make_baseline

    have = {p.label() for _, p in suite}
    added = []
    for budget in BUDGETS:
        k = budget - steps  # guided steps
        if not 0 < k < steps:
            continue
        candidates = [("cutoff", make_baseline("cutoff", steps, scale, fraction=k / steps))]
        candidates += [("interval", make_baseline("interval", steps, scale, start=a / steps, stop=(a + k) / steps))
                       for a in INTERVAL_STARTS if a + k <= steps]
        for family, policy in candidates:
            if policy.label() not in have:
                have.add(policy.label())
                added.append((family, policy))
    return added


def matched_rows(rows: list[dict]) -> list[dict]:
    """Each policy file's record beside the baselines at its NFE: the cutoff, the best interval (the
    highest adherence, then the lowest MSE) and AG in x̂₀ space interpolated linearly in NFE between
    the thresholds around it. ``beats`` says whether the policy's adherence is at least the cutoff's
    and the interval's and its MSE lower than both."""
    out = []
    ag = sorted((r for r in rows if r["family"] == "ag-x0"), key=lambda r: r["nfe"])
    for r in sorted((r for r in rows if r["family"] == "policy file"), key=lambda r: (r["nfe"], r["name"])):
        same = lambda family: [b for b in rows if b["family"] == family and abs(b["nfe"] - r["nfe"]) < 1e-6]  # noqa: E731
        cutoff = next(iter(same("cutoff")), None)
        intervals = same("interval")
        interval = max(intervals, key=lambda b: (b["adherence"], -b["mse"])) if intervals else None
        row = {"policy": r["name"], "nfe": r["nfe"], "adherence": r["adherence"], "mse": r["mse"],
               "cutoff": cutoff, "interval": interval, "ag": _interpolated(ag, r["nfe"])}
        if cutoff is not None and interval is not None:
            row["beats"] = (r["adherence"] >= max(cutoff["adherence"], interval["adherence"])
                            and r["mse"] < min(cutoff["mse"], interval["mse"]))
        out.append(row)
    return out


def _interpolated(rows: list[dict], nfe: float) -> dict | None:
    """Adherence and MSE of a swept family at ``nfe``, linear between the two records around it."""
    for lo, hi in zip(rows, rows[1:]):
        if lo["nfe"] <= nfe <= hi["nfe"] and hi["nfe"] > lo["nfe"]:
            f = (nfe - lo["nfe"]) / (hi["nfe"] - lo["nfe"])
            return {k: lo[k] + f * (hi[k] - lo[k]) for k in ("adherence", "mse")}
    return None


def _matched_table(rows: list[dict]) -> list[str]:
    matched = matched_rows(rows)
    if not matched:
        return []

    def cell(b):
        return "–" if b is None else f"{100 * b['adherence']:.1f} / {b['mse']:.5f}"

    lines = ["| policy | NFE | adherence % / MSE | cutoff at its NFE | best interval at its NFE "
             "| AG (x̂₀, interpolated) | MSE ÷ AG's | ≥ both in adherence, < both in MSE |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for m in matched:
        verdict = {True: "yes", False: "no"}.get(m.get("beats"), "–")
        ratio = "–" if m["ag"] is None or m["ag"]["mse"] <= 0 else f"{m['mse'] / m['ag']['mse']:.2f}"
        lines.append(f"| {m['policy']} | {m['nfe']:.2f} | {cell(m)} | {cell(m['cutoff'])} | {cell(m['interval'])} "
                     f"| {cell(m['ag'])} | {ratio} | {verdict} |")
    return lines


def _key_rows(rows: list[dict], what: str) -> list[str]:
    """The lines a reader looks for first: CFG against cond, and what the cheap policies keep."""
    cfg = next(r for r in rows if r["family"] == "cfg")
    cond = next((r for r in rows if r["family"] == "cond"), None)
    line = f"- **{what}**: full CFG {cfg['nfe']:.0f} NFE, adherence {100 * cfg['adherence']:.1f}%, FD {cfg['fd']:.1f}"
    if cond is not None:
        line += (f"; conditional only {100 * cond['adherence']:.1f}% "
                 f"({100 * (cond['adherence'] - cfg['adherence']):+.1f} points)")
    lines = [line + "."]
    for family in ("cutoff", "interval", "ag-x0", "ag-eps", "linear-ag", "affine-cutoff", "policy file"):
        within = [r for r in rows if r["family"] == family and r["adherence"] >= cfg["adherence"] - 0.01]
        if within:
            best = min(within, key=lambda r: r["nfe"])
            saving = 100 * (1 - best["nfe"] / cfg["nfe"])
            lines.append(f"  - cheapest {family} within 1 point of full CFG: {best['name']} at {best['nfe']:.1f} NFE "
                         f"({saving:.0f}% saved), adherence {100 * best['adherence']:.1f}%.")
    return lines


def plot_fronts(records: dict[str, list[dict]], path: Path, title: str) -> None:
    """Adherence against NFE and MSE against NFE, one column per caption set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(records), figsize=(5.6 * len(records), 8), squeeze=False)
    for col, (split, rows) in enumerate(records.items()):
        top, bottom = axes[0, col], axes[1, col]
        plot_front(top, rows, "adherence", FAMILY_STYLES, "prompt adherence (%)")
        plot_front(bottom, rows, "mse", FAMILY_STYLES, "MSE to full CFG (same noise)")
        top.set_title(SPLIT_TITLES[split], fontsize=10)
        top.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def grid_policies(suite, steps: int, scale: float, rows: list[dict] = ()) -> dict[str, Policy]:
    """The grid's columns: full CFG, conditional only, the cutoff at 35 NFE (of 2·25) and the policy
    file nearest 35 NFE (static ones by their NFE; adaptive ones are left out: their NFE is known
    only after sampling); of several at that NFE, the one with the highest adherence in ``rows``
    (the held-out records), then the lowest MSE."""
    from agsearch.baselines import make_baseline

    k = round(steps * (GRID_NFE / 50 * 2 - 1))  # 10 of 25 steps: 35 NFE of 50
    columns = {"full CFG": Policy.static(["cfg"] * steps, scale), "conditional only": Policy.static(["cond"] * steps, scale),
               f"cutoff {k}/{steps} ({steps + k} NFE)": make_baseline("cutoff", steps, scale, fraction=k / steps)}
    files = [p for family, p in suite if family == "policy file" and p.nfe is not None]
    if files:
        scores = {r["name"]: (-r["adherence"], r["mse"]) for r in rows if r["family"] == "policy file"}
        best = min(files, key=lambda p: (abs(p.nfe - (steps + k)), scores.get(p.label(), (0.0, 0.0))))
        columns[f"{best.label()} ({best.nfe} NFE)"] = best
    return columns


def sample_grid(pipe, scorer, policies: dict[str, Policy], path: Path, device, seed: int, n_captions: int = 10,
                per_caption: int = 3, split: str = "heldout") -> None:
    """``n_captions`` captions of ``split`` (two per category), ``per_caption`` noises each, under each
    policy: the same captions and noise in every block; a green frame where the scorer finds the
    caption satisfied, red where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agsearch.eval.shapes import ShapesEvaluator
    from agsearch.models.shapes import scenes

    per_category = max(1, n_captions // len(scenes.CATEGORIES))
    caps = []  # the first distinct captions of each category in the seed's draw
    for c in scenes.eval_captions(50 * n_captions, seed, split):
        if c not in caps and sum(d.category == c.category for d in caps) < per_category:
            caps.append(c)
    caps = sorted(caps, key=lambda c: scenes.CATEGORIES.index(c.category))
    listed = [c for c in caps for _ in range(per_caption)]
    ev = ShapesEvaluator(samples=len(listed), seed=seed, captions=listed, batch_size=500, device=device,
                         progress=False, pipe=pipe, scorer=scorer)
    runs = {}
    for name, policy in policies.items():
        _, images, _ = ev.run(policy)
        runs[name] = (images, [scenes.satisfies(s, c) for s, c in zip(scorer.read(images), listed)])
    width = per_caption * len(runs) + len(runs) - 1
    ratios = ([0.9] * per_caption + [0.15]) * (len(runs) - 1) + [0.9] * per_caption
    size = (0.9 * per_caption * len(runs) + 0.15 * (len(runs) - 1) + 3.0, len(caps) * 0.95 + 0.6)  # inches
    fig, axes = plt.subplots(len(caps), width, figsize=size, squeeze=False, gridspec_kw={
        "width_ratios": ratios, "wspace": 0.1, "hspace": 0.1, "left": 2.9 / size[0], "right": 0.995,
        "top": 1 - 0.55 / size[1], "bottom": 0.01})  # fixed margins: the captions on the left, the titles on top
    for row, cap in enumerate(caps):
        for block, (name, (images, ok)) in enumerate(runs.items()):
            for k in range(per_caption):
                ax = axes[row, k + block * (per_caption + 1)]
                j = row * per_caption + k
                ax.imshow(((images[j].permute(1, 2, 0).cpu().numpy() + 1) / 2).clip(0, 1), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor("#2a2" if ok[j] else "#c22")
                    spine.set_linewidth(2)
                if row == 0 and k == 0:
                    ax.set_title(name, loc="left", fontsize=8)
            if block < len(runs) - 1:
                axes[row, (block + 1) * (per_caption + 1) - 1].axis("off")
        axes[row, 0].set_ylabel(cap.text, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{SPLIT_TITLES[split]}, same noise; green frame: the scorer finds the caption satisfied", fontsize=9)
    save_figure(fig, path, dpi=110)
