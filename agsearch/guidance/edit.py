"""The sampling loop of two-condition guidance (image editing, InstructPix2Pix: arXiv 2211.09800).

As :func:`agsearch.guidance.sampler.sample`, with the three passes of an editor — ε_IT = ε(image,
text), ε_I = ε(image, ∅), ε_∅ = ε(∅, ∅) — instead of two: at every step a controller gives, per
sample, weights over two-condition ops (``edit``, ``text``, ``joint``, ``cond``; formulas in
:mod:`agsearch.guidance.ops`); the loop runs only the passes some weight needs, per sample, mixes
the op outputs with the weights (gradients flow through soft weights) and takes a scheduler step.
Static policies run through ``StaticController``, the adaptive rule through ``AGController`` on
γ_t = min(cos(x̂0_IT, x̂0_I), cos(x̂0_I, x̂0_∅)) (:func:`agsearch.guidance.ops.edit_agreement`).

The denoiser implements ``__call__(x, t, cond, run_full, run_image, run_none) -> (ε_IT, ε_I, ε_∅)``
(:class:`agsearch.denoisers.edit.UNetEditDenoiser`).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from agsearch.guidance.controllers import StepStats, controller_for
from agsearch.guidance.ops import edit_agreement, edit_op_passes, edit_output, predict_x0
from agsearch.guidance.sampler import SampleOutput
from agsearch.policy import Policy


def sample_edit(denoiser, scheduler, policy: Policy | None, noise: torch.Tensor, cond, *, controller=None,
                callback: Callable[[StepStats], None] | None = None) -> SampleOutput:
    """Sample edits from ``noise`` (B, ...) under ``cond`` (an
    :class:`~agsearch.denoisers.edit.EditCondition`) following a two-condition ``policy``.

    ``controller`` replaces the policy's own (the search's soft gates; it then provides
    ``num_inference_steps``, ``guidance_scale`` and ``image_guidance_scale``). The output's
    ``cosine_x0``/``cosine_eps`` hold γ_t of both guidance directions, NaN where a pass was skipped.
    """
    if controller is None:
        if policy is None:
            raise ValueError("sample_edit() needs a policy or a controller")
        policy.require_conditions(2, "an image editor")
        controller = controller_for(policy)
    source = policy if policy is not None else controller
    num_steps = source.num_inference_steps
    scale, image_scale = float(source.guidance_scale), float(source.image_guidance_scale)
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    parameterisation = getattr(denoiser, "parameterisation", None) or scheduler.config.get("prediction_type", "epsilon")

    batch = noise.shape[0]
    nfe = torch.zeros(batch, device=noise.device)
    nan = torch.full((num_steps, batch), float("nan"), device=noise.device)
    cos_x0, cos_eps = nan.clone(), nan.clone()
    shape = (batch,) + (1,) * (x.dim() - 1)
    for i, t in enumerate(scheduler.timesteps):
        plan = controller.plan(i, batch, noise.device)
        active = plan.weights != 0 if plan.active is None else plan.active | (plan.weights != 0)  # (B, K)
        needs = torch.tensor([edit_op_passes(op) for op in plan.ops], device=noise.device)  # (K, 3)
        run = [(active & needs[:, p]).any(dim=1) for p in range(3)]  # full, image, none: (B,) each
        x_in = scheduler.scale_model_input(x, t)
        e_full, e_image, e_none = denoiser(x_in, t, cond, *run)
        nfe += sum(r.float() for r in run)

        every = run[0] & run[1] & run[2]
        with torch.no_grad():
            if every.any():
                x0 = [predict_x0(scheduler, x, e.detach(), t, i, parameterisation) for e in (e_full, e_image, e_none)]
                cos_x0[i] = torch.where(every, edit_agreement(*x0), cos_x0[i])
                cos_eps[i] = torch.where(every, edit_agreement(e_full.detach(), e_image.detach(), e_none.detach()),
                                         cos_eps[i])
        stats = StepStats(i, t, x, e_full, e_none, run[0], run[2], every, cos_x0[i], cos_eps[i], scheduler,
                          out_image=e_image)
        controller.observe(i, stats)
        if callback is not None:
            callback(stats)

        model_output = 0
        for k, op in enumerate(plan.ops):  # Σ_k w_k · op_k; an op whose passes did not run has weight 0
            ran = torch.stack([run[p] | ~needs[k, p] for p in range(3)]).all(dim=0)
            w = plan.weights[:, k]
            if w.requires_grad and not bool(ran.all()):
                w = torch.where(ran, w, w.detach())
            model_output = model_output + w.view(shape) * edit_output(op, e_full, e_image, e_none, scale, image_scale)
        x = scheduler.step(model_output, t, x).prev_sample
    return SampleOutput(x, nfe, cos_x0, cos_eps)
