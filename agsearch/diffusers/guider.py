"""A diffusers guider (modular pipelines) that executes a static agsearch policy.

diffusers' modular pipelines delegate guidance to a ``guider`` component (``BaseGuidance``): at
each step ``set_state(step, num_inference_steps, timestep)``, then ``num_conditions`` batches are
prepared and run through the denoiser, one forward each, and the guider combines them.
:class:`PolicyGuidance` asks for two batches on a ``cfg`` step (ε_u + w_t (ε_c − ε_u), the
Imagen/diffusers formulation, Ho & Salimans 2022, arXiv 2207.12598) and for the conditional batch
only on a ``cond`` step, so the unconditional forward is really skipped there.

    guider = PolicyGuidance.from_policy(Policy.load("policy.json"))
    pipe.update_components(guider=guider)   # a modular SD/SDXL pipeline

Its config is the policy itself: ``ops`` (one of "cfg"/"cond" per step) and ``scales`` (w_t of each
``cfg`` step; ignored on ``cond`` steps), so every static cfg/cond policy runs, per-step scales
included. An adaptive policy (the Adaptive Guidance rule, Castillo et al., arXiv 2312.12487) runs
**per batch**: the guider sees only the two predictions of the whole batch, so the batch guides while
any of its samples has γ_t = cos(ε_c, ε_u) below the step's threshold θ_t, runs the rule's stop scale
at the step where all of them reach it, then ``cond`` for the remaining steps. The rule must be in ε
space (``agsearch baseline ag --space eps``): x̂₀ needs the sample, which a guider does not see.
An ``uncond`` step runs the unconditional batch only. ``affine`` steps (which need the sample) and
per-sample adaptive rules need the other route, :func:`agsearch.diffusers.hook.apply_policy`.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from agsearch.guidance.ops import cfg, cosine, stops
from agsearch.policy import Policy


class PolicyGuidance(BaseGuidance):
    """Per-step CFG or conditional-only prediction, following a static policy.

    Args:
        ops: one op per sampling step, each "cfg", "cond" or "uncond".
        scales: the guidance scale w_t of each step (> 0; only read on "cfg" steps).
        guidance_rescale: φ of Lin et al. 2023 (arXiv 2305.08891), in [0, 1]; 0 = off.
        enabled: as in every diffusers guider; disabled = conditional prediction at every step.
        thresholds: an adaptive rule: θ_t per step in [-1, 1] (every op then "cfg"); the batch stops
            guiding once every sample's γ_t = cos(ε_c, ε_u) ≥ θ_t.
        stop_scales: the scale of the step at which the batch stops (default: that step's scale).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(self, ops: list[str], scales: list[float], guidance_rescale: float = 0.0, enabled: bool = True,
                 thresholds: list[float] | None = None, stop_scales: list[float] | None = None):
        super().__init__(0.0, 1.0, enabled)
        if not ops:
            raise ValueError("Expected at least one op, but got an empty list")
        bad = [op for op in ops if op not in ("cfg", "cond", "uncond")]
        if bad:
            raise ValueError(f"Expected ops to be 'cfg', 'cond' or 'uncond', but got {bad[0]!r} "
                             "(affine steps need the sample: use agsearch.apply_policy)")
        if len(scales) != len(ops):
            raise ValueError(f"Expected one scale per op ({len(ops)}), but got {len(scales)}")
        for s in scales:
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
                raise ValueError(f"Expected scales to be finite numbers > 0, but got {s!r}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"Expected guidance_rescale to be between 0.0 and 1.0, but got {guidance_rescale}")
        self.ops, self.scales, self.guidance_rescale = list(ops), [float(s) for s in scales], guidance_rescale
        if thresholds is not None:
            if len(thresholds) != len(ops) or any(op != "cfg" for op in ops):
                raise ValueError(f"Expected an adaptive rule to have one threshold per step ({len(ops)}) and every "
                                 f"op 'cfg', but got {len(thresholds)} thresholds")
            for t in thresholds:
                if not (isinstance(t, (int, float)) and -1.0 <= t <= 1.0):
                    raise ValueError(f"Expected thresholds in [-1, 1], but got {t!r}")
        stop_scales = list(stop_scales) if stop_scales is not None else list(self.scales)
        if len(stop_scales) != len(ops) or not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0
                                                   for s in stop_scales):
            raise ValueError(f"Expected one finite stop scale > 0 per step ({len(ops)}), but got {stop_scales!r}")
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]
        self.stop_scales = [float(s) for s in stop_scales]
        self._guiding = True  # the adaptive rule: whether the batch still guides

    @classmethod
    def from_policy(cls, policy: Policy, **kwargs) -> "PolicyGuidance":
        T = policy.num_inference_steps
        scales = [policy.scale_at(i) for i in range(T)]
        if policy.kind == "static":
            return cls(ops=[s["op"] for s in policy.steps], scales=scales, **kwargs)
        if policy.rule.get("rule") != "ag_cosine" or policy.rule.get("space", "x0") != "eps":
            raise ValueError("PolicyGuidance runs the AG cosine rule in eps space only (a guider sees the two "
                             "predictions, not the sample that x0 needs): use agsearch baseline ag --space eps, "
                             "or agsearch.apply_policy for this policy")
        return cls(ops=["cfg"] * T, scales=scales, thresholds=[policy.threshold_at(i) for i in range(T)],
                   stop_scales=[policy.stop_scale_at(i) for i in range(T)], **kwargs)

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:  # a new trajectory
            self._guiding = True

    # -- which passes this step --------------------------------------------------------------------
    def _op(self) -> str:
        if self._num_inference_steps is not None and self._num_inference_steps != len(self.ops):
            raise ValueError(f"the policy has {len(self.ops)} steps but the pipeline runs {self._num_inference_steps}")
        return self.ops[self._step]

    def _is_cfg_enabled(self) -> bool:
        if self._step is None:  # asked before the loop (e.g. whether to encode the negative prompt)
            return self._enabled and ("cfg" in self.ops or "uncond" in self.ops)
        return self._enabled and self._op() == "cfg" and self._guiding

    def _uncond_only(self) -> bool:
        return self._enabled and self._step is not None and self._op() == "uncond"

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_cfg_enabled() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1 and not self._uncond_only()

    # -- batches (as diffusers' ClassifierFreeGuidance) --------------------------------------------
    def _batches(self) -> list[tuple[int, str]]:
        """(index into each (cond, uncond) input pair, prediction name) of this step's batches."""
        if self._uncond_only():
            return [(1, "pred_uncond")]
        return list(zip([0] if self.num_conditions == 1 else [0, 1], self._input_predictions))

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        return [self._prepare_batch(data, i, name) for i, name in self._batches()]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        return [self._prepare_batch_from_block_state(input_fields, data, i, name) for i, name in self._batches()]

    def forward(self, pred_cond: torch.Tensor | None = None, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if self._uncond_only():
            pred = pred_uncond
        elif not self._is_cfg_enabled():
            pred = pred_cond
        else:
            scale = self.scales[self._step]
            if self.thresholds is not None:
                gamma = cosine(pred_cond.float(), pred_uncond.float())
                if bool(stops(gamma, self.thresholds[self._step]).all()):  # the whole batch agrees: stop
                    self._guiding, scale = False, self.stop_scales[self._step]
            pred = cfg(pred_cond, pred_uncond, scale)
            if self.guidance_rescale > 0.0:
                pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
