"""Denoiser adapters: a model behind the one contract the sampler calls (:class:`Denoiser`).

    ``class_conditional.ClassConditionalDenoiser``   a class-conditional UNet (the digits model)
    ``text.UNetTextDenoiser``, ``text.SD3TextDenoiser``   diffusers text-to-image denoisers
"""

from __future__ import annotations

from typing import Protocol

import torch


class Denoiser(Protocol):
    """The adapter contract every model backend implements.

    ``__call__(x, t, cond, run_cond, run_uncond)`` evaluates the model on the (already
    scheduler-scaled) sample ``x`` (B, ...) at timestep ``t``: the conditional pass for the samples
    where the bool mask ``run_cond`` (B,) is set, the unconditional (null or negative condition)
    pass where ``run_uncond`` is set, both batched into one forward where possible. It returns
    ``(out_c, out_u)``, each (B, ...) in the model's prediction type; rows not run are zeros.

    ``parameterisation`` says what that prediction is — ``"epsilon"``, ``"v_prediction"`` or
    ``"flow"`` (the velocity ε − x_0 of rectified flow) — so that x̂_0 and the cosine γ can be
    computed from it (:func:`agsearch.guidance.ops.predict_x0`).
    """

    parameterisation: str

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond, run_cond: torch.Tensor,
                 run_uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
