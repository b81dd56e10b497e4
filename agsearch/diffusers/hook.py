"""Run agsearch guidance policies inside unmodified diffusers pipelines.

``with apply_policy(pipe, policy): pipe(prompt, negative_prompt=..., num_inference_steps=T,
guidance_scale=w)`` makes an ordinary pipeline call follow ``policy`` (static, per-step scales,
LinearAG's affine steps, or the adaptive rule):

* a ``cfg`` step runs both passes, at the step's own scale (else the policy's);
* a ``cond`` step runs only the conditional pass: the unconditional one is not run at all;
* an ``affine`` step (LinearAG) runs the conditional pass and replaces the unconditional one by
  the affine map of the previous step's estimates, which the hook carries from step to step;
* the Adaptive Guidance rule (Castillo et al., AAAI 2025, arXiv 2312.12487) runs per sample
  through :class:`agsearch.guidance.controllers.AGController`: CFG while γ_t = cos(x̂0_c, x̂0_u) < γ̄,
  then ``cond`` for that sample's remaining steps.

Diffusers pipelines do CFG in one of three patterns, and one mechanism serves them all:

* **batched** (SD, SDXL, SD3, PixArt-α/Σ, Sana): one denoiser call per step on
  ``[unconditional rows; conditional rows]``. The hook runs only the rows some sample needs (the
  batch really shrinks) and hands back each sample's output in both halves, so the pipeline's own
  ``ε_u + W (ε_c − ε_u)`` returns it unchanged whatever its scale W;
* **three-way** (InstructPix2Pix, which guides on the input image and the instruction; a policy
  with ``"conditions": 2``): one call on ``[ε(image, text); ε(image, ∅); ε(∅, ∅)]`` thirds, handled
  like the batched pattern by :class:`EditRunner`;
* **two calls** (Wan 2.1/2.2, Flux with ``true_cfg_scale``, Qwen-Image): the conditional call, then
  the unconditional one. The hook answers the first with ε_c; at the second it runs only the rows
  that need it (none on a ``cond`` step) and writes each sample's output into the tensor it
  returned for the first call and returns the same, so the pipeline's arithmetic again returns it.

Each family declares, in :data:`FAMILIES`, which attribute holds the denoiser (Wan 2.2 has two
experts), its pattern, what the denoiser predicts and the pipeline's own post-CFG rescaling, which
the hook then applies to the steps it guides itself (SD/SDXL's ``guidance_rescale``, Qwen-Image's
norm rescale). A step that is plain CFG at the call's own scale in a batched pipeline whose scale is
known runs the pipeline's own forward untouched.

How: for the duration of the ``with`` block the denoisers' ``forward`` is wrapped by an instance
attribute, the scheduler's ``set_timesteps`` (which every pipeline call runs once, first) starts a
new trajectory and its ``step`` (once per sampling step) closes a step; all are removed on exit,
also on an exception, leaving the pipeline as it was. The call must build the unconditional inputs
when the policy needs them (``guidance_scale > 1``; Flux and Qwen-Image: ``true_cfg_scale > 1`` and
a negative prompt); a policy that needs them in a call that does not is an error, not a silent
conditional-only run.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from agsearch.guidance.controllers import AGController, StepStats, controller_for
from agsearch.guidance.ops import (PastEstimates, affine_output, cfg, cosine, edit_agreement, edit_op_passes, edit_output,
                                   op_passes, predict_x0)
from agsearch.linear_ag import needs_past
from agsearch.policy import Policy


@dataclass(frozen=True)
class Family:
    """How the pipelines of one family run CFG.

    classes: diffusers pipeline class names.
    denoisers: the attributes that hold the denoiser(s), in the order the pipeline may use them.
    pattern: ``batched`` (one call on [uncond; cond] halves), ``two_calls`` (cond call, then uncond) or
        ``three_way`` (an editor: one call on [image+text; image; neither] thirds).
    parameterisation: ``flow``, or None for the scheduler's ``prediction_type``.
    rescale: the pipeline's rescaling of a guided prediction: ``std`` (``guidance_rescale``, Lin et al.
        2023, arXiv 2305.08891) or ``norm`` (Qwen-Image: the guided prediction takes ε_c's norm per token).
    scale_known: the call's scale is readable (``pipe.guidance_scale``), so plain CFG at it can run
        the pipeline's own forward.
    cfg_flag: batched: where the call says whether it built the unconditional half: ``property``
        (``pipe.do_classifier_free_guidance``) or ``encode_prompt`` (its argument of that name; PixArt
        keeps the flag in a local variable).
    """

    classes: tuple[str, ...]
    denoisers: tuple[str, ...]
    pattern: str = "batched"
    parameterisation: str | None = None
    rescale: str | None = None
    scale_known: bool = True
    cfg_flag: str = "property"


FAMILIES = (
    Family(("StableDiffusionPipeline", "StableDiffusionXLPipeline"), ("unet",), rescale="std"),
    Family(("StableDiffusion3Pipeline",), ("transformer",), parameterisation="flow"),
    Family(("PixArtAlphaPipeline", "PixArtSigmaPipeline"), ("transformer",), scale_known=False,
           cfg_flag="encode_prompt"),
    Family(("SanaPipeline",), ("transformer",), parameterisation="flow"),
    Family(("WanPipeline",), ("transformer", "transformer_2"), "two_calls", "flow"),
    Family(("FluxPipeline",), ("transformer",), "two_calls", "flow"),
    Family(("QwenImagePipeline",), ("transformer",), "two_calls", "flow", rescale="norm"),
    Family(("StableDiffusionInstructPix2PixPipeline",), ("unet",), "three_way"),
)
SUPPORTED = tuple(name for family in FAMILIES for name in family.classes)
ENABLE_UNCOND = {"batched": "pass guidance_scale > 1",
                 "two_calls": "pass guidance_scale > 1 (Wan) or true_cfg_scale > 1 and a negative_prompt "
                              "(Flux, Qwen-Image)",
                 "three_way": "pass guidance_scale > 1 and image_guidance_scale >= 1"}


def family_of(pipe) -> Family:
    """The :class:`Family` of a pipeline instance (its exact class; subclasses are not assumed to
    run CFG the same way), or ``ValueError`` naming the supported classes."""
    name = type(pipe).__name__
    for family in FAMILIES:
        if name in family.classes and type(pipe).__module__.startswith("diffusers"):
            return family
    raise ValueError(f"pipeline class {name!r} is not supported; supported: {', '.join(SUPPORTED)}")


def pipeline_x(scheduler, x_in: torch.Tensor, i: int, parameterisation: str) -> torch.Tensor:
    """The unscaled sample behind the model input ``x_in`` at step ``i`` (σ-parameterised
    schedulers feed the model x / sqrt(σ² + 1); flow matching feeds x itself)."""
    if parameterisation != "flow" and float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        return x_in * (scheduler.sigmas[i].to(x_in) ** 2 + 1).sqrt()
    return x_in


def pipeline_x0(scheduler, x_in: torch.Tensor, out: torch.Tensor, t, i: int, parameterisation: str) -> torch.Tensor:
    """x̂0 implied by a denoiser output ``out`` on the model input ``x_in`` at step ``i``:
    :func:`agsearch.guidance.ops.predict_x0` on the unscaled sample. A denoiser that also predicts
    its variance (PixArt: twice the channels) gives x̂0 from its first half."""
    if out.dim() > 1 and out.shape[1] == 2 * x_in.shape[1]:
        out = out[:, : x_in.shape[1]]
    return predict_x0(scheduler, pipeline_x(scheduler, x_in, i, parameterisation), out, t, i, parameterisation)


def _select_rows(value, rows: torch.Tensor, full: int):
    """``value`` with every tensor (or list) whose leading size is the denoiser batch cut to ``rows``."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == full:
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, list) and len(value) == full and full > 1:
        return [value[j] for j in rows.tolist()]
    if isinstance(value, dict):
        return {k: _select_rows(v, rows, full) for k, v in value.items()}
    return value


def _rescaled(kind: str | None, guided: torch.Tensor, out_c: torch.Tensor, phi: float) -> torch.Tensor:
    """The pipeline's own rescaling of a guided prediction (as its code does it, so plain CFG is
    reproduced bit for bit)."""
    if kind == "norm":
        return guided * (torch.norm(out_c, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
    if kind == "std" and phi > 0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        return rescale_noise_cfg(guided, out_c, guidance_rescale=phi)
    return guided


@dataclass
class _Step:
    """One sampling step under way: the plan and what the passes returned so far."""

    i: int
    ops: list[dict]
    scales: list[float | None]
    need: torch.Tensor  # (N, 2) bool: conditional, unconditional pass per sample
    x_in: torch.Tensor  # (N, ...) the model input of the conditional rows
    t: torch.Tensor
    out_c: torch.Tensor | None = None  # two calls: the tensor handed back for the conditional call
    uncond_call: bool = False


class PolicyRunner:
    """The state of :func:`apply_policy`: installs and removes the wrappers, runs each step.

    After a pipeline call, ``nfe`` (N,) holds the denoiser evaluations per image of that call
    (N = batch × num_images_per_prompt), ``ops`` the op each image ran at each step (T lists of
    N op names), ``gammas`` the adaptive rule's γ_t per step and ``forward_rows`` the total rows
    the denoisers evaluated.
    """

    def __init__(self, pipe, policy: Policy | str | Path, resample: bool = False):
        self.pipe = pipe
        self.family = family_of(pipe)
        self.denoisers = [getattr(pipe, name) for name in self.family.denoisers if getattr(pipe, name, None) is not None]
        if not self.denoisers:
            raise ValueError(f"{type(pipe).__name__} has no denoiser ({' or '.join(self.family.denoisers)})")
        self.parameterisation = self.family.parameterisation or pipe.scheduler.config.get("prediction_type", "epsilon")
        self.policy = policy if isinstance(policy, Policy) else Policy.load(policy)
        self.policy.require_conditions(2 if self.family.pattern == "three_way" else 1, type(pipe).__name__)
        if self.family.pattern == "two_calls" and any(step["op"] == "uncond" for step in self.policy.steps or []):
            raise ValueError(f"uncond steps cannot run in {type(pipe).__name__}, which makes the conditional call "
                             "first; use cfg or cond there")
        self.resample = resample
        # Affine steps need the previous step's estimates: the hook keeps them only then.
        self._carries_estimates = any(step["op"] == "affine" for step in self.policy.steps or [])
        self._forwards = {id(d): d.forward for d in self.denoisers}  # the bound forwards (or hooks there now)
        self._signatures = {id(d): inspect.signature(d.forward) for d in self.denoisers}
        self.step: int | None = None  # None outside a pipeline call
        self.nfe: torch.Tensor | None = None
        self.ops: list[list[str]] = []
        self.forward_rows = 0
        self.gammas: list[torch.Tensor] = []  # adaptive rule: γ_t (N,) per step, NaN where not both
        self._saved: list[tuple[object, str, bool, object]] = []
        self._current: _Step | None = None
        self._cfg_built = True  # cfg_flag "encode_prompt": what the call's encode_prompt was told

    # -- install / remove -------------------------------------------------------------------------
    def install(self) -> None:
        if any(getattr(d.forward, "_agsearch_runner", None) is not None for d in self.denoisers):
            raise ValueError("apply_policy is already active on this pipeline; nested policies are not supported")
        scheduler = self.pipe.scheduler

        @functools.wraps(scheduler.set_timesteps)
        def set_timesteps(*args, _orig=scheduler.set_timesteps, **kwargs):
            result = _orig(*args, **kwargs)
            self._start()
            return result

        @functools.wraps(scheduler.step)
        def step(*args, _orig=scheduler.step, **kwargs):
            self._end_step()
            return _orig(*args, **kwargs)

        self._patch(scheduler, "set_timesteps", set_timesteps)
        self._patch(scheduler, "step", step)
        if self.family.cfg_flag == "encode_prompt":
            encode, signature = self.pipe.encode_prompt, inspect.signature(self.pipe.encode_prompt)

            @functools.wraps(encode)
            def encode_prompt(*args, **kwargs):
                self._cfg_built = bool(signature.bind(*args, **kwargs).arguments.get("do_classifier_free_guidance", True))
                return encode(*args, **kwargs)

            self._patch(self.pipe, "encode_prompt", encode_prompt)
        for denoiser in self.denoisers:
            key = id(denoiser)

            @functools.wraps(self._forwards[key])
            def forward(*args, _key=key, **kwargs):
                return self._call(_key, *args, **kwargs)

            forward._agsearch_runner = self
            self._patch(denoiser, "forward", forward)

    def _patch(self, obj, name: str, value) -> None:
        had = name in obj.__dict__
        self._saved.append((obj, name, had, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def remove(self) -> None:
        while self._saved:
            obj, name, had, old = self._saved.pop()
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

    # -- one pipeline call -----------------------------------------------------------------------
    def _start(self) -> None:
        self.step, self.controller, self.nfe, self.ops, self.gammas = 0, None, None, [], []
        self._current, self._past = None, None

    def _chosen(self, plan) -> tuple[list[dict], list[float | None]]:
        """Each sample's op under a hard plan (the op of its largest weight) and its CFG scale
        (None for ``cond``/``uncond``)."""
        ops = [plan.ops[k] for k in plan.weights.argmax(dim=1).tolist()]
        return ops, [float(op.get("scale", self.default_scale)) if op["op"] == "cfg" else None for op in ops]

    def _call(self, key: int, *args, **kwargs):
        if self.step is None:  # the denoiser called outside a pipeline call: leave it alone
            return self._forwards[key](*args, **kwargs)
        if kwargs.get("skip_layers") is not None:
            raise ValueError("skip-layer guidance (skip_guidance_layers) is not supported under apply_policy")
        bound = self._signatures[key].bind(*args, **kwargs)
        x_in = next(iter(bound.arguments.values()))  # sample / hidden_states
        if self.family.pattern == "two_calls":
            if self._current is None:
                return self._conditional_call(key, bound, x_in)
            if self._current.uncond_call:
                raise ValueError(f"the denoiser ran three times in step {self.step}; "
                                 "only a conditional and an unconditional call per step are supported")
            return self._unconditional_call(key, bound, x_in)
        if self._current is not None:
            raise ValueError(f"the denoiser ran twice in step {self.step}; only one denoiser call per step is supported")
        return self._batched_call(key, bound, x_in)

    def _controller_plan(self, n: int, device):
        """The controller's plan of step ``self.step`` for ``n`` samples; at step 0 the policy is fitted to
        the call's number of steps and its controller made."""
        i, timesteps = self.step, self.pipe.scheduler.timesteps
        if i >= len(timesteps):
            raise ValueError(f"the denoiser ran at step {i + 1} of a {len(timesteps)}-step call; "
                             "only one step per scheduler step is supported")
        if i == 0:
            policy = self.policy.for_steps(len(timesteps), self.resample)
            self.controller = controller_for(policy)
            self._start_policy(policy)
        return self.controller.plan(i, n, device)

    def _start_policy(self, policy: Policy) -> None:
        self.default_scale = float(policy.guidance_scale)

    def _plan(self, n: int, x_in: torch.Tensor) -> _Step:
        """The ops of step ``self.step`` for ``n`` samples and the passes they need."""
        i, device = self.step, x_in.device
        plan = self._controller_plan(n, device)
        ops, scales = self._chosen(plan)
        need = torch.tensor([op_passes(op) for op in ops], device=device)  # (N, 2): cond, uncond
        avail = self._availability(ops) if self._carries_estimates else None
        for j, op in enumerate(ops):
            if op["op"] == "affine" and avail[j] < 1:
                if op.get("fallback") == "cfg":
                    need[j, 1] = True
                elif op.get("fallback") is None:
                    why = "it is the first step" if i == 0 else "the previous step did not provide them"
                    raise ValueError(f"step {i}: an affine op needs the previous step's estimates, but {why} "
                                     "and it has no fallback")
        self.nfe = (self.nfe if self.nfe is not None else 0) + need.sum(dim=1).float()
        self.ops.append([op["op"] for op in ops])
        self._plan_obj = plan
        return _Step(i, ops, scales, need, x_in, self.pipe.scheduler.timesteps[i])

    def _availability(self, ops: list[dict]) -> torch.Tensor:
        """(N,) p of each sample's op: whether the past estimates its affine map needs are there
        (none before the first step)."""
        if self._past is None:
            return torch.tensor([0.0 if op["op"] == "affine" and needs_past(op["coef"]) else 1.0 for op in ops])
        return torch.stack([self._past.availability(op)[j] for j, op in enumerate(ops)])

    def _needs_custom(self, step: _Step, call_scale: float | None) -> bool:
        """Whether the step differs from plain CFG at the call's scale (so the hook computes it)."""
        if call_scale is None or isinstance(self.controller, AGController) or not bool(step.need.all()):
            return True
        return any(op["op"] != "cfg" or s != call_scale for op, s in zip(step.ops, step.scales))

    def _run(self, key: int, bound, rows: torch.Tensor, full: int):
        """The denoiser on ``rows`` of its ``full``-row batch (the whole call when all rows run)."""
        if len(rows) == full:
            out = self._forwards[key](*bound.args, **bound.kwargs)
        else:
            sub = {}
            signature = self._signatures[key]
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    sub.update({k: _select_rows(v, rows, full) for k, v in value.items()})
                else:
                    sub[name] = _select_rows(value, rows, full)
            out = self._forwards[key](**sub)
        self.forward_rows += len(rows)
        return out, (out[0] if isinstance(out, tuple) else out.sample)

    @staticmethod
    def _wrap(out, pred: torch.Tensor):
        return (pred,) + tuple(out[1:]) if isinstance(out, tuple) else type(out)(sample=pred)

    # -- the batched pattern -----------------------------------------------------------------------
    def _batched_call(self, key: int, bound, x_in: torch.Tensor):
        cfg_batch = bool(self.pipe.do_classifier_free_guidance if self.family.cfg_flag == "property"
                         else self._cfg_built)
        n = x_in.shape[0] // 2 if cfg_batch else x_in.shape[0]
        step = self._plan(n, x_in[n:] if cfg_batch else x_in)
        self._current = step
        if not cfg_batch and bool(step.need[:, 1].any()):
            scale = f" (guidance_scale={self.pipe.guidance_scale})" if self.family.scale_known else ""
            raise ValueError(f"the policy runs unconditional passes but the pipeline call builds no unconditional "
                             f"batch{scale}; {ENABLE_UNCOND['batched']}")
        if not cfg_batch:  # conditional rows only: the pipeline uses the output as it is
            out, pred = self._run(key, bound, torch.arange(n), n)
            return self._wrap(out, self._finish(step, pred, torch.zeros_like(pred)))
        call_scale = float(self.pipe.guidance_scale) if self.family.scale_known else None
        if not self._needs_custom(step, call_scale):  # plain CFG at the call's scale: the pipeline's own
            out, pred = self._run(key, bound, torch.arange(2 * n), 2 * n)
            self._finish(step, pred[n:], pred[:n])  # the passes feed later affine steps
            return out
        rows_u = step.need[:, 1].nonzero().flatten()
        rows_c = step.need[:, 0].nonzero().flatten()
        out, pred = self._run(key, bound, torch.cat([rows_u, n + rows_c]), 2 * n)
        out_u = pred.new_zeros((n,) + pred.shape[1:])
        out_c = pred.new_zeros((n,) + pred.shape[1:])
        out_u[rows_u] = pred[: len(rows_u)]
        out_c[rows_c] = pred[len(rows_u):]
        target = self._finish(step, out_c, out_u)
        return self._wrap(out, torch.cat([target, target]))

    # -- the two-call pattern ----------------------------------------------------------------------
    def _conditional_call(self, key: int, bound, x_in: torch.Tensor):
        step = self._plan(x_in.shape[0], x_in)
        out, pred = self._run(key, bound, torch.arange(x_in.shape[0]), x_in.shape[0])
        step.out_c = pred
        self._current = step
        return out

    def _unconditional_call(self, key: int, bound, x_in: torch.Tensor):
        step = self._current
        step.uncond_call = True
        n = x_in.shape[0]
        rows_u = step.need[:, 1].nonzero().flatten()
        out_u = torch.zeros_like(step.out_c)
        out = None
        if len(rows_u):
            out, pred = self._run(key, bound, rows_u, n)
            out_u[rows_u] = pred
        target = self._finish(step, step.out_c, out_u)
        step.out_c.copy_(target)  # the pipeline holds this tensor as its conditional prediction
        if out is not None:
            return self._wrap(out, target.clone())
        if not bound.arguments.get("return_dict", True):
            return (target.clone(),)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=target.clone())

    # -- both patterns -------------------------------------------------------------------------------
    def _finish(self, step: _Step, out_c: torch.Tensor, out_u: torch.Tensor) -> torch.Tensor:
        """Each sample's output at ``step`` from the passes that ran; observes the adaptive rule and
        keeps the estimates the next step's affine ops need."""
        n, i = out_c.shape[0], step.i
        ran_c, ran_u = step.need[:, 0], step.need[:, 1]
        both = ran_c & ran_u
        if isinstance(self.controller, AGController):  # the adaptive rule observes γ where both ran
            nan = torch.full((n,), float("nan"), device=out_c.device)
            cos_x0, cos_eps = nan.clone(), nan.clone()
            if bool(both.any()):
                x0_c = pipeline_x0(self.pipe.scheduler, step.x_in.float(), out_c.float(), step.t, i, self.parameterisation)
                x0_u = pipeline_x0(self.pipe.scheduler, step.x_in.float(), out_u.float(), step.t, i, self.parameterisation)
                cos_x0 = torch.where(both, cosine(x0_c, x0_u), nan)
                cos_eps = torch.where(both, cosine(out_c.float(), out_u.float()), nan)
            self.gammas.append(cos_x0 if self.controller.space == "x0" else cos_eps)
            self.controller.observe(i, StepStats(i, step.t, step.x_in, out_c, out_u, ran_c, ran_u, both,
                                                 cos_x0, cos_eps))
            step.ops, step.scales = self._chosen(self._plan_obj)  # a sample that stops here may run its stop scale

        phi = float(getattr(self.pipe, "guidance_rescale", 0.0) or 0.0)
        carry = self._carries_estimates
        if carry:
            if out_c.shape != step.x_in.shape:
                raise ValueError(f"affine steps need the denoiser's output to have the sample's shape; "
                                 f"{type(self.pipe).__name__}'s has {out_c.shape[1]} channels for "
                                 f"{step.x_in.shape[1]} (it also predicts its variance)")
            x = pipeline_x(self.pipe.scheduler, step.x_in, i, self.parameterisation)
            avail = self._availability(step.ops).to(out_c)
            past = self._past if self._past is not None else PastEstimates.none(out_c)
            provided_u = torch.zeros_like(out_c)
            have_u = torch.zeros(n, device=out_c.device, dtype=out_c.dtype)
        # The samples that run the same op at the same scale, computed as one batch (all of them, mostly).
        groups: dict[tuple[int, float | None], list[int]] = {}
        for j, (op, scale) in enumerate(zip(step.ops, step.scales)):
            groups.setdefault((id(op), scale), []).append(j)
        target = None if len(groups) == 1 else torch.empty_like(out_c)
        for (_, scale), rows in groups.items():
            op = step.ops[rows[0]]
            r = slice(None) if len(rows) == n else torch.tensor(rows, device=out_c.device)
            c, u = out_c[r], out_u[r]
            gives = None
            if op["op"] == "cond":
                output = c
            elif op["op"] == "uncond":
                output, gives = u, u
            elif op["op"] == "cfg":
                output, gives = _rescaled(self.family.rescale, cfg(c, u, scale), c, phi), u
            else:  # affine
                sub = PastEstimates(past.eps_c[r], past.eps_u[r], past.have_c[r], past.have_u[r])
                output, gives, gave = affine_output(op, c, u, x[r], sub, avail[r], self.default_scale)
                if bool((avail[r] > 0).any()) or op.get("fallback") == "cfg":  # a guided output
                    output = _rescaled(self.family.rescale, output, c, phi)
                have_u[r] = gave
            if target is None:
                target = output
            else:
                target[r] = output
            if carry and gives is not None:
                provided_u[r] = gives
                if op["op"] != "affine":
                    have_u[r] = 1.0
        if carry:
            self._past = PastEstimates(out_c.detach().clone(), provided_u, ran_c.to(out_c.dtype), have_u)
        return target

    def _end_step(self) -> None:
        """The scheduler is about to step: the current step is over."""
        if self.step is None:
            return
        step = self._current
        if step is not None and self.family.pattern == "two_calls" and not step.uncond_call:
            if bool(step.need[:, 1].any()):
                raise ValueError(f"the policy runs unconditional passes at step {step.i} but the pipeline call made "
                                 f"no unconditional call; {ENABLE_UNCOND['two_calls']}")
            target = self._finish(step, step.out_c, torch.zeros_like(step.out_c))
            step.out_c.copy_(target)  # e.g. affine steps: the pipeline steps with this tensor
        self._current = None
        self.step += 1


class EditRunner(PolicyRunner):
    """:class:`PolicyRunner` for the three-way pattern of ``StableDiffusionInstructPix2PixPipeline``:
    two-condition policies.

    The pipeline guides on the input image and the instruction with one UNet call per step on three
    thirds, ``[ε(image, text); ε(image, ∅); ε(∅, ∅)]``, and combines them as
    ``ε_∅ + s_T (ε_IT − ε_I) + s_I (ε_I − ε_∅)`` (``guidance_scale``, ``image_guidance_scale``).
    Under a policy with ``"conditions": 2`` each step runs only the rows its op needs (``edit`` all
    three, ``text`` the first two, ``joint`` the first and last, ``cond`` the first: the batch really
    shrinks), computes the op's output (:func:`agsearch.guidance.ops.edit_output`) and hands it back
    in all three thirds, so the pipeline's own arithmetic returns it unchanged. A step that is
    ``edit`` at the call's own scales runs the pipeline's forward untouched. The adaptive rule
    observes γ_t of both guidance directions (:func:`agsearch.guidance.ops.edit_agreement`, x̂0 or ε
    space) where all three passes ran. The call must build the three-way batch when the policy needs
    more than the ``cond`` pass (:data:`ENABLE_UNCOND`). ``nfe``, ``ops``, ``gammas`` and
    ``forward_rows`` report as in :class:`PolicyRunner`."""

    def _start_policy(self, policy: Policy) -> None:
        self.scales = float(policy.guidance_scale), float(policy.image_guidance_scale)

    def _call(self, key: int, *args, **kwargs):
        if self.step is None:  # the denoiser called outside a pipeline call: leave it alone
            return self._forwards[key](*args, **kwargs)
        if self._current is not None:
            raise ValueError(f"the denoiser ran twice in step {self.step}; only one denoiser call per step is supported")
        bound = self._signatures[key].bind(*args, **kwargs)
        x_in = next(iter(bound.arguments.values()))  # the noisy latent and the image latent, on channels
        three = bool(self.pipe.do_classifier_free_guidance)
        n = x_in.shape[0] // 3 if three else x_in.shape[0]
        i = self.step
        plan = self._controller_plan(n, x_in.device)
        ops = [plan.ops[k] for k in plan.weights.argmax(dim=1).tolist()]
        need = torch.tensor([edit_op_passes(op) for op in ops], device=x_in.device)  # (N, 3): full, image, none
        if not three and bool(need[:, 1:].any()):
            raise ValueError("the policy runs image or unconditional passes but the pipeline call builds no "
                             f"three-way batch (guidance_scale={self.pipe.guidance_scale}, image_guidance_scale="
                             f"{self.pipe.image_guidance_scale}); {ENABLE_UNCOND['three_way']}")
        self.nfe = (self.nfe if self.nfe is not None else 0) + need.sum(dim=1).float()
        self.ops.append([op["op"] for op in ops])
        self._current = True
        if not three:  # the instruction's rows only: the pipeline uses the output as it is
            return self._run(key, bound, torch.arange(n), n)[0]
        call = (float(self.pipe.guidance_scale), float(self.pipe.image_guidance_scale))
        if not isinstance(self.controller, AGController) and all(
                op["op"] == "edit" and (op.get("scale", self.scales[0]), op.get("image_scale", self.scales[1])) == call
                for op in ops):
            return self._run(key, bound, torch.arange(3 * n), 3 * n)[0]  # the pipeline's own step
        rows = [need[:, p].nonzero().flatten() for p in range(3)]
        out, pred = self._run(key, bound, torch.cat([r + p * n for p, r in enumerate(rows)]), 3 * n)
        passes, lo = [], 0
        for r in rows:
            full = pred.new_zeros((n,) + pred.shape[1:])
            full[r] = pred[lo:lo + len(r)]
            passes.append(full)
            lo += len(r)
        if isinstance(self.controller, AGController):
            ops = self._observe(i, x_in[:n, : pred.shape[1]], passes, need, plan)
        target = torch.empty_like(passes[0])
        groups: dict[str, list[int]] = {}
        for j, op in enumerate(ops):
            groups.setdefault(repr(sorted(op.items())), []).append(j)
        for members in groups.values():
            r = torch.tensor(members, device=pred.device)
            target[r] = edit_output(ops[members[0]], *(p[r] for p in passes), *self.scales)
        return self._wrap(out, torch.cat([target, target, target]))

    def _observe(self, i: int, x_in: torch.Tensor, passes: list[torch.Tensor], need: torch.Tensor, plan) -> list[dict]:
        """The adaptive rule sees γ_t where all three passes ran; returns each sample's op after it."""
        every = need.all(dim=1)
        nan = torch.full((len(every),), float("nan"), device=x_in.device)
        cos_x0, cos_eps = nan.clone(), nan.clone()
        t = self.pipe.scheduler.timesteps[i]
        if bool(every.any()):
            x0 = [pipeline_x0(self.pipe.scheduler, x_in.float(), p.float(), t, i, self.parameterisation) for p in passes]
            cos_x0 = torch.where(every, edit_agreement(*x0), nan)
            cos_eps = torch.where(every, edit_agreement(*(p.float() for p in passes)), nan)
        self.gammas.append(cos_x0 if self.controller.space == "x0" else cos_eps)
        self.controller.observe(i, StepStats(i, t, x_in, passes[0], passes[2], need[:, 0], need[:, 2], every,
                                             cos_x0, cos_eps, out_image=passes[1]))
        return [plan.ops[k] for k in plan.weights.argmax(dim=1).tolist()]


@contextlib.contextmanager
def apply_policy(pipe, policy: Policy | str | Path, resample: bool = False):
    """Make ordinary calls of a diffusers pipeline follow a guidance ``policy`` (see module doc).

    ``pipe``: one of :data:`SUPPORTED`. ``policy``: a :class:`~agsearch.policy.Policy` or a policy
    file. A call whose step count differs from the policy's raises :class:`~agsearch.policy.PolicyError`
    unless ``resample`` (steps are then mapped by position, :meth:`Policy.resample`). Yields the
    :class:`PolicyRunner`, whose ``nfe`` reports the last call's denoiser evaluations per image.
    """
    if family_of(pipe).pattern == "three_way":
        runner = EditRunner(pipe, policy, resample)
    else:
        runner = PolicyRunner(pipe, policy, resample)
    runner.install()
    try:
        yield runner
    finally:
        runner.remove()
