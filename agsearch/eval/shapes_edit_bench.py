"""The benchmark on the built-in shapes image editor: two-condition policies on held-out instructions.

    agsearch bench --model shapes_edit                      # results/shapes_edit/
    agsearch bench --model shapes_edit --policy P.json ...  # also searched policies (family "policy file")

Protocol: the editor's benchmark settings (DDIM, 25 steps, the calibrated s_T and s_I,
``agsearch/models/shapes/weights/shapes_edit_benchmark.json``), ``--samples`` edits of **held-out
instructions** (combinations no training instruction holds) and noise of the evaluation seed, the
same for every policy, in one streamed pass (per batch full guidance once, then every policy;
checkpointed every :data:`agsearch.eval.shapes_bench.CHECKPOINT_POLICIES` policies, ``--resume``
goes on from the last checkpoint, or from a finished run's ``benchmark.json``: policies added after
the suite's are then the only ones evaluated, and the tables and figures are written again). Full
guidance costs 3T NFE. The suite:

- ``full`` (3 passes a step), ``cond`` (1), ``text`` (2: no image guidance), ``joint`` (2: one
  direction towards both conditions at s_I) and ``alternating`` (full guidance every other step);
- ``cutoff``: full guidance for the first k steps, then ``cond`` (T + 2k NFE);
- ``image-cutoff``: full guidance for the first k steps, then text guidance (2T + k NFE);
- ``ag``: Adaptive Guidance on both directions, γ_t = min(cos(x̂₀_IT, x̂₀_I), cos(x̂₀_I, x̂₀_∅)),
  full guidance until γ_t ≥ θ, then ``cond``, swept over θ;
- each ``--policy`` file (searched policies of the ``editing`` space).

Writes ``benchmark.md`` / ``benchmark.json`` (NFE, edit success overall and per kind,
preservation, both, MSE and PSNR to full guidance, seconds; the cheapest policy within 1 point of
full guidance's edit success, the cheapest within 1 point of its edit success *and* preservation
(text guidance alone buys edits by letting the input image go), the cheapest of each family by the
second, and their NFE savings), ``fronts.png`` (edit success
and MSE against NFE) and ``grid.png`` (the same edits and noise under full guidance, ``cond``, a
cutoff and the policy file nearest two thirds of 3T).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from agsearch.eval.bench import family_tables, plot_front, save_figure, select_families, suite_records
from agsearch.eval.records import format_table
from agsearch.eval.shapes_bench import CHECKPOINT_POLICIES, _read_partial
from agsearch.io import atomic_write_text
from agsearch.policy import Policy, load_policies

if TYPE_CHECKING:
    from agsearch.eval.shapes_edit import ShapesEditEvaluator

CUTOFF_STEPS = (2, 4, 6, 8, 10, 12, 15, 20)  # full-guidance steps of the cutoffs (of 25)
IMAGE_CUTOFF_STEPS = (2, 4, 8, 12, 16, 20)
AG_THRESHOLDS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995)
FAMILY_STYLES = {"cutoff": "o-", "image-cutoff": "s-", "ag": "^-", "alternating": "D", "full": "*", "cond": "X",
                 "text": "P", "joint": "h", "policy file": "d"}
PAPER_SAVING = 33  # % of NFE the Adaptive Guidance paper saves on Emu Edit at the same quality


def edit_suite(steps: int, scale: float, image_scale: float, quick: bool = False) -> list[tuple[str, Policy]]:
    """(family, policy) pairs of the editing baselines (see the module doc)."""
    from agsearch.baselines import make_baseline

    def base(name, **options):
        return make_baseline(name, steps, scale, image_scale=image_scale, **options)

    def static(op):
        return Policy.static([op] * steps, scale, image_guidance_scale=image_scale, conditions=2, name=op)

    suite = [("full", static("edit")), ("cond", static("cond")), ("text", static("text")), ("joint", static("joint")),
             ("alternating", base("alternating"))]
    suite += [("cutoff", base("cutoff", fraction=k / steps)) for k in ((4,) if quick else CUTOFF_STEPS) if k < steps]
    suite += [("image-cutoff", base("image-cutoff", fraction=k / steps))
              for k in ((4,) if quick else IMAGE_CUTOFF_STEPS) if k < steps]
    suite += [("ag", base("ag", threshold=t)) for t in ((0.99,) if quick else AG_THRESHOLDS)]
    return suite


def run_edit_benchmark(out_dir: Path, samples: int = 1000, seed: int = 1, batch_size: int = 250, device: str = "cpu",
                       progress: bool = True, quick: bool = False, policies: list[Path] = (),
                       families: list[str] | None = None, resume: bool = False) -> list[dict]:
    """Every editing baseline (and each policy file) on ``samples`` held-out edits; writes the table,
    JSON and figures into ``out_dir``; returns the records."""
    from agsearch.eval.shapes_edit import ShapesEditEvaluator
    from agsearch.models.shapes import edit_benchmark_settings

    settings = edit_benchmark_settings()
    steps, scale, image_scale = (settings["num_inference_steps"], float(settings["guidance_scale"]),
                                 float(settings["image_guidance_scale"]))
    suite = select_families(edit_suite(steps, scale, image_scale, quick), families)
    suite += [("policy file", p) for p in load_policies(policies, steps, 2, "the shapes editor")]
    if not any(family == "full" for family, _ in suite):
        suite.insert(0, edit_suite(steps, scale, image_scale)[0])  # the table's reference row
    out_dir = Path(out_dir)
    partial = out_dir / "benchmark.heldout.partial.json"
    protocol = {"samples": samples, "seed": seed, "edits": "heldout", "settings": settings,
                "policies": [[family, policy.to_dict()] for family, policy in suite]}
    done, source = [], partial
    if resume:  # the partial of a run cut short, else a finished run's benchmark.json (it keeps its protocol)
        for source in (partial, out_dir / "benchmark.json"):
            done, _ = _read_partial(source, protocol)
            if done:
                break
    if done:
        print(f"held-out edits: reusing {len(done)} of {len(suite)} policies from {source} (--resume)", file=sys.stderr)
    evaluator = ShapesEditEvaluator(samples=samples, seed=seed, split="heldout", scheduler=settings["scheduler"],
                                    batch_size=batch_size, device=device, progress=progress)
    for lo in range(len(done), len(suite), CHECKPOINT_POLICIES):
        done = done + suite_records(evaluator, suite[lo:lo + CHECKPOINT_POLICIES])
        atomic_write_text(partial, json.dumps({"protocol": protocol, "records": done, "cosines": None}) + "\n")
    records = done

    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else []
    command = " ".join(["agsearch", "bench", *map(shlex.quote, argv)])
    title = (f"built-in shapes editor, {settings['scheduler'].upper()} {steps} steps, s_T = {scale:g}, "
             f"s_I = {image_scale:g}, {samples} held-out edits, seed {seed}")
    plot_fronts(records, out_dir / "fronts.png", title)
    grid = grid_policies(suite, steps)
    edit_grid(evaluator, grid, out_dir / "grid.png", rows=12, title="held-out edits, same noise; green: the edit "
              "done and the rest kept (scorer)")
    md = ["# Benchmark on the built-in shapes image editor", "",
          f"Produced by `{command}` ({title}). Every policy sees the same noise, source images and instructions;",
          "MSE and PSNR are against full two-condition guidance from that noise (decoded images in [-1, 1]). Edit",
          "success: the scorer reads the edited region as the target; preserved: the rest of the image as the",
          "source; both: the two at once.", "", *key_rows(records), "", "![edit success and MSE against NFE](fronts.png)",
          "", f"![edits: {', '.join(grid)}](grid.png)", ""]
    md += family_tables(records, FAMILY_STYLES)
    atomic_write_text(out_dir / "benchmark.md", "\n".join(md))
    atomic_write_text(out_dir / "benchmark.json", json.dumps(
        {"command": command, "settings": settings, "samples": samples, "seed": seed, "protocol": protocol,
         "records": records},
        indent=2) + "\n")
    partial.unlink(missing_ok=True)
    print(f"held-out edits:\n{format_table(records, markdown=False)}\n")
    print("\n".join(key_rows(records)))
    print(f"wrote {out_dir / 'benchmark.md'}, benchmark.json, fronts.png, grid.png")
    return records


def cheapest_within(rows: list[dict], reference: dict, points: float = 1.0,
                    keys: tuple[str, ...] = ("edit_success",)) -> dict | None:
    """The lowest-NFE record within ``points`` of ``reference`` on every one of ``keys`` (edit
    success alone by default; with ``preservation`` too, a policy cannot qualify by trading the
    input image for the instruction, as text guidance alone does)."""
    within = [r for r in rows if all(r[k] >= reference[k] - points / 100 - 1e-9 for k in keys)]
    return min(within, key=lambda r: (r["nfe"], -r["edit_success"])) if within else None


KEPT = ("edit_success", "preservation")


def key_rows(records: list[dict]) -> list[str]:
    """Full guidance against ``cond``; the cheapest policy within 1 point of full guidance's edit
    success, then within 1 point of its edit success and its preservation, with the cheapest of each
    family by the second, and their NFE savings (the paper: ~33% on Emu Edit)."""
    full = next(r for r in records if r["family"] == "full")
    line = (f"- **Full guidance**: {full['nfe']:.0f} NFE, edit success {100 * full['edit_success']:.1f}%, "
            f"preserved {100 * full['preservation']:.1f}%, both {100 * full['edited']:.1f}%")
    cond = next((r for r in records if r["family"] == "cond"), None)
    if cond is not None:
        line += (f"; `cond` (no guidance, {cond['nfe']:.0f} NFE) {100 * cond['edit_success']:.1f}% edit success "
                 f"({100 * (cond['edit_success'] - full['edit_success']):+.1f} points)")
    lines = [line + "."]
    others = [r for r in records if r["family"] != "full"]

    def saving(r):
        return f"{100 * (1 - r['nfe'] / full['nfe']):.0f}%"

    for keys, what in ((("edit_success",), "edit success"), (KEPT, "edit success and preservation")):
        best = cheapest_within(others, full, keys=keys)
        lines.append(f"- **Cheapest policy within 1 point of full guidance's {what}**: " + (
            "none." if best is None else
            f"{best['name']} ({best['family']}) at {best['nfe']:.1f} NFE, {saving(best)} of the NFE saved (the "
            f"Adaptive Guidance paper: ~{PAPER_SAVING}% on Emu Edit), edit success {100 * best['edit_success']:.1f}%, "
            f"preserved {100 * best['preservation']:.1f}%, both {100 * best['edited']:.1f}%."))
    lines.append("- The cheapest of each family within 1 point of both:")
    for family in FAMILY_STYLES:
        if family in ("full", "cond"):
            continue
        rows = [r for r in records if r["family"] == family]
        if not rows:
            continue
        found = cheapest_within(rows, full, keys=KEPT)
        lines.append(f"  - {family}: " + ("none." if found is None else
                     f"{found['name']} at {found['nfe']:.1f} NFE ({saving(found)} saved), edit success "
                     f"{100 * found['edit_success']:.1f}%, preserved {100 * found['preservation']:.1f}%, "
                     f"MSE {found['mse']:.5f}."))
    return lines


def plot_fronts(records: list[dict], path: Path, title: str) -> None:
    """Edit success (and both done and kept) against NFE, and MSE to full guidance against NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, metric, label in zip(axes, ("edit_success", "edited", "mse"),
                                 ("edit success (%)", "edit done and the rest kept (%)", "MSE to full guidance")):
        plot_front(ax, records, metric, FAMILY_STYLES, label, xlabel="mean NFE per edit")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def grid_policies(suite, steps: int) -> dict[str, Policy]:
    """The grid's columns: full guidance, ``cond``, the cutoff nearest two thirds of 3T NFE and the
    static policy file nearest it."""
    target = 2 * steps
    columns = {}
    for family, policy in suite:
        if family in ("full", "cond"):
            columns[family] = policy
    cutoffs = [p for family, p in suite if family == "cutoff"]
    if cutoffs:
        best = min(cutoffs, key=lambda p: abs(p.nfe - target))
        columns[f"{best.label()} ({best.nfe} NFE)"] = best
    files = [p for family, p in suite if family == "policy file" and p.nfe is not None]
    if files:
        best = min(files, key=lambda p: abs(p.nfe - target))
        columns[f"{best.label()} ({best.nfe} NFE)"] = best
    return columns


def edit_grid(evaluator: "ShapesEditEvaluator", policies: dict, path, rows: int = 8, title: str = "") -> None:
    """The first ``rows`` edits of ``evaluator`` (the kinds in turn; the same edits and noise as its
    first samples): the source, then each policy's edit; a green frame where the scorer finds the edit done and the rest kept
    (``edited``), red where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agsearch.eval.shapes_edit import ShapesEditEvaluator
    from agsearch.models.shapes import edits

    ev = evaluator
    rows = min(rows, ev.samples)
    sub = ShapesEditEvaluator(samples=rows, seed=ev.seed, split=ev.caption_set, scheduler=ev.scheduler_name,
                              batch_size=rows, device=ev.device, progress=False, pipe=ev.pipe, scorer=ev.scorer)
    columns = {"source": (sub.sources(torch.arange(rows)), [None] * rows)}
    for name, policy in policies.items():
        _, images, _ = sub.run(policy)
        ok = [edits.edit_success(e, s) and edits.preservation(e, s) for e, s in zip(sub.edits, sub.scorer.read(images))]
        columns[name] = (images, ok)
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.0 * len(columns) + 2.6, rows * 0.95), squeeze=False)
    for r in range(rows):
        for c, (name, (images, ok)) in enumerate(columns.items()):
            ax = axes[r, c]
            ax.imshow(((images[r].permute(1, 2, 0).cpu().numpy() + 1) / 2).clip(0, 1), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("#888" if ok[r] is None else "#2a2" if ok[r] else "#c22")
                spine.set_linewidth(2)
            if r == 0:
                ax.set_title(name, fontsize=7)
        axes[r, 0].set_ylabel(sub.edits[r].text, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title or "same noise; green: the edit done and the rest kept (scorer)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
