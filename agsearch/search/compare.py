"""The training-free baselines a searched policy must beat, at the searched policy's NFE.

At NFE = T + k (k guided steps of T) the static competitors are the cutoff (CFG for the first k
steps; one policy) and every guidance interval (CFG on k consecutive steps; T − k + 1 windows,
swept exhaustively, the best chosen by MSE to full CFG — on the evaluation set itself, which
favours the baseline). The Adaptive Guidance rule is matched to the NFE by bisection on its
threshold (its NFE is a mean over samples, so it lands close to, not on, the target).
"""

from __future__ import annotations

from agsearch.baselines import make_baseline
from agsearch.evaluation import DigitsEvaluator, EvalRecord
from agsearch.policy import Policy


def interval_policies(steps: int, scale: float, k: int) -> list[Policy]:
    """Every window of k consecutive CFG steps; the first (start 0) is the cutoff."""
    return [make_baseline("cutoff", steps, scale, fraction=k / steps)] + [
        make_baseline("interval", steps, scale, start=a / steps, stop=(a + k) / steps)
        for a in range(1, steps - k + 1)
    ]


def best_record(records: list[EvalRecord]) -> EvalRecord:
    """Lowest MSE to full CFG; ties go to the earlier (fewer-parameter) policy."""
    return min(records, key=lambda r: r.mse)


def static_baselines(evaluator: DigitsEvaluator, steps: int, scale: float, nfe: int) -> dict[str, EvalRecord]:
    """The cutoff and the best interval at exactly ``nfe`` NFE, evaluated."""
    k = nfe - steps
    if not 0 <= k <= steps:
        raise ValueError(f"no cfg/cond policy of {steps} steps costs {nfe} NFE")
    intervals = [evaluator.evaluate(p) for p in interval_policies(steps, scale, k)]
    return {"cutoff": intervals[0], "interval": best_record(intervals), "intervals": intervals}


def ag_at_nfe(evaluator: DigitsEvaluator, steps: int, scale: float, nfe: float, space: str = "x0",
              iterations: int = 12) -> EvalRecord:
    """The AG rule whose mean NFE is closest to ``nfe``: bisection on the threshold in the
    variable u = −log₁₀(1 − γ̄) ∈ [0, 7], since the useful thresholds crowd just below 1."""
    best: EvalRecord | None = None
    lo, hi = 0.0, 7.0
    for _ in range(iterations):
        u = (lo + hi) / 2
        threshold = round(1 - 10 ** (-u), 8)
        record = evaluator.evaluate(Policy.adaptive(steps, scale, threshold, space, name=f"ag-{space}-{threshold:g}"))
        if best is None or abs(record.nfe - nfe) < abs(best.nfe - nfe):
            best = record
        if abs(record.nfe - nfe) <= 0.05:
            break
        lo, hi = (u, hi) if record.nfe < nfe else (lo, u)
    return best


def pipeline_comparison(module, policy: Policy, samples: int, seed: int, batch_size: int) -> list[dict]:
    """Full CFG, the searched policy and the cutoff at its NFE on a text-to-image pipeline search.

    Held-out pairs: noise seed S·10⁶ + i with prompt i mod N, as in the search's data but with
    ``seed`` S. Each policy runs through ``agsearch.sample`` on the search's own denoiser and
    scheduler; the record holds the mean NFE per sample, the MSE of its final latents against
    full CFG from the same noise and prompt, and the sampling seconds. (No class accuracy or
    Fréchet distance: those need the built-in digits classifier.)
    """
    import time

    import torch

    from agsearch.sampling import sample
    from agsearch.search.data import PairDataset

    backend, device = module.backend, module.device
    backend.to(device)
    T, w = module.num_inference_steps, module.guidance_scale
    policies = [("teacher", Policy.static(["cfg"] * T, w, name="full CFG")), ("searched", policy)]
    if policy.nfe is not None and T <= policy.nfe <= 2 * T:
        policies.append(("cutoff", make_baseline("cutoff", T, w, fraction=(policy.nfe - T) / T)))
    if policy.kind == "adaptive":
        from agsearch.search.adaptive import calibrated_ag

        policies.append(("AG (same calibration)", calibrated_ag(module, policy)))
    pairs = PairDataset(seed, samples, backend.num_conditions).batch(device)
    nfe, sq_error, seconds = ([0.0] * len(policies) for _ in range(3))
    with torch.no_grad():
        for start in range(0, samples, batch_size):
            seeds, labels = pairs["seed"][start:start + batch_size], pairs["label"][start:start + batch_size]
            noise, cond = backend.noise(seeds, device), backend.condition(labels)
            reference = None
            for j, (_, p) in enumerate(policies):
                began = time.perf_counter()
                out = sample(backend.denoiser, backend.scheduler, p, noise, cond)
                seconds[j] += time.perf_counter() - began
                reference = out.samples if reference is None else reference  # full CFG runs first
                nfe[j] += float(out.nfe.sum())
                sq_error[j] += float((out.samples - reference).float().pow(2).flatten(1).mean(1).sum())
    return [{"name": p.label(), "role": role, "nfe": nfe[j] / samples, "mse": sq_error[j] / samples,
             "seconds": seconds[j], "samples": samples} for j, (role, p) in enumerate(policies)]
