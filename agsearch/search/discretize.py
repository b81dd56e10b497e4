"""Turning gate probabilities into a hard policy.

``argmax``: every step takes its most probable op; the NFE is whatever that costs.
``exact``: the assignment with the highest joint log-probability Σ_t log p[t, k_t] whose cost is
exactly the budget — a knapsack over steps solved by dynamic programming in O(T · K · 2T). In the
two-op space (``cfg``/``cond``) this keeps the budget − T steps with the highest ``cfg`` log-odds,
the top-k cutoff rule; with more ops it also picks each guided step's best scale.
"""

from __future__ import annotations

import math

import torch

MODES = ("exact", "argmax")


def discretize(probs: torch.Tensor, costs: list[int], budget: int | None = None, mode: str = "exact") -> list[int]:
    """Indices (T,) of the chosen op per step from probabilities ``probs`` (T, K)."""
    if mode not in MODES:
        raise ValueError(f"Expected discretisation mode in {MODES}, but got {mode!r}")
    logp = probs.detach().double().clamp_min(1e-300).log().cpu()
    T, K = logp.shape
    if len(costs) != K:
        raise ValueError(f"{K} gate columns but {len(costs)} op costs")
    if mode == "argmax":
        return logp.argmax(dim=1).tolist()
    lo, hi = T * min(costs), T * max(costs)
    if budget is None or budget != int(budget) or not lo <= budget <= hi:
        raise ValueError(f"Expected an integer budget between {lo} and {hi} NFE for {T} steps, but got {budget}")
    budget = int(budget)
    # best[t][n]: the best score of steps t.. that spend exactly n NFE; choice[t][n] its op at step t.
    neg = -math.inf
    best = [[neg] * (budget + 1) for _ in range(T + 1)]
    choice = [[-1] * (budget + 1) for _ in range(T)]
    best[T][0] = 0.0
    for t in range(T - 1, -1, -1):
        for n in range(budget + 1):
            for k in range(K):  # ties go to the first op listed (deterministic)
                c = costs[k]
                if c <= n and best[t + 1][n - c] > neg:
                    score = logp[t, k].item() + best[t + 1][n - c]
                    if score > best[t][n]:
                        best[t][n], choice[t][n] = score, k
    if best[0][budget] == neg:
        raise ValueError(f"no assignment of ops with costs {sorted(set(costs))} spends exactly {budget} NFE in {T} steps")
    picks, n = [], budget
    for t in range(T):
        k = choice[t][n]
        picks.append(k)
        n -= costs[k]
    return picks
