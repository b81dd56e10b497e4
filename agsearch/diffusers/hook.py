"""Run agsearch guidance policies inside unmodified diffusers text-to-image pipelines.

``with apply_policy(pipe, policy): pipe(prompt, negative_prompt=..., num_inference_steps=T,
guidance_scale=w)`` makes an ordinary pipeline call follow ``policy`` (static or adaptive):

* a ``cfg`` step runs both passes, as the pipeline does;
* a ``cond`` step runs only the conditional rows of the denoiser batch (the batch really shrinks:
  half the evaluations) and hands the pipeline ε_c for both halves, so its own CFG arithmetic
  ε_u + w (ε_c − ε_u) yields ε_c; an ``uncond`` step likewise runs only the unconditional rows;
* a ``cfg`` step at its own scale w_t ≠ w hands back ε_u' = ε_c − (w_t − 1)/(w − 1) · (ε_c − ε_u),
  for which the pipeline's ε_u' + w (ε_c − ε_u') = ε_u + w_t (ε_c − ε_u);
* the Adaptive Guidance rule (Castillo et al., AAAI 2025, arXiv 2312.12487) runs per sample
  through :class:`agsearch.guidance.controllers.AGController`: CFG while γ_t = cos(x̂0_c, x̂0_u) < γ̄, then
  ``cond`` for that sample's remaining steps.

How: for the duration of the ``with`` block the denoiser's ``forward`` (``pipe.unet`` or
``pipe.transformer``) is wrapped by an instance attribute, and the scheduler's ``set_timesteps``
(which every pipeline call runs once, first) is wrapped to start a new trajectory; both are
removed on exit, also on an exception, leaving the pipeline as it was. The pipeline's denoiser
batch is ``[unconditional rows; conditional rows]`` (negative prompts in the first half) for all
supported pipelines. Scales: a ``cfg`` step without its own scale runs at the policy's
``guidance_scale``; the call's ``guidance_scale`` must be > 1 so that the pipeline builds the
unconditional half at all (it is only used to invert the pipeline's arithmetic).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from pathlib import Path

import torch

from agsearch.guidance.controllers import AGController, StepStats, controller_for
from agsearch.guidance.ops import cosine, op_passes, predict_x0, uncond_for_scale
from agsearch.policy import Policy

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")


def _check_supported(pipe) -> torch.nn.Module:
    import diffusers

    classes = tuple(getattr(diffusers, name) for name in SUPPORTED)
    if not isinstance(pipe, classes):
        raise ValueError(f"pipeline class {type(pipe).__name__!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return pipe.transformer if isinstance(pipe, diffusers.StableDiffusion3Pipeline) else pipe.unet


def pipeline_x0(scheduler, x_in: torch.Tensor, out: torch.Tensor, t, i: int, parameterisation: str) -> torch.Tensor:
    """x̂0 implied by a denoiser output ``out`` on the model input ``x_in`` at step ``i``:
    :func:`agsearch.guidance.ops.predict_x0` on the unscaled sample (σ-parameterised schedulers feed
    the model x / sqrt(σ² + 1); flow matching feeds x itself)."""
    x = x_in
    if parameterisation != "flow" and float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        x = x_in * (scheduler.sigmas[i].to(x_in) ** 2 + 1).sqrt()
    return predict_x0(scheduler, x, out, t, i, parameterisation)


def _select_rows(value, rows: torch.Tensor, full: int):
    """``value`` with every tensor whose leading dimension is the full denoiser batch cut to ``rows``."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == full:
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, dict):
        return {k: _select_rows(v, rows, full) for k, v in value.items()}
    return value


class PolicyRunner:
    """The state of :func:`apply_policy`: installs and removes the wrappers, runs each step.

    After a pipeline call, ``nfe`` (N,) holds the denoiser evaluations per image of that call
    (N = batch × num_images_per_prompt), ``ops`` the op each image ran at each step (T lists of
    N op names), ``gammas`` the adaptive rule's γ_t per step and ``forward_rows`` the total rows
    the denoiser evaluated.
    """

    def __init__(self, pipe, policy: Policy | str | Path, resample: bool = False):
        self.pipe = pipe
        self.denoiser = _check_supported(pipe)
        # What the denoiser predicts: SD3's transformer the flow velocity, a UNet what its scheduler says.
        self.parameterisation = ("flow" if self.denoiser is getattr(pipe, "transformer", None)
                                 else pipe.scheduler.config.get("prediction_type", "epsilon"))
        self.policy = policy if isinstance(policy, Policy) else Policy.load(policy)
        if any(step["op"] == "affine" for step in self.policy.steps or []):
            # Without the past estimates an affine step would silently run as ``cond``.
            raise ValueError("affine (LinearAG) steps need the sampler's past estimates, which apply_policy does "
                             "not carry yet; run them with agsearch.sample over agsearch.denoisers.text")
        self.resample = resample
        self._forward = self.denoiser.forward  # the bound forward (or whatever hook is there now)
        self._signature = inspect.signature(self._forward)
        self._sample_arg = next(iter(self._signature.parameters))  # "sample" / "hidden_states"
        self.step: int | None = None  # None outside a pipeline call
        self.nfe: torch.Tensor | None = None
        self.ops: list[list[str]] = []
        self.forward_rows = 0
        self.gammas: list[torch.Tensor] = []  # adaptive rule: γ_t (N,) per step, NaN where not both
        self._saved: list[tuple[object, str, bool, object]] = []

    # -- install / remove -------------------------------------------------------------------------
    def install(self) -> None:
        if getattr(self.denoiser.forward, "_agsearch_runner", None) is not None:
            raise ValueError("apply_policy is already active on this pipeline; nested policies are not supported")
        scheduler = self.pipe.scheduler

        @functools.wraps(scheduler.set_timesteps)
        def set_timesteps(*args, _orig=scheduler.set_timesteps, **kwargs):
            result = _orig(*args, **kwargs)
            self._start()
            return result

        @functools.wraps(self._forward)
        def forward(*args, **kwargs):
            return self._step(*args, **kwargs)

        forward._agsearch_runner = self
        self._patch(scheduler, "set_timesteps", set_timesteps)
        self._patch(self.denoiser, "forward", forward)

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

    def _chosen(self, plan) -> tuple[list[dict], list[float | None]]:
        """Each sample's op under a hard plan (the op of its largest weight) and its CFG scale
        (None for ``cond``/``uncond``)."""
        ops = [plan.ops[k] for k in plan.weights.argmax(dim=1).tolist()]
        return ops, [float(op.get("scale", self.default_scale)) if op["op"] == "cfg" else None for op in ops]

    def _step(self, *args, **kwargs):
        if self.step is None:  # the denoiser called outside a pipeline call: leave it alone
            return self._forward(*args, **kwargs)
        if kwargs.get("skip_layers") is not None:
            raise ValueError("skip-layer guidance (skip_guidance_layers) is not supported under apply_policy")
        bound = self._signature.bind(*args, **kwargs)
        x_in = bound.arguments[self._sample_arg]  # (2N, C, H, W) with CFG, else (N, ...)
        i = self.step
        timesteps = self.pipe.scheduler.timesteps
        if i >= len(timesteps):
            raise ValueError(f"the denoiser ran {i + 1} times in a {len(timesteps)}-step call; "
                             "only one denoiser call per step is supported")
        if i == 0:
            policy = self.policy.for_steps(len(timesteps), self.resample)
            self.controller = controller_for(policy)
            self.default_scale = float(policy.guidance_scale)
        cfg_batch = bool(self.pipe.do_classifier_free_guidance)
        n = x_in.shape[0] // 2 if cfg_batch else x_in.shape[0]
        device = x_in.device
        plan = self.controller.plan(i, n, device)
        ops, scales = self._chosen(plan)
        need = torch.tensor([op_passes(op) for op in ops], device=device)  # (N, 2): cond, uncond
        if not cfg_batch and bool(need[:, 1].any()):
            raise ValueError(f"the policy runs unconditional passes but the pipeline call has guidance_scale="
                             f"{self.pipe.guidance_scale}; pass guidance_scale > 1")
        self.nfe = (self.nfe if self.nfe is not None else 0) + need.sum(dim=1).float()
        self.ops.append([op["op"] for op in ops])
        self.step += 1

        w = float(self.pipe.guidance_scale)
        if not cfg_batch:  # every sample runs ``cond``: the pipeline's own batch is that
            self.forward_rows += n
            return self._forward(*args, **kwargs)
        if bool(need.all()) and all(s == w for s in scales) and not isinstance(self.controller, AGController):
            self.forward_rows += 2 * n  # plain CFG at the call's scale: the pipeline's own forward
            return self._forward(*args, **kwargs)

        # Rows to run: unconditional rows [0, N) where needed, then conditional rows [N, 2N).
        rows_u = need[:, 1].nonzero().flatten()
        rows_c = need[:, 0].nonzero().flatten()
        rows = torch.cat([rows_u, n + rows_c])
        if len(rows) == 2 * n:
            out = self._forward(*args, **kwargs)
        else:
            sub = {}
            for name, value in bound.arguments.items():
                if self._signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    sub.update({k: _select_rows(v, rows, 2 * n) for k, v in value.items()})
                else:
                    sub[name] = _select_rows(value, rows, 2 * n)
            out = self._forward(**sub)
        self.forward_rows += len(rows)
        pred = out[0] if isinstance(out, tuple) else out.sample  # (rows, C, H, W)
        eps_u, eps_c = torch.zeros_like(x_in[:n]), torch.zeros_like(x_in[:n])
        eps_u[rows_u] = pred[: len(rows_u)]
        eps_c[rows_c] = pred[len(rows_u):]

        if isinstance(self.controller, AGController):  # the adaptive rule observes γ where both ran
            both = need.all(dim=1)
            t = timesteps[i]
            nan = torch.full((n,), float("nan"), device=device)
            cos_x0, cos_eps = nan.clone(), nan.clone()
            if bool(both.any()):
                xs = x_in[n:].float()
                x0_c = pipeline_x0(self.pipe.scheduler, xs, eps_c.float(), t, i, self.parameterisation)
                x0_u = pipeline_x0(self.pipe.scheduler, xs, eps_u.float(), t, i, self.parameterisation)
                cos_x0 = torch.where(both, cosine(x0_c, x0_u), nan)
                cos_eps = torch.where(both, cosine(eps_c.float(), eps_u.float()), nan)
            self.gammas.append(cos_x0 if self.controller.space == "x0" else cos_eps)
            self.controller.observe(i, StepStats(i, t, x_in[n:], eps_c, eps_u, need[:, 0], need[:, 1], both,
                                                 cos_x0, cos_eps))
            ops, scales = self._chosen(plan)  # a sample that stops here may run its stop scale (same passes)

        # What the pipeline's ε_u' + w (ε_c' − ε_u') must turn into each sample's op output.
        new_u, new_c = eps_u.clone(), eps_c.clone()
        for j, op in enumerate(ops):
            if op["op"] == "cond":
                new_u[j] = eps_c[j]
            elif op["op"] == "uncond":
                new_c[j] = eps_u[j]
            elif scales[j] != w:
                new_u[j] = uncond_for_scale(eps_c[j], eps_u[j], scales[j], w)
        pred = torch.cat([new_u, new_c])
        return (pred,) + tuple(out[1:]) if isinstance(out, tuple) else type(out)(sample=pred)


@contextlib.contextmanager
def apply_policy(pipe, policy: Policy | str | Path, resample: bool = False):
    """Make ordinary calls of a diffusers pipeline follow a guidance ``policy`` (see module doc).

    ``pipe``: a StableDiffusionPipeline, StableDiffusionXLPipeline or StableDiffusion3Pipeline.
    ``policy``: a :class:`~agsearch.policy.Policy` or a policy file. A call whose step count differs
    from the policy's raises :class:`~agsearch.policy.PolicyError` unless ``resample`` (steps are
    then mapped by position, :meth:`Policy.resample`). Yields the :class:`PolicyRunner`, whose
    ``nfe`` reports the last call's denoiser evaluations per image.
    """
    runner = PolicyRunner(pipe, policy, resample)
    runner.install()
    try:
        yield runner
    finally:
        runner.remove()
