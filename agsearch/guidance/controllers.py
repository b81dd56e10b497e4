"""Controllers: per step and per sample, the weights of the guidance ops the sampler runs.

``plan(i, batch, device)`` gives a :class:`StepPlan` before the denoiser runs; ``observe(i, stats)``
sees the step's :class:`~agsearch.guidance.sampler.StepStats` after it ran.

    ``StaticController``   one op per step from a static policy (all samples alike);
    ``AGController``       Adaptive Guidance (Castillo et al., AAAI 2025, arXiv 2312.12487): per
                           sample, CFG while γ_t = cos(pred_c, pred_u) < θ_t, then ``cond`` for the
                           remaining steps; γ in x̂_0 space by default, ε space optional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agsearch.guidance.ops import stops
from agsearch.policy import Policy


@dataclass
class StepPlan:
    ops: list[dict]  # K ops
    weights: torch.Tensor  # (B, K); one-hot rows for a hard policy
    # (B, K) which ops to compute; default ``weights != 0``. The search's straight-through
    # estimator sets it to all-True to get a gradient for every op, not only the chosen one.
    active: torch.Tensor | None = None
    # A controller's ``observe`` may still move a sample's weight to another op whose passes ran
    # for it (a rule that reacts to this step's γ: the adaptive rule's stop scale); the loop mixes
    # the ops with the weights as they are after ``observe``.


@dataclass
class StepStats:
    """What controllers and callbacks may observe after the denoiser ran at step ``i``."""

    i: int
    t: torch.Tensor
    x: torch.Tensor  # (B, ...) the sample before this step
    out_c: torch.Tensor
    out_u: torch.Tensor
    ran_cond: torch.Tensor  # (B,) bool
    ran_uncond: torch.Tensor  # (B,) bool
    both: torch.Tensor  # (B,) bool: γ is defined only where both passes ran
    cosine_x0: torch.Tensor  # (B,) NaN where not both
    cosine_eps: torch.Tensor  # (B,)
    scheduler: object = None  # the trajectory's scheduler, before this step (read-only; copy it to resume)
    out_image: torch.Tensor | None = None  # two-condition guidance: ε(image, ∅); out_c is ε(image, text), out_u ε(∅, ∅)


class StaticController:
    """A static policy: at step i every sample runs ``policy.steps[i]``."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def plan(self, i: int, batch: int, device) -> StepPlan:
        return StepPlan([self.policy.steps[i]], torch.ones(batch, 1, device=device))

    def observe(self, i: int, stats: StepStats) -> None:
        pass


class AGController:
    """Adaptive Guidance: per sample, ``cfg`` while γ_t < θ_t, then ``cond`` for good.

    γ_t is observed at a step where the sample ran both passes (and used CFG); once it reaches the
    step's threshold θ_t the sample runs ``cond`` from the next step on, so its unconditional pass
    is skipped. θ_t is one number for every step (AG) or one per step (a searched rule,
    ``agsearch.search.thresholds``); a guided step runs CFG at the rule's per-step scale if it has one,
    and the step at which a sample stops (both passes ran there) at the rule's stop scale if it has
    one: the plan's third op, which ``observe`` gives the weight of the samples that crossed.

    A two-condition policy (image editing) guides with ``edit`` until γ_t, the agreement of both
    guidance directions (:func:`agsearch.guidance.ops.edit_agreement`), reaches θ_t.
    """

    def __init__(self, policy: Policy):
        T = policy.num_inference_steps
        self.thresholds = [policy.threshold_at(i) for i in range(T)]
        self.scales = [policy.scale_at(i) for i in range(T)]
        self.stop_scales = [policy.stop_scale_at(i) for i in range(T)]
        self.space = policy.rule.get("space", "x0")
        self.guided_op = {"op": "edit"} if policy.conditions == 2 else None  # else cfg at the step's scale
        self.guiding: torch.Tensor | None = None  # (B,) bool
        self._plan: StepPlan | None = None

    def plan(self, i: int, batch: int, device) -> StepPlan:
        if self.guiding is None:
            self.guiding = torch.ones(batch, dtype=torch.bool, device=device)
        g = self.guiding.float()
        ops = [self.guided_op or {"op": "cfg", "scale": self.scales[i]}, {"op": "cond"}]
        weights = [g, 1 - g]
        if self.stop_scales[i] != self.scales[i]:
            ops.append({"op": "cfg", "scale": self.stop_scales[i]})
            weights.append(torch.zeros_like(g))
        self._plan = StepPlan(ops, torch.stack(weights, dim=1))
        return self._plan

    def observe(self, i: int, stats: StepStats) -> None:
        gamma = stats.cosine_x0 if self.space == "x0" else stats.cosine_eps
        crossed = stats.both & stops(gamma, self.thresholds[i])
        self.guiding = self.guiding & ~crossed
        if self._plan is not None and len(self._plan.ops) == 3:  # the crossing samples' CFG at the stop scale
            stop = crossed.to(self._plan.weights.dtype)
            w = self._plan.weights
            self._plan.weights = torch.stack([w[:, 0] * (1 - stop), w[:, 1], w[:, 0] * stop], dim=1)


def controller_for(policy: Policy):
    policy.require_axis("steps")
    if policy.kind == "static":
        return StaticController(policy)
    if policy.rule["rule"] == "ag_cosine":
        return AGController(policy)
    raise ValueError(f"no controller for rule {policy.rule['rule']!r}")


