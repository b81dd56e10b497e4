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
``cfg`` step; ignored on ``cond`` steps). ``uncond`` steps and adaptive policies need the other
route, :func:`agsearch.diffusers.hook.apply_policy`.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from agsearch.guidance.ops import cfg
from agsearch.policy import Policy


class PolicyGuidance(BaseGuidance):
    """Per-step CFG or conditional-only prediction, following a static policy.

    Args:
        ops: one op per sampling step, each "cfg" or "cond".
        scales: the guidance scale w_t of each step (> 0; only read on "cfg" steps).
        guidance_rescale: φ of Lin et al. 2023 (arXiv 2305.08891), in [0, 1]; 0 = off.
        enabled: as in every diffusers guider; disabled = conditional prediction at every step.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(self, ops: list[str], scales: list[float], guidance_rescale: float = 0.0, enabled: bool = True):
        super().__init__(0.0, 1.0, enabled)
        if not ops:
            raise ValueError("Expected at least one op, but got an empty list")
        bad = [op for op in ops if op not in ("cfg", "cond")]
        if bad:
            raise ValueError(f"Expected ops to be 'cfg' or 'cond', but got {bad[0]!r} "
                             "(uncond steps and adaptive policies: use agsearch.apply_policy)")
        if len(scales) != len(ops):
            raise ValueError(f"Expected one scale per op ({len(ops)}), but got {len(scales)}")
        for s in scales:
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
                raise ValueError(f"Expected scales to be finite numbers > 0, but got {s!r}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"Expected guidance_rescale to be between 0.0 and 1.0, but got {guidance_rescale}")
        self.ops, self.scales, self.guidance_rescale = list(ops), [float(s) for s in scales], guidance_rescale

    @classmethod
    def from_policy(cls, policy: Policy, **kwargs) -> "PolicyGuidance":
        if policy.kind != "static":
            raise ValueError(f"PolicyGuidance executes static policies, got a {policy.kind} one; use agsearch.apply_policy")
        ops = [s["op"] for s in policy.steps]
        return cls(ops=ops, scales=[policy.scale_at(i) for i in range(len(ops))], **kwargs)

    # -- which passes this step --------------------------------------------------------------------
    def _op(self) -> str:
        if self._num_inference_steps is not None and self._num_inference_steps != len(self.ops):
            raise ValueError(f"the policy has {len(self.ops)} steps but the pipeline runs {self._num_inference_steps}")
        return self.ops[self._step]

    def _is_cfg_enabled(self) -> bool:
        if self._step is None:  # asked before the loop (e.g. whether to encode the negative prompt)
            return self._enabled and "cfg" in self.ops
        return self._enabled and self._op() == "cfg"

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_cfg_enabled() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    # -- batches (as diffusers' ClassifierFreeGuidance) --------------------------------------------
    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch_from_block_state(input_fields, data, i, name)
                for i, name in zip(indices, self._input_predictions)]

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if not self._is_cfg_enabled():
            pred = pred_cond
        else:
            pred = cfg(pred_cond, pred_uncond, self.scales[self._step])
            if self.guidance_rescale > 0.0:
                pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
