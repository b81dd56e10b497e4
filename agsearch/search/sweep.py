"""The Pareto sweep: one search per (space, budget), every policy and its baselines on one table.

``agsearch sweep --budgets 30 35 40 45 --spaces minimal cfg_scales`` runs the searches (each a
normal ``agsearch search`` run, extra ``--key=value`` overrides passed through), then evaluates on
held-out seeds: full CFG, ``cond``, and at every budget the searched policies, the cutoff, the
best of all guidance intervals (an exhaustive sweep, chosen on the evaluation set itself) and the
Adaptive Guidance rule matched to the NFE. It writes ``sweep.md``, ``sweep.json``,
``sweep_front.png`` and ``policies/<space>-b<budget>.json`` under ``--out-dir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agsearch.io import atomic_write_text
from agsearch.policy import Policy


SWEEP_MODELS = {"digits": "digits", "agsearch-shapes": "shapes"}  # a search's provenance model -> its evaluator


def run_sweep(budgets: list[int], spaces: list[str], out_dir: Path, samples: int = 1000, seed: int = 1,
              batch_size: int = 1000, overrides: list[str] | None = None, progress: bool = True,
              ag: bool = True, root: str = "runs/sweep", captions: str = "heldout",
              resume: bool = False) -> list[dict]:
    """The searches (``overrides`` pass through, e.g. ``--model.model=digits``), then the evaluation
    on the searches' model: shapes on ``captions`` (default the held-out ones, which no search saw),
    or digits. With ``resume``, a policy file that an earlier sweep wrote for the same space and
    budget under ``out_dir/policies`` is taken instead of searching again."""
    from agsearch.cli.search import eval_metrics, run_search
    from agsearch.diffusers.schedulers import SCHEDULERS
    from agsearch.eval import evaluator_for
    from agsearch.search.compare import ag_at_nfe, static_baselines
    from agsearch.search.space import SearchSpace

    overrides = list(overrides or [])
    policy_dir = out_dir / "policies"
    searched: list[tuple[str, int, Policy]] = []
    search_seconds, reused = 0.0, []
    for space in spaces:
        for budget in budgets:
            path = policy_dir / f"{Path(space).stem}-b{budget}.json"
            policy = earlier_search(path, SearchSpace.load(space).name, budget) if resume else None
            if policy is not None:
                print(f"reusing {path} (--resume)")
                reused.append(path.name)
            else:
                argv = [f"--model.space={space}", f"--model.budget={budget}", "--eval.samples=0", f"--out={path}",
                        f"--trainer.default_root_dir={root}", f"--progress={str(progress).lower()}", *overrides]
                started = time.perf_counter()
                policy, _, _ = run_search(argv)
                # The whole search (fit, polish, export), kept so that a resumed sweep can sum it.
                policy.provenance["search"]["wall_seconds"] = round(time.perf_counter() - started, 1)
                policy.save(path)
            search_seconds += policy.provenance["search"].get("wall_seconds", policy.provenance["search"]["seconds"])
            searched.append((Path(space).stem, budget, policy))

    # Evaluate with the searches' own settings (overrides such as --model.scheduler included).
    first = searched[0][2]
    T, w = first.num_inference_steps, first.guidance_scale
    scheduler = next(name for name, (cls, _) in SCHEDULERS.items() if cls == first.provenance["scheduler"])
    model = SWEEP_MODELS.get(first.provenance.get("model"))
    if model is None:
        raise ValueError(f"agsearch sweep evaluates on a built-in model (digits, shapes); the searches ran on "
                         f"{first.provenance.get('model')!r}: compare those policies with agsearch eval")
    evaluator = evaluator_for(model, samples=samples, seed=seed, scheduler=scheduler, batch_size=batch_size,
                              progress=progress, captions=captions if model == "shapes" else None)
    rows: list[dict] = []

    def add(record, role: str, budget: int | None, extra: dict | None = None):
        rows.append({**record, "role": role, "budget": budget, **(extra or {})})

    add(evaluator.record(Policy.static(["cfg"] * T, w, name="full CFG")), "full CFG", None)
    add(evaluator.record(Policy.static(["cond"] * T, w, name="cond")), "cond", None)
    interval_seconds = 0.0
    for budget in budgets:
        found = static_baselines(evaluator, T, w, budget)
        interval_seconds += sum(r["seconds"] for r in found["intervals"])
        add(found["cutoff"], "cutoff", budget)
        add(found["interval"], "best interval", budget, {"windows": len(found["intervals"])})
        for space, b, policy in searched:
            if b == budget:
                record = evaluator.record(policy)
                add(record, f"searched ({space})", budget, {"search_seconds": policy.provenance["search"]["seconds"],
                                                            "ops": policy.ops_string()})
                policy.metrics["eval"] = eval_metrics(record, seed)
                policy.save(policy_dir / f"{space}-b{b}.json")
        if ag:
            add(ag_at_nfe(evaluator, T, w, budget), "AG (x0) at this NFE", budget)

    meta = {
        "command": "agsearch sweep " + " ".join(
            [f"--budgets {' '.join(map(str, budgets))}", f"--spaces {' '.join(spaces)}", f"--samples {samples}",
             f"--seed {seed}", f"--out-dir {out_dir}"] + ([f"--captions {captions}"] if model == "shapes" else []) + [f"-- {' '.join(overrides)}" if overrides else ""]).strip(),
        "samples": samples, "seed": seed, "num_inference_steps": T, "guidance_scale": w,
        "scheduler": scheduler, "model": model, "captions": captions if model == "shapes" else None,
        "search_seconds_total": round(search_seconds, 1), "reused": reused,
        "interval_sweep_seconds": round(interval_seconds, 1),
    }
    atomic_write_text(out_dir / "sweep.json", json.dumps({"meta": meta, "records": rows}, indent=1) + "\n")
    atomic_write_text(out_dir / "sweep.md", format_sweep(rows, meta))
    where = "digits" if model == "digits" else f"shapes, {captions} captions"
    plot_sweep(rows, out_dir / "sweep_front.png", f"{where}, {scheduler} {T} steps, w={w:g}, {samples} held-out samples")
    return rows


def earlier_search(path: Path, space: str, budget: int) -> Policy | None:
    """The policy an earlier sweep searched for ``space`` at ``budget``, or None (no file, or one
    from another search)."""
    if not path.is_file():
        return None
    policy = Policy.load(path)
    search = policy.provenance.get("search", {})
    return policy if search.get("space") == space and search.get("budget") == budget else None


def quality_key(rows: list[dict]) -> str:
    """The records' quality score: class accuracy (digits) or prompt adherence (shapes)."""
    return "accuracy" if "accuracy" in rows[0] else "adherence"


def quality_label(rows: list[dict]) -> str:
    return "accuracy" if quality_key(rows) == "accuracy" else "adherence"


def format_sweep(rows: list[dict], meta: dict) -> str:
    model = meta.get("model", "digits")
    where = f"the {model} model" + (f", {meta['captions']} captions" if meta.get("captions") else "")
    lines = [
        "# Searched policies vs training-free baselines", "",
        f"Produced by `{meta['command']}` on {where}: {meta['scheduler']}, {meta['num_inference_steps']} steps, w = {meta['guidance_scale']:g}, "
        f"{meta['samples']} held-out samples (seed {meta['seed']}); MSE and PSNR against full CFG from the same noise. "
        f"The best interval is chosen on these samples (favouring the baseline). Searches took "
        f"{meta['search_seconds_total']:.0f} s in all; the exhaustive interval sweeps {meta['interval_sweep_seconds']:.0f} s.", "",
        f"| budget | policy | role | NFE | {quality_label(rows)} % | MSE vs CFG | PSNR dB | FD | search s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    key = quality_key(rows)
    for r in rows:
        psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        lines.append(
            f"| {r['budget'] if r['budget'] is not None else '–'} | {r['name']} | {r['role']} | {r['nfe']:.2f} | "
            f"{100 * r[key]:.1f} | {r['mse']:.6f} | {psnr} | {r['fd']:.3f} | "
            f"{r['search_seconds'] if 'search_seconds' in r else ''} |"
        )
    lines += ["", "Searched policies, one letter per step (C = cfg, c = cond, u = uncond; per-step scales are in the policy files):", ""]
    for r in rows:
        if "ops" in r:
            lines.append(f"- {r['role']}, budget {r['budget']}: `{r['ops']}`")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from agsearch.io import atomic_write_bytes

    key = quality_key(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    roles = sorted({r["role"] for r in rows if r["budget"] is not None})
    markers = {"cutoff": "s--", "best interval": "o-", "AG (x0) at this NFE": "^:"}
    for role in roles:
        pts = sorted((r["nfe"], r["mse"], r[key]) for r in rows if r["role"] == role)
        style = markers.get(role, "D-")
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=role, ms=5)
        axes[1].plot([p[0] for p in pts], [100 * p[2] for p in pts], style, label=role, ms=5)
    for r in rows:
        if r["role"] == "full CFG":
            axes[1].axhline(100 * r[key], color="grey", lw=0.8, ls="--", label="full CFG")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("NFE per sample")
    axes[0].set_ylabel("MSE to full CFG (log)")
    axes[1].set_xlabel("NFE per sample")
    axes[1].set_ylabel("class accuracy %" if key == "accuracy" else "prompt adherence %")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
