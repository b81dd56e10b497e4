"""One front for the AR model: quality against passes per token, for guidance policies and CCA.

``agsearch ar-front`` (``run_front``) evaluates, on the same held-out classes and per-sample seeds:
the base model with full CFG, token cutoffs, the per-sample divergence rule (KL and cosine) and
searched token policies; CCA without guidance; CCA with those same policies on top. Each row has
the measured passes per token (1 to 2), class accuracy, FD and, for policies on the base model,
the sequence-level KL to the full-CFG teacher (the search's loss, measured on the policy's own
samples, exactly: no relaxation) so that one can see how well the loss predicts the sampled
quality. Writes ``front.md``, ``front.json`` and ``front.png`` into the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from agsearch.eval.bench import save_figure
from agsearch.io import atomic_write_text
from agsearch.models.digits.data import NULL_CLASS
from agsearch.models.digits_ar import SEQ_LEN, DigitsAR, load_model, tokens_to_images
from agsearch.policy import Policy
from agsearch.tokens import adaptive_policy, cutoff_policy, generate_with_policy

DEFAULT_CUTOFFS = (8, 16, 24, 32, 48)
DEFAULT_RULES = (("kl", 0.3), ("kl", 0.1), ("kl", 0.03), ("cosine", 0.3), ("cosine", 0.1), ("cosine", 0.03))


def effective_scales(policy: Policy, stops: torch.Tensor | None, batch: int) -> torch.Tensor:
    """(B, 64) the scale each token of each sample was drawn with (1: cond)."""
    scales = torch.tensor([policy.scale_at(t) for t in range(SEQ_LEN)])
    if policy.kind == "static":
        guided = torch.tensor([s["op"] == "cfg" for s in policy.steps])
        return torch.where(guided, scales, torch.ones(())).expand(batch, SEQ_LEN)
    positions = torch.arange(SEQ_LEN)[None]
    return torch.where(positions < stops.cpu()[:, None], scales[None], torch.ones(()))


@torch.no_grad()
def sequence_kl(model: DigitsAR, tokens: torch.Tensor, labels: torch.Tensor, scales: torch.Tensor,
                teacher_scale: float) -> torch.Tensor:
    """Σ_t KL(p_policy(· | x_<t) ‖ p_CFG(· | x_<t)) per sample (B,) on the policy's own samples: an
    unbiased estimate of the sequence-level KL(P_policy ‖ P_CFG), the token search's loss."""
    device = tokens.device
    lc = model(tokens, labels).float()
    lu = model(tokens, torch.full_like(labels, NULL_CLASS)).float()
    w = scales.to(device)[:, :, None]
    student = (lu + w * (lc - lu)).log_softmax(-1)
    teacher = (lu + teacher_scale * (lc - lu)).log_softmax(-1)
    return (student.exp() * (student - teacher)).sum(-1).sum(-1)


class FrontEvaluator:
    """Policies on an AR model, scored with the digits classifier (accuracy, FD) on fixed classes and seeds."""

    def __init__(self, samples: int = 1000, seed: int = 1, batch_size: int = 1000, device: str = "cpu"):
        from agsearch.cca import ARDigitsEvaluator

        self.base = ARDigitsEvaluator(samples, seed, batch_size, device)

    def evaluate(self, model: DigitsAR, policy: Policy, model_name: str, family: str,
                 teacher: DigitsAR | None = None, teacher_scale: float | None = None) -> dict:
        ev = self.base
        model = model.to(ev.device).eval()
        tokens, passes, kls = [], [], []
        start = time.perf_counter()
        for lo in range(0, len(ev.seeds), ev.batch_size):
            labels, seeds = ev.labels[lo: lo + ev.batch_size], ev.seeds[lo: lo + ev.batch_size]
            run = generate_with_policy(model, labels, seeds, policy)
            tokens.append(run.tokens)
            passes.append(run.passes.float())
            if teacher is not None:
                kls.append(sequence_kl(teacher, run.tokens, labels, effective_scales(policy, run.stops, len(labels)),
                                       teacher_scale))
        seconds = time.perf_counter() - start
        tokens = torch.cat(tokens)
        accuracy, fd = ev.scorer.score(tokens_to_images(tokens), ev.labels)
        row = {"model": model_name, "family": family, "policy": policy.label(),
               "passes_per_token": round(float(torch.cat(passes).mean()) / SEQ_LEN, 4),
               "accuracy": accuracy, "fd": fd, "seconds": round(seconds, 2), "samples": len(tokens)}
        if kls:
            row["seq_kl"] = float(torch.cat(kls).mean())
        return row


def best_at(rows: list[dict], budget: float) -> dict | None:
    """The most accurate row within ``budget`` passes per token (lower FD breaks ties)."""
    fits = [r for r in rows if r["passes_per_token"] <= budget + 1e-9]
    return max(fits, key=lambda r: (round(r["accuracy"], 4), -r["fd"])) if fits else None


def format_front(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Guidance policies and CCA on the AR digits model: quality against passes per token",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['samples']} held-out samples (balanced classes, seed {meta['seed']}), the same per-sample "
        f"uniforms for every row; teacher and policies at CFG scale s = {meta['guidance_scale']:g} "
        f"(the base model's best by accuracy). Passes per token are measured: 1 conditional pass per token "
        f"plus the unconditional stream's evaluated positions (its KV cache is exact, so a static "
        f"policy pays up to its last guided token; the adaptive rule is one-way). seq KL: "
        f"Σ_t KL(policy ‖ CFG teacher) on the policy's own samples (the search's loss), base model only. "
        f"CCA: λ = {meta['cca']['lam']:g}, {meta['cca']['steps']} steps, {meta['cca']['seconds']:.0f} s.",
        "",
        "| model | policy | family | passes/token | accuracy % | FD | seq KL | seconds |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kl = f"{r['seq_kl']:.2f}" if "seq_kl" in r else "–"
        lines.append(f"| {r['model']} | {r['policy']} | {r['family']} | {r['passes_per_token']:.3f} | "
                     f"{100 * r['accuracy']:.1f} | {r['fd']:.2f} | {kl} | {r['seconds']:.1f} |")
    lines += ["", "## Best at each budget", "",
              "The most accurate row within the budget (lower FD breaks ties), over all models and policies, "
              "and over the base model's policies alone.", "",
              "| passes/token ≤ | best row | accuracy % | FD | best on the base model | accuracy % | FD |",
              "|---:|---|---:|---:|---|---:|---:|"]
    base_rows = [r for r in rows if r["model"] == "base"]
    for budget in meta["answer_budgets"]:
        b, bb = best_at(rows, budget), best_at(base_rows, budget)
        cell = lambda r: (f"{r['model']}: {r['policy']} ({r['passes_per_token']:.3f})", f"{100 * r['accuracy']:.1f}",
                          f"{r['fd']:.2f}") if r else ("–", "–", "–")
        lines.append(f"| {budget:g} | " + " | ".join(cell(b) + cell(bb)) + " |")
    corr = meta.get("loss_vs_quality")
    if corr:
        lines += ["", "## Does the search's loss predict the sampled quality?", "",
                  f"Over the {corr['n']} base-model policies below full CFG: Spearman correlation of seq KL with "
                  f"accuracy {corr['accuracy']:+.2f}, with FD {corr['fd']:+.2f} (−1 with accuracy: a lower KL always "
                  f"means a higher accuracy; with FD, −1 means the FD rises as the policy nears full CFG, whose "
                  f"FD is worse than unguided sampling's on this model)."]
    return "\n".join(lines) + "\n"


def plot_front(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"cutoff": "o-", "adaptive kl": "s--", "adaptive cosine": "^--", "searched": "D:",
              "full CFG": "*", "no guidance": "X"}
    for (model, color) in (("base", "tab:blue"), ("CCA", "tab:red")):
        for family, style in styles.items():
            pts = sorted((r["passes_per_token"], r["accuracy"] * 100, r["fd"]) for r in rows
                         if r["model"] == model and r["family"] == family)
            if not pts:
                continue
            x, acc, fd = zip(*pts)
            kw = dict(color=color, label=f"{model}: {family}", ms=9 if style in ("*", "X") else 5)
            axes[0].plot(x, acc, style, **kw)
            axes[1].plot(x, fd, style, **kw)
    axes[0].set(xlabel="passes per token", ylabel="class accuracy (%)", title="accuracy (higher is better)")
    axes[1].set(xlabel="passes per token", ylabel="FD", title="FD (lower is better)", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run_front(out_dir: Path, samples: int = 1000, seed: int = 1, guidance_scale: float = 3.0,
              budgets=(1.25, 1.5), cutoffs=DEFAULT_CUTOFFS, rules=DEFAULT_RULES, patience: int = 4, warmup: int = 8,
              search_steps: int = 100, cca_lam: float = 1.0, cca_steps: int = 80, batch_size: int = 1000,
              device: str = "cpu", command: str = "agsearch ar-front", extra=(), log=print) -> list[dict]:
    from agsearch.cca import finetune
    from agsearch.search.tokens import search_token_policy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policies_dir = out_dir / "policies"
    policies_dir.mkdir(exist_ok=True)
    base = load_model().to(device)
    evaluator = FrontEvaluator(samples, seed, batch_size, device)

    policies: list[tuple[str, Policy]] = [("full CFG", cutoff_policy(SEQ_LEN, guidance_scale, name="cfg")),
                                          ("no guidance", cutoff_policy(0, guidance_scale, name="cond"))]
    policies += [("cutoff", cutoff_policy(k, guidance_scale)) for k in cutoffs]
    policies += [(f"adaptive {m}", adaptive_policy(m, th, guidance_scale, patience, warmup)) for m, th in rules]
    searches = {}
    for budget in budgets:
        log(f"searching a token policy at {budget:g} passes per token ({search_steps} steps)")
        policy, seconds, _ = search_token_policy(budget, guidance_scale, steps=search_steps, seed=0)
        policy.save(policies_dir / f"searched-{budget:g}.json")
        searches[f"{budget:g}"] = {"seconds": round(seconds, 1), "ops": policy.ops_string(),
                                   "scales": [s.get("scale") for s in policy.steps if s["op"] == "cfg"]}
        policies.append(("searched", policy))
    policies += [("policy file", policy) for policy in extra]
    for family, policy in policies:
        if family in ("cutoff", "full CFG", "no guidance") or family.startswith("adaptive"):
            policy.save(policies_dir / f"{policy.label()}.json")

    log(f"CCA fine-tune (λ = {cca_lam:g}, {cca_steps} steps)")
    cca_model, cca_seconds = finetune(lam=cca_lam, steps=cca_steps, seed=0)
    cca_model = cca_model.to(device)

    rows = []
    for model_name, model in (("base", base), ("CCA", cca_model)):
        for family, policy in policies:
            teacher = base if model_name == "base" else None
            row = evaluator.evaluate(model, policy, model_name, family, teacher, guidance_scale)
            log(f"{model_name:4s} {row['policy']:24s} {row['passes_per_token']:.3f} passes/token, "
                f"accuracy {100 * row['accuracy']:.1f}%, FD {row['fd']:.2f}")
            rows.append(row)
    ranked = [r for r in rows if r["model"] == "base" and "seq_kl" in r and r["passes_per_token"] < 2]
    meta = dict(command=command, samples=samples, seed=seed, guidance_scale=guidance_scale,
                answer_budgets=sorted({1.0, *budgets, 2.0}), patience=patience, warmup=warmup,
                searches=searches, cca=dict(lam=cca_lam, steps=cca_steps, seconds=cca_seconds),
                torch=torch.__version__)
    if len(ranked) >= 3:
        from scipy.stats import spearmanr  # ties get their mean rank

        kl = [r["seq_kl"] for r in ranked]
        meta["loss_vs_quality"] = dict(n=len(ranked), accuracy=float(spearmanr(kl, [r["accuracy"] for r in ranked])[0]),
                                       fd=float(spearmanr(kl, [r["fd"] for r in ranked])[0]))
    atomic_write_text(out_dir / "front.json", json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    atomic_write_text(out_dir / "front.md", format_front(rows, meta))
    plot_front(rows, out_dir / "front.png")
    return rows


__all__ = ["run_front", "sequence_kl", "FrontEvaluator", "format_front", "best_at"]
