"""The training-free baselines a searched policy must beat, at the searched policy's NFE.

At NFE = T + k (k guided steps of T) the static competitors are the cutoff (CFG for the first k
steps; one policy) and every guidance interval (CFG on k consecutive steps; T − k + 1 windows,
swept exhaustively, the best chosen by MSE to full CFG — on the evaluation set itself, which
favours the baseline). The Adaptive Guidance rule is matched to the NFE by bisection on its
threshold (its NFE is a mean over samples, so it lands close to, not on, the target).
"""

from __future__ import annotations

from agsearch.baselines import make_baseline
from agsearch.policy import Policy


def interval_policies(steps: int, scale: float, k: int) -> list[Policy]:
    """Every window of k consecutive CFG steps; the first (start 0) is the cutoff."""
    return [make_baseline("cutoff", steps, scale, fraction=k / steps)] + [
        make_baseline("interval", steps, scale, start=a / steps, stop=(a + k) / steps)
        for a in range(1, steps - k + 1)
    ]


def best_record(records: list[dict]) -> dict:
    """Lowest MSE to full CFG; ties go to the earlier (fewer-parameter) policy."""
    return min(records, key=lambda r: r["mse"])


def static_baselines(evaluator, steps: int, scale: float, nfe: int) -> dict:
    """The cutoff and the best interval at exactly ``nfe`` NFE, evaluated (records of any
    :class:`~agsearch.eval.base.Evaluator`)."""
    k = nfe - steps
    if not 0 <= k <= steps:
        raise ValueError(f"no cfg/cond policy of {steps} steps costs {nfe} NFE")
    intervals = evaluator.records(interval_policies(steps, scale, k))
    return {"cutoff": intervals[0], "interval": best_record(intervals), "intervals": intervals}


def ag_at_nfe(evaluator, steps: int, scale: float, nfe: float, space: str = "x0", iterations: int = 12) -> dict:
    """The AG rule whose mean NFE is closest to ``nfe``: bisection on the threshold in the
    variable u = −log₁₀(1 − γ̄) ∈ [0, 7], since the useful thresholds crowd just below 1."""
    best: dict | None = None
    lo, hi = 0.0, 7.0
    for _ in range(iterations):
        u = (lo + hi) / 2
        threshold = round(1 - 10 ** (-u), 8)
        record = evaluator.record(Policy.adaptive(steps, scale, threshold, space, name=f"ag-{space}-{threshold:g}"))
        if best is None or abs(record["nfe"] - nfe) < abs(best["nfe"] - nfe):
            best = record
        if abs(record["nfe"] - nfe) <= 0.05:
            break
        lo, hi = (u, hi) if record["nfe"] < nfe else (lo, u)
    return best


def edit_baselines(steps: int, scale: float, image_scale: float, nfe: int) -> list[Policy]:
    """The two-condition cutoffs at most ``nfe`` NFE: full guidance for the first k steps, then
    ``cond`` (T + 2k NFE), and the image-cutoff, full guidance then text guidance (2T + k NFE),
    each with the largest k that fits."""
    out = []
    for name, base, per in (("cutoff", steps, 2), ("image-cutoff", 2 * steps, 1)):
        k = min(steps, (nfe - base) // per)
        if k >= 0:
            out.append(make_baseline(name, steps, scale, fraction=k / steps, image_scale=image_scale))
    return out


def compare_with_baselines(evaluator, module, policy: Policy, baselines: bool = True, intervals: bool = True) -> list[dict]:
    """The end of a search run: records (with a ``role``) of full CFG, the searched policy and the
    baselines at its NFE on ``evaluator``'s held-out noise and conditions.

    Baselines: for an adaptive policy, AG with one threshold calibrated to the same budget on the
    same calibration pairs; for a static one, the cutoff and, with ``intervals``, the best of every
    guidance interval at the same NFE."""
    T, w = module.num_inference_steps, module.guidance_scale
    full = module.teacher_policy() if hasattr(module, "teacher_policy") else Policy.static(["cfg"] * T, w)
    full = Policy.from_dict({**full.to_dict(), "name": "full CFG" if policy.conditions == 1 else "full guidance"})
    teacher, searched = evaluator.records([full, policy])
    records = [{**teacher, "role": "teacher"}, {**searched, "role": "searched"}]
    if not baselines:
        return records
    if policy.conditions == 2:
        found = edit_baselines(T, w, policy.image_guidance_scale, policy.nfe)
        return records + [{**r, "role": p.provenance["baseline"]} for p, r in zip(found, evaluator.records(found))]
    if policy.kind == "adaptive":
        from agsearch.search.thresholds import calibrated_ag

        return records + [{**evaluator.record(calibrated_ag(module, policy)), "role": "AG (same calibration)"}]
    if policy.nfe is None or not T <= policy.nfe <= 2 * T:
        return records
    if not intervals:
        cutoff = make_baseline("cutoff", T, w, fraction=(policy.nfe - T) / T)
        return records + [{**evaluator.record(cutoff), "role": "cutoff"}]
    found = static_baselines(evaluator, T, w, policy.nfe)
    best = found["interval"]
    return records + [{**found["cutoff"], "role": "cutoff"},
                      {**best, "name": f"best of {len(found['intervals'])} intervals: {best['name']}",
                       "role": "best interval"}]
