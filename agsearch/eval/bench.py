"""The baseline benchmark on the built-in digits model: one command, one table, two figures.

    agsearch bench --out-dir results        # ≈ 40 policies × 1000 samples

Protocol: DDIM, 25 steps, the calibrated guidance scale, ≥ 1000 samples with balanced
classes on held-out seeds (evaluation seed 1; the search draws seed 0), every policy from the
same noise. Writes ``benchmark.md`` (the table), ``benchmark.json`` (the records),
``fronts.png`` (accuracy and MSE against NFE) and ``cosine.png`` (γ_t over the steps under full
CFG, in x̂_0 and ε space).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from agsearch.baselines import make_baseline
from agsearch.eval import evaluator_for
from agsearch.eval.records import format_table
from agsearch.io import atomic_write_bytes, atomic_write_text
from agsearch.policy import Policy, load_policies

CUTOFF_STEPS = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24)
INTERVAL_WINDOWS = ((1, 8), (2, 8), (1, 12), (2, 12), (4, 12), (1, 16), (2, 16), (4, 16), (2, 20), (4, 20), (6, 20), (4, 24))
AG_X0 = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)
AG_EPS = (0.999, 0.9995, 0.9999)
AFFINE_CUTOFF_STEPS = (0, 1, 3, 5)  # CFG steps before affine CFG takes over (LinearAG)
LINEAR_AG_FRACTIONS = (0.5,)  # CFG/affine alternate over this share of the steps
FAMILY_STYLES = {"cutoff": "o-", "interval": "s", "ag-x0": "^-", "ag-eps": "v-", "alternating": "D", "cfg": "*",
                 "cond": "X", "linear-ag": "P-", "affine-cutoff": "h-", "policy file": "d"}  # the fronts' markers


def benchmark_suite(steps: int, scale: float, ag_default: float | None, quick: bool = False,
                    model: str = "digits"):
    """(family, policy) pairs: the baselines a user would otherwise pick by hand (LinearAG with
    ``model``'s shipped coefficients where they fit these settings)."""
    suite = [("cfg", make_baseline("cfg", steps, scale)), ("cond", make_baseline("cond", steps, scale)),
             ("alternating", make_baseline("alternating", steps, scale))]
    cutoffs = (4, 12) if quick else CUTOFF_STEPS
    windows = ((2, 12),) if quick else INTERVAL_WINDOWS
    ag_x0 = (0.99,) if quick else AG_X0
    suite += [("cutoff", make_baseline("cutoff", steps, scale, fraction=k / steps)) for k in cutoffs if k < steps]
    suite += [("interval", make_baseline("interval", steps, scale, start=a / steps, stop=b / steps))
              for a, b in windows if b <= steps]
    thresholds = sorted(set(ag_x0) | ({ag_default} if ag_default is not None else set()))
    suite += [("ag-x0", make_baseline("ag", steps, scale, threshold=g)) for g in thresholds]
    if not quick:
        suite += [("ag-eps", make_baseline("ag", steps, scale, threshold=g, space="eps")) for g in AG_EPS]
    affine = _builtin_affine(steps, scale, model)
    if affine is not None:  # LinearAG with the shipped coefficients (agsearch fit-affine)
        for f in ((0.5,) if quick else LINEAR_AG_FRACTIONS):
            suite.append(("linear-ag", make_baseline("linear-ag", steps, scale, fraction=f, affine=affine)))
        for k in ((1,) if quick else AFFINE_CUTOFF_STEPS):
            suite.append(("affine-cutoff", make_baseline("affine-cutoff", steps, scale, fraction=k / steps, affine=affine)))
    return suite


def select_families(suite, families: list[str] | None):
    """The suite's (family, policy) pairs of ``families`` (all when None); an unknown family is refused."""
    if not families:
        return suite
    known = sorted({f for f, _ in suite} | {"policy file"})
    unknown = [f for f in families if f not in known]
    if unknown:
        raise ValueError(f"unknown benchmark family {unknown[0]!r}; expected one of {', '.join(known)}")
    return [(f, p) for f, p in suite if f in families]


def suite_records(evaluator, suite) -> list[dict]:
    """The suite's records from one pass over the evaluator's samples (full CFG once per batch),
    each tagged with its family and, for an adaptive rule, its threshold."""
    records = evaluator.records([policy for _, policy in suite])
    for (family, policy), record in zip(suite, records):
        record["family"] = family
        if policy.rule is not None and "threshold" in policy.rule:  # searched rules have per-step thresholds
            record["threshold"] = policy.rule["threshold"]
    return records


def _builtin_affine(steps: int, scale: float, model: str = "digits") -> dict | None:
    """A built-in model's shipped LinearAG coefficients if they were fitted for these settings, else None."""
    from agsearch.linear_ag import AffineError, check_matches, load_builtin

    try:
        document = load_builtin(model)
        check_matches(document, steps, scale)
    except AffineError:
        return None
    return document


FAMILY_ORDER = ("cfg", "cond", "alternating", "cutoff", "interval", "ag-x0", "ag-eps", "linear-ag", "affine-cutoff",
                "policy file")  # the order of a benchmark page's sections


def family_tables(records: list[dict], families, heading: str = "##") -> list[str]:
    """A benchmark page's sections: a table per family of ``families`` that has records, most NFE first."""
    md = []
    for family in families:
        rows = sorted((r for r in records if r["family"] == family), key=lambda r: -r["nfe"])
        if rows:
            md += [f"{heading} {family}", "", format_table(rows), ""]
    return md


def plot_front(ax, records: list[dict], metric: str, styles: dict[str, str], ylabel: str,
               xlabel: str = "mean NFE per sample") -> None:
    """One panel of a benchmark's fronts: ``metric`` against NFE, a line per family of ``styles``.

    A rate (in [0, 1]) is drawn in percent; ``mse`` on a log axis, without the reference itself
    (MSE 0 has no place there)."""
    for i, (family, style) in enumerate(styles.items()):  # a family's colour by its place in styles, in every panel
        chosen = sorted((r for r in records if r["family"] == family and (metric != "mse" or r["mse"])),
                        key=lambda r: r["nfe"])
        if chosen:
            values = [r[metric] if metric == "mse" else 100 * r[metric] for r in chosen]
            ax.plot([r["nfe"] for r in chosen], values, style, label=family, ms=12 if "*" in style else 6,
                    color=f"C{i % 10}")
    if metric == "mse":
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_fronts(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    plot_front(axes[0], records, "accuracy", FAMILY_STYLES, "class accuracy (%)")
    plot_front(axes[1], records, "mse", FAMILY_STYLES, "MSE to full CFG (same noise)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_cosine(cos_x0: torch.Tensor, cos_eps: torch.Tensor, path: Path, title: str) -> None:
    """γ_t under full CFG: median and 10–90% band over samples, in x̂_0 and ε space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = torch.arange(cos_x0.shape[0])
    for cos, label in ((cos_x0, "x̂₀ space"), (cos_eps, "ε space")):
        q = torch.quantile(cos.float(), torch.tensor([0.1, 0.5, 0.9]), dim=1)
        ax.plot(steps, q[1], label=f"{label} (median)")
        ax.fill_between(steps, q[0], q[2], alpha=0.25)
    ax.set_xlabel("sampling step")
    ax.set_ylabel("cos(conditional, unconditional prediction)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG atomically (temporary file, then rename) and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _key_rows(records: list[dict], ag_default: float | None) -> list[str]:
    cfg = next(r for r in records if r["family"] == "cfg")
    lines = [f"- Full CFG: {cfg['nfe']:.0f} NFE, accuracy {100 * cfg['accuracy']:.1f}%, FD {cfg['fd']:.3f}."]
    cond = next(r for r in records if r["family"] == "cond")
    lines.append(f"- Conditional only: {cond['nfe']:.0f} NFE, accuracy {100 * cond['accuracy']:.1f}%, "
                 f"MSE to CFG {cond['mse']:.4f}.")
    if ag_default is not None:
        ag = next((r for r in records if r["family"] == "ag-x0" and r["threshold"] == ag_default), None)
        if ag is not None:
            saving = 100 * (1 - ag["nfe"] / cfg["nfe"])
            lines.append(f"- AG at its default threshold γ̄ = {ag_default:g} (x̂₀ space): {ag['nfe']:.1f} NFE "
                         f"({saving:.0f}% saved), accuracy {100 * ag['accuracy']:.1f}% "
                         f"({100 * (ag['accuracy'] - cfg['accuracy']):+.1f} points vs full CFG), MSE {ag['mse']:.5f}.")
    within = [r for r in records if r["family"] == "cutoff" and r["accuracy"] >= cfg["accuracy"] - 0.01]
    if within:
        best = min(within, key=lambda r: r["nfe"])
        lines.append(f"- Cheapest cutoff within 1 point of full CFG: {best['name']} at {best['nfe']:.0f} NFE "
                     f"({100 * best['accuracy']:.1f}%).")
    return lines


def _previous(path: Path, settings: dict, samples: int, seed: int) -> dict:
    """The benchmark to merge into: it must exist and match this run's protocol."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--merge needs a readable {path}: {getattr(e, 'strerror', None) or e}") from None
    theirs = (previous.get("settings"), previous.get("samples"), previous.get("seed"))
    if theirs != (settings, samples, seed):
        raise ValueError(f"--merge: {path} was made with settings/samples/seed {theirs}, not {(settings, samples, seed)}")
    return previous


def _eval_records(path: Path, settings: dict, samples: int, seed: int) -> list[dict]:
    """Records of ``agsearch eval --json``, checked against the benchmark protocol; each gets the
    family of its policy's baseline (``linear-ag``, ``affine-cutoff``, ...) or ``policy file``."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--records: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"--records: {path} is not a list of agsearch eval records")
    out = []
    for j, r in enumerate(records):
        # Records from before eval wrote its seed and scheduler used eval's defaults (1, ddim).
        theirs = (r.get("samples"), r.get("seed", 1), r.get("scheduler", "ddim"))
        if theirs != (samples, seed, settings["scheduler"]):
            raise ValueError(f"--records: {path} record {j} ({r.get('name')}) has samples/seed/scheduler {theirs}, "
                             f"not {(samples, seed, settings['scheduler'])}")
        family = "policy file"
        if r.get("policy_file"):
            family = Policy.load(r["policy_file"]).provenance.get("baseline") or family
        out.append({**r, "family": family})
    return out


def run_benchmark(out_dir: Path, samples: int = 1000, seed: int = 1, batch_size: int = 1000,
                  device: str = "cpu", progress: bool = True, quick: bool = False,
                  policies: list[Path] = (), families: list[str] | None = None, merge: bool = False,
                  records_files: list[Path] = ()) -> list[dict]:
    """Every baseline (and each policy file in ``policies``, e.g. searched ones, as family
    ``policy file``) on the evaluation noise; writes the table, JSON and figures.

    ``families`` keeps only those families of the suite (``policy file`` always runs). With
    ``merge`` the new records replace those of the same families (and policy names) in the
    existing ``benchmark.json`` of ``out_dir``, which must have the same settings, samples and
    seed; the table and figures are redrawn from the merged records, and both commands are kept.
    ``records_files`` (with ``merge``) adds the records of ``agsearch eval --json`` runs made with
    the same samples, seed and scheduler, so policies evaluated there are not sampled again."""
    from agsearch.models.digits import benchmark_settings

    settings = benchmark_settings()
    steps, scale = settings["num_inference_steps"], settings["guidance_scale"]
    ag_default = settings.get("ag_threshold")
    evaluator = evaluator_for("digits", samples=samples, seed=seed, scheduler=settings["scheduler"],
                              batch_size=batch_size, device=device, progress=progress)
    suite = benchmark_suite(steps, scale, ag_default, quick=quick)
    suite = select_families(suite, families)
    out_dir = Path(out_dir)
    previous = _previous(out_dir / "benchmark.json", settings, samples, seed) if merge else None
    if records_files and not merge:
        raise ValueError("--records adds evaluated policies to an existing table: it needs --merge")
    imported = [r for path in records_files for r in _eval_records(Path(path), settings, samples, seed)]
    if policies:
        suite += [("policy file", p) for p in load_policies(policies, steps, 1, "the digits model")]
    records = suite_records(evaluator, suite)
    records += imported
    cosines = evaluator.full_cfg_cosines.get((steps, float(scale)))  # γ_t of full CFG's first samples
    if cosines is None:  # full CFG did not run (only imported records): for the plot
        cosines = evaluator.tallies([Policy.static(["cfg"] * steps, scale)], compare=False)[0].cosine()
    cosine_x0, cosine_eps = cosines

    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else []
    command = " ".join(["agsearch", "bench", *map(shlex.quote, argv)])
    commands = [command]
    if previous is not None:
        replaced = {r["family"] for r in records[: len(records) - len(imported)] if r["family"] != "policy file"}
        names = {(r["family"], r["name"]) for r in records}
        kept = [r for r in previous["records"] if r["family"] not in replaced and (r["family"], r["name"]) not in names]
        records = kept + records
        commands = previous.get("commands", [previous["command"]]) + [command]
    title = (f"built-in digits model, {settings['scheduler'].upper()} {steps} steps, w = {scale:g}, "
             f"{samples} samples, seed {seed}")
    plot_fronts(records, out_dir / "fronts.png", title)
    plot_cosine(cosine_x0, cosine_eps, out_dir / "cosine.png", title)
    mean_x0 = cosine_x0.nanmean(dim=1)
    mean_eps = cosine_eps.nanmean(dim=1)
    seconds = sum(r["seconds"] for r in records)
    sampled = sum(r["samples"] for r in records)
    md = [
        "# Baseline benchmark on the built-in digits model",
        "",
        f"Produced by {', then '.join(f'`{c}`' for c in commands)} ({title}). Every policy sees the same noise; MSE and PSNR are against",
        "full CFG from that noise; FD is the Fréchet distance of classifier features against the 1,797 real digits.",
        "",
        *_key_rows(records, ag_default),
        f"- Mean cosine of the conditional and unconditional predictions under full CFG, first → last step: "
        f"x̂₀ space {mean_x0[0]:.4f} → {mean_x0[-1]:.4f}; ε space {mean_eps[0]:.5f} → {mean_eps[-1]:.5f} "
        f"(see [cosine.png](cosine.png)).",
        f"- Throughput: {sampled / seconds:.0f} samples/s over the whole table ({sampled} samples in {seconds:.1f} s).",
        "",
        "![accuracy and MSE against NFE](fronts.png)",
        "",
    ]
    md += family_tables(records, FAMILY_ORDER)
    atomic_write_text(out_dir / "benchmark.md", "\n".join(md))
    atomic_write_text(out_dir / "benchmark.json", json.dumps(
        {"command": commands[0], "commands": commands, "settings": settings, "samples": samples, "seed": seed, "records": records},
        indent=2) + "\n")
    print(format_table(records, markdown=False))
    print(f"wrote {out_dir / 'benchmark.md'}, benchmark.json, fronts.png, cosine.png")
    return records
