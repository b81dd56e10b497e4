"""The one sampling loop: it executes guidance policies (hard or soft) over a diffusers scheduler.

At every step a *controller* gives, per sample, weights over a list of guidance ops (``cfg`` at a
scale, ``cond``, ``uncond``, ``affine``). The loop runs only the denoiser passes that some weight needs — per
sample, so a sample that skips its unconditional pass really costs one evaluation less — mixes
the op outputs with the weights (the DARTS mixed op, ``sum(w * op)``) and takes a scheduler step.
One-hot weights are a hard policy; dense weights are the relaxed gates the search trains, and
gradients flow through them: the caller picks the grad context.

``affine`` (LinearAG, ``agsearch.linear_ag``) replaces the unconditional pass by ε̂_u, an affine map
of ε_c(t), the previous step's ε_c(t−1) and ε_u(t−1), x_t and a bias. The loop carries those past
estimates per sample, with an availability p ∈ [0, 1]: the weight of the previous step's ops
that provided them (1 or 0 for a hard policy; ``cond`` provides no ε_u, an ``affine`` step
provides its ε̂_u). The op's output is p · affine CFG + (1 − p) · its ``fallback`` (``cond`` or
``cfg``), so soft gates get gradients through p as well; without a fallback, a sample that
reaches an affine step with p < 1 is an error.

A two-condition denoiser (an image editor, InstructPix2Pix: arXiv 2211.09800) runs
:func:`sample_edit`: the same loop with the three passes of an editor — ε_IT = ε(image, text),
ε_I = ε(image, ∅), ε_∅ = ε(∅, ∅) — and the two-condition ops (``edit``, ``text``, ``joint``,
``cond``); the adaptive rule observes γ_t = min(cos(x̂0_IT, x̂0_I), cos(x̂0_I, x̂0_∅))
(:func:`agsearch.guidance.ops.edit_agreement`). Its denoiser implements
``__call__(x, t, cond, run_full, run_image, run_none) -> (ε_IT, ε_I, ε_∅)``
(:class:`agsearch.denoisers.edit.UNetEditDenoiser`).

The controllers that give the weights are in :mod:`agsearch.guidance.controllers`, every formula in
:mod:`agsearch.guidance.ops`; the denoiser is anything that implements :class:`agsearch.denoisers.Denoiser`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from agsearch.denoisers import Denoiser
from agsearch.guidance.controllers import StepStats, controller_for
from agsearch.guidance.ops import (
    PastEstimates,
    affine_output,
    cosine,
    edit_agreement,
    edit_op_passes,
    edit_output,
    op_output,
    op_passes,
    predict_x0,
)
from agsearch.policy import Policy


@dataclass
class Resume:
    """A trajectory paused before step ``i``: the sample ``x`` and a copy of its scheduler (set up for
    the run's step count, with any multistep history), e.g. taken from a callback's ``StepStats``."""

    i: int
    x: torch.Tensor
    scheduler: object

    def repeat(self, n: int) -> "Resume":
        """The same paused trajectory ``n`` times over in one batch (rows ``[j·B, (j+1)·B)`` are copy
        j): ``x`` and every per-sample tensor of the scheduler's state (a multistep history of
        model outputs, shaped like ``x``) are tiled."""
        return self._map(lambda value: value.repeat(n, *([1] * (value.dim() - 1))))

    def part(self, j: int, n: int) -> "Resume":
        """Copy j of a batch of ``n`` trajectories (rows ``[j·B, (j+1)·B)``, ``B = len(x) / n``), e.g.
        one policy of several run together from ``repeat(n)``."""
        B = self.x.shape[0] // n
        return self._map(lambda value: value[j * B:(j + 1) * B].clone())

    def _map(self, rows) -> "Resume":
        """``rows`` applied to ``x`` and to every per-sample tensor of (a copy of) the scheduler."""
        shape = tuple(self.x.shape)

        def apply(value):
            if isinstance(value, torch.Tensor) and tuple(value.shape) == shape:
                return rows(value)
            if isinstance(value, list):
                return [apply(v) for v in value]
            if isinstance(value, tuple):
                return tuple(apply(v) for v in value)
            return value

        scheduler = copy.deepcopy(self.scheduler)
        for name, value in vars(scheduler).items():
            setattr(scheduler, name, apply(value))
        return Resume(self.i, apply(self.x), scheduler)


@dataclass
class SampleOutput:
    samples: torch.Tensor  # (B, ...) final samples
    nfe: torch.Tensor  # (B,) denoiser evaluations per sample (exact count)
    cosine_x0: torch.Tensor  # (T, B) γ_t in x̂_0 space, NaN where a pass was skipped
    cosine_eps: torch.Tensor  # (T, B)


def sample(
    denoiser: Denoiser,
    scheduler,
    policy: Policy | None,
    noise: torch.Tensor,
    cond,
    *,
    controller=None,
    callback: Callable[[StepStats], None] | None = None,
    resume: Resume | None = None,
) -> SampleOutput:
    """Sample from ``noise`` (B, ...) under ``cond`` following a guidance ``policy``.

    ``scheduler`` is a diffusers scheduler; it is copied, so every call starts a fresh
    trajectory. ``controller`` replaces the policy's own controller (the search passes soft
    gates; it then also provides ``num_inference_steps`` and ``guidance_scale``). ``callback``
    observes each step's :class:`StepStats` and must not modify them. ``resume`` continues a paused
    trajectory from its step ``i`` (``noise`` then only gives the batch size and device; the NFE
    counts the steps run here; an ``affine`` op finds no past estimates at the first step run).
    A two-condition denoiser (``conditions = 2``: an image editor) runs
    :func:`sample_edit`.
    """
    if getattr(denoiser, "conditions", 1) == 2:  # an image editor: three passes
        return sample_edit(denoiser, scheduler, policy, noise, cond, controller=controller, callback=callback,
                           resume=resume)
    if controller is None:
        if policy is None:
            raise ValueError("sample() needs a policy or a controller")
        controller = controller_for(policy.require_conditions(1, "a one-condition denoiser"))
    num_steps = policy.num_inference_steps if policy is not None else controller.num_inference_steps
    # A `cfg` op without its own scale runs at the policy's (or the controller's) guidance scale.
    if policy is None and not hasattr(controller, "guidance_scale"):
        raise ValueError("a controller used without a policy must define guidance_scale (the scale of a cfg op without its own)")
    default_scale = float(policy.guidance_scale if policy is not None else controller.guidance_scale)
    if resume is None:
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(num_steps, device=noise.device)
        x, first = noise * getattr(scheduler, "init_noise_sigma", 1.0), 0  # flow matching: none (1)
    else:
        scheduler, x, first = copy.deepcopy(resume.scheduler), resume.x, resume.i
    if len(scheduler.timesteps) != num_steps:
        raise ValueError(f"scheduler made {len(scheduler.timesteps)} timesteps for {num_steps} steps")

    # x̂₀ needs the model's parameterisation: the adapter's, else the scheduler config's prediction_type.
    parameterisation = getattr(denoiser, "parameterisation", None) or scheduler.config.get("prediction_type", "epsilon")
    batch = noise.shape[0]
    nfe = torch.zeros(batch, device=noise.device)
    nan = torch.full((num_steps, batch), float("nan"), device=noise.device)
    cos_x0, cos_eps = nan.clone(), nan.clone()
    past = PastEstimates.none(noise)
    for i, t in enumerate(scheduler.timesteps):
        if i < first:
            continue
        plan = controller.plan(i, batch, noise.device)
        active = plan.weights != 0 if plan.active is None else plan.active | (plan.weights != 0)  # (B, K)
        avail = torch.stack([past.availability(op) for op in plan.ops], dim=1)  # (B, K) p per op
        needs = torch.tensor([op_passes(op) for op in plan.ops], device=noise.device)  # (K, 2)
        need_c = needs[:, 0].expand(batch, -1)  # (B, K)
        need_u = needs[:, 1].expand(batch, -1).clone()
        for k, op in enumerate(plan.ops):
            if op["op"] != "affine":
                continue
            missing = active[:, k] & (avail[:, k] < 1)
            if op.get("fallback") == "cfg":
                need_u[:, k] = missing
            elif op.get("fallback") is None and bool(missing.any()):
                why = "it is the first step" if i == 0 else "the previous step did not provide them"
                raise ValueError(f"step {i}: an affine op needs the previous step's estimates, but {why} "
                                 f"(for {int(missing.sum())} samples) and it has no fallback")
        run_cond = (active & need_c).any(dim=1)
        run_uncond = (active & need_u).any(dim=1)

        # Flow-matching schedulers feed the model x itself and have no scale_model_input.
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out_c, out_u = denoiser(x_in, t, cond, run_cond, run_uncond)
        nfe += run_cond.float() + run_uncond.float()

        both = run_cond & run_uncond
        with torch.no_grad():
            if both.any():
                x0_c = predict_x0(scheduler, x, out_c.detach(), t, i, parameterisation)
                x0_u = predict_x0(scheduler, x, out_u.detach(), t, i, parameterisation)
                cos_x0[i] = torch.where(both, cosine(x0_c, x0_u), cos_x0[i])
                cos_eps[i] = torch.where(both, cosine(out_c.detach(), out_u.detach()), cos_eps[i])
        stats = StepStats(i, t, x, out_c, out_u, run_cond, run_uncond, both, cos_x0[i], cos_eps[i], scheduler)
        controller.observe(i, stats)
        if callback is not None:
            callback(stats)

        # Mixed op: Σ_k w_k · op_k. With one-hot weights this is exactly the chosen op's output.
        # An op whose passes did not run for a sample has weight 0 there; its (meaningless)
        # output must not feed the weight's gradient either, so that weight is detached.
        # What each op provides to the next step (for affine ops): ε_c where the conditional
        # pass ran, ε_u from cfg/uncond and ε̂_u from affine, weighted like the outputs.
        shape = (batch,) + (1,) * (x.dim() - 1)
        model_output = 0
        have_c = have_u = torch.zeros(batch, device=noise.device)
        sum_u = torch.zeros_like(x)
        for k, op in enumerate(plan.ops):
            ran = (run_cond | ~need_c[:, k]) & (run_uncond | ~need_u[:, k])  # (B,)
            w = plan.weights[:, k]
            if w.requires_grad and not bool(ran.all()):
                w = torch.where(ran, w, w.detach())
            if op["op"] == "affine":
                output, provided_u, gives_u = affine_output(op, out_c, out_u, x, past, avail[:, k], default_scale)
            else:
                output = op_output(op, out_c, out_u, default_scale)
                gives_u = torch.full_like(w, float(op["op"] in ("cfg", "uncond")))
                provided_u = gives_u.view(shape) * out_u
            model_output = model_output + w.view(shape) * output
            have_c = have_c + w * float(op["op"] != "uncond")
            have_u = have_u + w * gives_u
            sum_u = sum_u + w.view(shape) * provided_u
        # ε_u(t) for the next step: the providers' weighted mean (zero where none provided it).
        past = PastEstimates(out_c, sum_u / have_u.clamp_min(1e-12).view(shape), have_c, have_u)
        x = scheduler.step(model_output, t, x).prev_sample
    return SampleOutput(x, nfe, cos_x0, cos_eps)


def sample_edit(denoiser, scheduler, policy: Policy | None, noise: torch.Tensor, cond, *, controller=None,
                callback: Callable[[StepStats], None] | None = None, resume: Resume | None = None) -> SampleOutput:
    """Sample edits from ``noise`` (B, ...) under ``cond`` (an
    :class:`~agsearch.denoisers.edit.EditCondition`) following a two-condition ``policy``.

    ``controller`` replaces the policy's own (the search's soft gates; it then provides
    ``num_inference_steps``, ``guidance_scale`` and ``image_guidance_scale``). The output's
    ``cosine_x0``/``cosine_eps`` hold γ_t of both guidance directions, NaN where a pass was skipped.
    ``resume`` continues a paused trajectory from its step ``i``, as in :func:`sample`.
    """
    if controller is None:
        if policy is None:
            raise ValueError("sample_edit() needs a policy or a controller")
        policy.require_conditions(2, "an image editor")
        controller = controller_for(policy)
    source = policy if policy is not None else controller
    num_steps = source.num_inference_steps
    scale, image_scale = float(source.guidance_scale), float(source.image_guidance_scale)
    if resume is None:
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(num_steps, device=noise.device)
        x, first = noise * getattr(scheduler, "init_noise_sigma", 1.0), 0
    else:
        scheduler, x, first = copy.deepcopy(resume.scheduler), resume.x, resume.i
    parameterisation = getattr(denoiser, "parameterisation", None) or scheduler.config.get("prediction_type", "epsilon")

    batch = noise.shape[0]
    nfe = torch.zeros(batch, device=noise.device)
    nan = torch.full((num_steps, batch), float("nan"), device=noise.device)
    cos_x0, cos_eps = nan.clone(), nan.clone()
    shape = (batch,) + (1,) * (x.dim() - 1)
    for i in range(first, num_steps):
        t = scheduler.timesteps[i]
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
