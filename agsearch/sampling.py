"""The one sampling loop: it executes guidance policies (hard or soft) over a diffusers scheduler.

At every step a *controller* gives, per sample, weights over a list of guidance ops (``cfg`` at a
scale, ``cond``, ``uncond``, ``affine``). The loop runs only the denoiser passes that some weight needs — per
sample, so a sample that skips its unconditional pass really costs one evaluation less — mixes
the op outputs with the weights (the DARTS mixed op, ``sum(w * op)``) and takes a scheduler step.
One-hot weights are a hard policy; dense weights are the relaxed gates the search trains, and
gradients flow through them: the caller picks the grad context.

``affine`` (LinearAG, ``agsearch.affine``) replaces the unconditional pass by ε̂_u, an affine map
of ε_c(t), the previous step's ε_c(t−1) and ε_u(t−1), x_t and a bias. The loop carries those past
estimates per sample, with an availability p ∈ [0, 1]: the weight of the previous step's ops
that provided them (1 or 0 for a hard policy; ``cond`` provides no ε_u, an ``affine`` step
provides its ε̂_u). The op's output is p · affine CFG + (1 − p) · its ``fallback`` (``cond`` or
``cfg``), so soft gates get gradients through p as well; without a fallback, a sample that
reaches an affine step with p < 1 is an error.

Controllers:
    ``StaticController``   one op per step from a static policy (all samples alike);
    ``AGController``       Adaptive Guidance (Castillo et al., AAAI 2025, arXiv 2312.12487): per
                           sample, CFG while γ_t = cos(pred_c, pred_u) < γ̄, then ``cond`` for the
                           remaining steps; γ in x̂_0 space by default, ε space optional.

The denoiser is anything that implements :class:`Denoiser` (``agsearch.denoisers``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from agsearch.affine import estimate_uncond, needs_past
from agsearch.policy import Policy


class Denoiser(Protocol):
    """The adapter contract every model backend implements.

    ``__call__(x, t, cond, run_cond, run_uncond)`` evaluates the model on the (already
    scheduler-scaled) sample ``x`` (B, ...) at timestep ``t``: the conditional pass for the samples
    where the bool mask ``run_cond`` (B,) is set, the unconditional (null or negative condition)
    pass where ``run_uncond`` is set, both batched into one forward where possible. It returns
    ``(out_c, out_u)``, each (B, ...) in the model's prediction type; rows not run are zeros.
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond, run_cond: torch.Tensor,
                 run_uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


# -- guidance ops -----------------------------------------------------------------------------------
def op_passes(op: dict) -> tuple[bool, bool]:
    """Which passes (conditional, unconditional) an op needs; an ``affine`` op's unconditional
    pass is needed only where it falls back to ``cfg`` (decided per sample by the loop)."""
    name = op["op"]
    return name in ("cfg", "cond", "affine"), name in ("cfg", "uncond")


def op_output(op: dict, out_c: torch.Tensor, out_u: torch.Tensor, default_scale: float) -> torch.Tensor:
    name = op["op"]
    if name == "cfg":
        w = op.get("scale", default_scale)
        return out_u + w * (out_c - out_u)
    if name == "cond":
        return out_c
    if name == "uncond":
        return out_u
    if name == "affine":
        raise ValueError("an affine op needs the past estimates: use affine_output")
    raise ValueError(f"unknown guidance op {name!r}")


@dataclass
class PastEstimates:
    """What the previous step provided, per sample: ε_c(t−1), ε_u(t−1) (true or estimated) and
    their availability in [0, 1] (B,) — the weight of the previous step's ops that provided them."""

    eps_c: torch.Tensor  # (B, ...)
    eps_u: torch.Tensor  # (B, ...)
    have_c: torch.Tensor  # (B,)
    have_u: torch.Tensor  # (B,)

    @classmethod
    def none(cls, like: torch.Tensor) -> "PastEstimates":
        zeros = torch.zeros(like.shape[0], device=like.device, dtype=like.dtype)
        return cls(torch.zeros_like(like), torch.zeros_like(like), zeros, zeros.clone())

    def availability(self, op: dict) -> torch.Tensor:
        """(B,) p for an op: 1 unless it is an affine op that uses the past."""
        if op["op"] != "affine" or not needs_past(op["coef"]):
            return torch.ones_like(self.have_c)
        return self.have_c * self.have_u


def affine_output(op: dict, out_c: torch.Tensor, out_u: torch.Tensor, x: torch.Tensor, past: PastEstimates,
                  p: torch.Tensor, default_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LinearAG: p · [ε̂_u + w (ε_c − ε̂_u)] + (1 − p) · fallback, with p (B,) the availability of
    the past estimates. Returns (output, ε_u it provides to the next step weighted by its
    availability, that availability) — all per sample."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    u_hat = estimate_uncond(op["coef"], out_c, past.eps_c, past.eps_u, x)
    guided = u_hat + default_scale * (out_c - u_hat)
    fallback = op.get("fallback")
    fb_out = out_u + default_scale * (out_c - out_u) if fallback == "cfg" else out_c
    fb_u = 1.0 if fallback == "cfg" else 0.0
    pv = p.view(shape)
    output = pv * guided + (1 - pv) * fb_out
    provided_u = pv * u_hat + (1 - pv) * fb_u * out_u
    return output, provided_u, p + (1 - p) * fb_u


# -- controllers ------------------------------------------------------------------------------------
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


class StaticController:
    """A static policy: at step i every sample runs ``policy.steps[i]``."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def plan(self, i: int, batch: int, device) -> StepPlan:
        return StepPlan([self.policy.steps[i]], torch.ones(batch, 1, device=device))

    def observe(self, i: int, stats: "StepStats") -> None:
        pass


class AGController:
    """Adaptive Guidance: per sample, ``cfg`` while γ_t < θ_t, then ``cond`` for good.

    γ_t is observed at a step where the sample ran both passes (and used CFG); once it reaches the
    step's threshold θ_t the sample runs ``cond`` from the next step on, so its unconditional pass
    is skipped. θ_t is one number for every step (AG) or one per step (a searched rule,
    ``agsearch.search.adaptive``); a guided step runs CFG at the rule's per-step scale if it has one,
    and the step at which a sample stops (both passes ran there) at the rule's stop scale if it has
    one: the plan's third op, which ``observe`` gives the weight of the samples that crossed.
    """

    def __init__(self, policy: Policy):
        T = policy.num_inference_steps
        self.thresholds = [policy.threshold_at(i) for i in range(T)]
        self.scales = [policy.scale_at(i) for i in range(T)]
        self.stop_scales = [policy.stop_scale_at(i) for i in range(T)]
        self.space = policy.rule.get("space", "x0")
        self.guiding: torch.Tensor | None = None  # (B,) bool
        self._plan: StepPlan | None = None

    def plan(self, i: int, batch: int, device) -> StepPlan:
        if self.guiding is None:
            self.guiding = torch.ones(batch, dtype=torch.bool, device=device)
        g = self.guiding.float()
        ops = [{"op": "cfg", "scale": self.scales[i]}, {"op": "cond"}]
        weights = [g, 1 - g]
        if self.stop_scales[i] != self.scales[i]:
            ops.append({"op": "cfg", "scale": self.stop_scales[i]})
            weights.append(torch.zeros_like(g))
        self._plan = StepPlan(ops, torch.stack(weights, dim=1))
        return self._plan

    def observe(self, i: int, stats: "StepStats") -> None:
        gamma = stats.cosine_x0 if self.space == "x0" else stats.cosine_eps
        # θ = 1 keeps guiding: a float32 cosine can round to 1 where the predictions nearly agree.
        crossed = stats.both & (gamma >= self.thresholds[i]) & (self.thresholds[i] < 1)
        self.guiding = self.guiding & ~crossed
        if self._plan is not None and len(self._plan.ops) == 3:  # the crossing samples' CFG at the stop scale
            stop = crossed.to(self._plan.weights.dtype)
            w = self._plan.weights
            self._plan.weights = torch.stack([w[:, 0] * (1 - stop), w[:, 1], w[:, 0] * stop], dim=1)


def controller_for(policy: Policy):
    if policy.kind == "static":
        return StaticController(policy)
    if policy.rule["rule"] == "ag_cosine":
        return AGController(policy)
    raise ValueError(f"no controller for rule {policy.rule['rule']!r}")


# -- the loop ---------------------------------------------------------------------------------------
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


def predict_x0(scheduler, x: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
    """The denoised estimate x̂_0 implied by a model output at step ``i`` (timestep ``t``)."""
    if "FlowMatch" in type(scheduler).__name__:
        # Rectified flow (SD3): x = (1 − σ) x_0 + σ ε and the model predicts v = ε − x_0.
        return x - scheduler.sigmas[i].to(x) * model_output
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        # Karras-style σ parameterisation (Euler): x = x_0 + σ ε, the model sees x / sqrt(σ² + 1).
        sigma = scheduler.sigmas[i].to(x)
        if prediction_type == "epsilon":
            return x - sigma * model_output
        if prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
        alpha_bar = scheduler.alphas_cumprod.to(x.device)[int(t)].to(x)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if prediction_type == "epsilon":
            return (x - s * model_output) / a
        if prediction_type == "v_prediction":
            return a * x - s * model_output
    raise ValueError(f"x0 prediction for prediction_type {prediction_type!r} is not supported")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


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
    """
    if controller is None:
        if policy is None:
            raise ValueError("sample() needs a policy or a controller")
        controller = controller_for(policy)
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
                x0_c = predict_x0(scheduler, x, out_c.detach(), t, i)
                x0_u = predict_x0(scheduler, x, out_u.detach(), t, i)
                cos_x0[i] = torch.where(both, _cosine(x0_c, x0_u), cos_x0[i])
                cos_eps[i] = torch.where(both, _cosine(out_c.detach(), out_u.detach()), cos_eps[i])
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
