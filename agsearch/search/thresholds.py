"""Searched adaptive policies: per-step thresholds θ_t on the agreement γ_t = cos(cond, uncond).

The rule (``kind: adaptive`` policies, ``agsearch.guidance.controllers.AGController``): per sample, CFG while
γ_t < θ_t, then ``cond`` from the next step on for good. A constant θ is Adaptive Guidance
(Castillo et al., AAAI 2025, arXiv 2312.12487); θ = −1 up to a step and 1 after it is a cutoff.

**Why the search needs no differentiable trajectories.** Until a sample stops guiding it *is* the
full-CFG teacher's trajectory: the rule runs CFG at the teacher's scale. So everything a threshold
rule can do to a sample is fixed by two tables computed once per (noise, condition) pair, with no
gradient (:func:`tabulate`):

* ``gamma`` (N, T): γ_t along the teacher's trajectory — what the rule observes;
* ``distance`` (N, T): column k − 1 is the distance to the teacher's final sample of the sample
  that guides its first k steps and runs ``cond`` after (k = T: the teacher itself, 0). A sample
  whose γ first reaches θ at step s guides s + 1 steps and costs T + s + 1 NFE.

The branches share the teacher's prefix: the loop pauses it at every step (``agsearch.guidance.sampler.Resume``)
and continues with ``cond``, T(T − 1)/2 evaluations per pair on top of the teacher's 2T.

**Stop scales** (a space with ``rule: {stop_scales: true}``). The step at which a sample stops ran
both passes, so its scale is free: w + δ_s (δ = 0 is AG's convention; a larger scale makes up for
the guidance the sample will not get). The final sample is close to linear in one step's scale,
so one more continuation per stop, with the stopping step at w + 1, turns the distance column of
that stop into a quadratic in δ_s (:class:`Outcomes`); δ (T,) is trained with θ.

**Relaxation.** At step s a sample stops with probability σ((u(γ_s) − φ_s)/τ), u(c) = −log(1 − c)
(cosines crowd near 1; u spreads them: 0.9 → 2.3, 0.99 → 4.6, 0.999 → 6.9), φ_s = u(θ_s) the
trainable parameters. The probability of still guiding after step t is Π_{s≤t} σ((φ_s − u(γ_s))/τ),
and the expected distance and NFE are exact sums over the stopping step — the loss of the
stochastic rule, not of a mixed trajectory, so τ → 0 leaves no discretisation gap but the
hard threshold itself. Training minimises E[distance]/d₀ + λ (E[NFE] − B)/T with dual ascent on λ,
from AG calibrated to the budget (constant φ). Export shifts all φ_t by one offset so that the
hard rule's mean NFE on held-out calibration pairs meets the budget (:func:`calibrate`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch

from agsearch.guidance.ops import stops
from agsearch.guidance.sampler import Resume, sample
from agsearch.policy import MAX_SCALE, MAX_STEPS, Policy
from agsearch.search.backends import load_backend
from agsearch.search.base import (
    DISTANCES,
    NonFiniteLossError,
    SearchBase,
    check,
    check_size,
    resolve_run,
)

U_MAX = -math.log(1e-12)  # u(γ) is capped at γ = 1 − 1e-12 (≈ 27.6), above every float32 cosine below 1


def to_u(gamma: torch.Tensor | float) -> torch.Tensor:
    """u(γ) = −log(1 − γ), monotone in γ ∈ [−1, 1] (u(−1) = −log 2)."""
    g = torch.as_tensor(gamma, dtype=torch.float64).clamp(-1.0, 1.0 - 1e-12)
    return -torch.log1p(-g)


def from_u(u: torch.Tensor | float) -> torch.Tensor:
    """θ = 1 − exp(−u), clamped to [−1, 1] (below u(−1) every γ passes; any θ ≤ −1 acts as −1)."""
    return (1.0 - torch.exp(-torch.as_tensor(u, dtype=torch.float64))).clamp(-1.0, 1.0)


@dataclass
class Outcomes:
    """What a threshold rule can do to N pairs (see the module doc).

    With stop scales, the stopping step's scale w + δ changes the final sample by ≈ δ · D (the
    final sample is close to linear in one step's scale; D from one probe at w + 1), so the
    distance of stopping after k guided steps is the quadratic
    ``distance + 2 δ · cross + δ² · curvature`` in that step's δ (MSE: the mean of (E + δ D)²).
    """

    gamma: torch.Tensor  # (N, T) γ_t on the teacher's trajectory
    distance: torch.Tensor  # (N, T) column k − 1: distance after k guided steps (last column 0)
    cross: torch.Tensor | None = None  # (N, T) mean(E · D) of the same columns (last column 0)
    curvature: torch.Tensor | None = None  # (N, T) mean(D · D)

    @property
    def num_steps(self) -> int:
        return self.gamma.shape[1]

    @property
    def has_stop_scales(self) -> bool:
        return self.cross is not None

    def __getitem__(self, rows) -> "Outcomes":
        pick = lambda v: None if v is None else v[rows]  # noqa: E731
        return Outcomes(self.gamma[rows], self.distance[rows], pick(self.cross), pick(self.curvature))

    def to(self, device) -> "Outcomes":
        move = lambda v: None if v is None else v.to(device)  # noqa: E731
        return Outcomes(self.gamma.to(device), self.distance.to(device), move(self.cross), move(self.curvature))

    @classmethod
    def cat(cls, parts: list["Outcomes"]) -> "Outcomes":
        join = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return cls(join("gamma"), join("distance"), join("cross"), join("curvature"))

    def distances(self, stop_shift: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T): the distance of every stopping column, with the stopping step's scale shifted by
        ``stop_shift`` (T,) (column k − 1 stops at step k − 1, so it takes δ_{k−1})."""
        if stop_shift is None:
            return self.distance
        if not self.has_stop_scales:
            raise ValueError("these tables have no stop-scale terms: tabulate them with stop_scales=True")
        delta = stop_shift.to(self.distance)
        return self.distance + 2 * delta * self.cross + delta.pow(2) * self.curvature


@torch.no_grad()
def teacher_gamma(denoiser, scheduler, noise, cond, num_steps: int, guidance_scale: float, space: str = "x0"):
    """(teacher's final samples (N, ...), γ (N, T)) of full CFG from ``noise``."""
    out = sample(denoiser, scheduler, Policy.static(["cfg"] * num_steps, guidance_scale), noise, cond)
    return out.samples, (out.cosine_x0 if space == "x0" else out.cosine_eps).T.contiguous()


STOP_PROBE = 1.0  # the stop-scale probe runs the stopping step at w + STOP_PROBE


@torch.no_grad()
def tabulate(denoiser, scheduler, noise, cond, num_steps: int, guidance_scale: float, space: str = "x0",
             distance: str = "mse", progress: bool | None = None, stop_scales: bool = False) -> Outcomes:
    """γ and the distance of every stopping step for each pair, from one teacher trajectory and its
    T − 1 ``cond`` continuations (per sample distances: mean over elements, ``mse`` or ``l1``).
    ``stop_scales`` (MSE only): also the terms of the stopping step's scale (:class:`Outcomes`),
    from T − 1 more continuations that run the stopping step at w + ``STOP_PROBE``.
    ``progress``: a bar over the continuations (None: only on a terminal)."""
    from tqdm.auto import tqdm

    if stop_scales and distance != "mse":
        raise ValueError(f"stop scales are searched on the MSE (a quadratic in the scale), not {distance!r}")
    T = num_steps
    paused: dict[int, Resume] = {}

    def pause(stats):
        if stats.i >= 1:  # the earliest stop is after step 0: γ needs both passes there
            paused[stats.i] = Resume(stats.i, stats.x, copy.deepcopy(stats.scheduler))

    full = Policy.static(["cfg"] * T, guidance_scale)
    teacher = sample(denoiser, scheduler, full, noise, cond, callback=pause)
    gamma = (teacher.cosine_x0 if space == "x0" else teacher.cosine_eps).T.contiguous()
    cond_only = Policy.static(["cond"] * T, guidance_scale)
    probe = guidance_scale + STOP_PROBE
    table = torch.zeros(len(noise), T, dtype=torch.float64, device=noise.device)
    cross, curvature = (torch.zeros_like(table), torch.zeros_like(table)) if stop_scales else (None, None)
    bar = tqdm(range(1, T), desc=f"tabulating {len(noise)} pairs", unit="stop", leave=False, disable=None if progress is None else not progress)
    for k in bar:  # guide k steps (0 … k − 1), then cond from step k
        final = sample(denoiser, scheduler, cond_only, noise, cond, resume=paused[k]).samples
        diff = (final - teacher.samples).flatten(1).double()
        table[:, k - 1] = diff.pow(2).mean(1) if distance == "mse" else diff.abs().mean(1)
        if stop_scales:  # the same stop with step k − 1 at the probe scale
            probed = Policy.static(["cfg"] * (k - 1) + [{"op": "cfg", "scale": probe}] + ["cond"] * (T - k), guidance_scale)
            moved = sample(denoiser, scheduler, probed, noise, cond, resume=paused.get(k - 1)).samples
            direction = (moved - final).flatten(1).double() / STOP_PROBE  # D: per unit of scale
            cross[:, k - 1] = (diff * direction).mean(1)
            curvature[:, k - 1] = direction.pow(2).mean(1)
    return Outcomes(gamma.double(), table, cross, curvature)


# -- the rule on the tables ----------------------------------------------------------------------
def guided_steps(gamma: torch.Tensor, u_thresholds: torch.Tensor) -> torch.Tensor:
    """(N,) k ∈ 1..T, the steps each pair guides under the hard rule (θ_t = from_u(u_t)): one more
    than the first step s < T − 1 with γ_s ≥ θ_s (and θ_s < 1), else T. The rule compares γ with θ, as the
    sampler does; u only parameterises θ."""
    T = gamma.shape[1]
    theta = from_u(u_thresholds).to(gamma)
    crossed = stops(gamma[:, : T - 1], theta[: T - 1])
    first = torch.where(crossed.any(1), crossed.float().argmax(1), torch.full_like(crossed[:, 0], T - 1, dtype=torch.long))
    return first + 1


def hard_outcome(outcomes: Outcomes, u_thresholds: torch.Tensor,
                 stop_shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NFE, mean distance) of the hard rule on tabulated pairs (``stop_shift`` (T,): each
    step's stop scale minus the guided scale)."""
    k = guided_steps(outcomes.gamma, u_thresholds)
    T = outcomes.num_steps
    d = outcomes.distances(stop_shift).gather(1, (k - 1).unsqueeze(1)).squeeze(1)
    return (T + k).double().mean(), d.mean()


def stop_distribution(gamma: torch.Tensor, u_thresholds: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The relaxed rule: (P (N, T) with P[:, k − 1] the probability of guiding exactly k steps,
    guided (N, T) the probability of still guiding at each step)."""
    T = gamma.shape[1]
    u = to_u(gamma).to(u_thresholds.dtype)
    stop = torch.sigmoid((u[:, : T - 1] - u_thresholds[: T - 1]) / tau)  # (N, T − 1)
    ones = torch.ones_like(stop[:, :1])
    guided = torch.cat([ones, torch.cumprod(1 - stop, dim=1)], dim=1)  # (N, T): P(guiding at step t)
    P = torch.cat([guided[:, : T - 1] * stop, guided[:, T - 1:]], dim=1)
    return P, guided


def soft_outcome(outcomes: Outcomes, u_thresholds: torch.Tensor, tau: float, stop_shift: torch.Tensor | None = None):
    """(E[NFE], E[distance], guided share per step (T,)) of the relaxed rule, differentiable in θ
    (and in the stop scales' shifts ``stop_shift``)."""
    P, guided = stop_distribution(outcomes.gamma, u_thresholds, tau)
    T = outcomes.num_steps
    k = torch.arange(1, T + 1, dtype=P.dtype, device=P.device)
    e_nfe = T + (P * k).sum(1).mean()
    e_dist = (P * outcomes.distances(stop_shift).to(P)).sum(1).mean()
    return e_nfe, e_dist, guided.mean(0)


def calibrate(gamma: torch.Tensor, u_thresholds: torch.Tensor, budget: float, iterations: int = 80) -> torch.Tensor:
    """The offset δ such that the hard rule with thresholds u + δ meets ``budget`` mean NFE as
    closely as it can on the pairs of ``gamma`` (the mean NFE is a step function of δ, non-
    decreasing: bisection for the first δ at or over the budget, then the closer neighbour)."""
    T = gamma.shape[1]

    def nfe(delta: float) -> float:
        return float((T + guided_steps(gamma, u_thresholds + delta)).double().mean())

    lo, hi = -U_MAX - float(u_thresholds.max()) - 1.0, U_MAX - float(u_thresholds.min()) + 1.0
    if nfe(hi) < budget:
        return torch.tensor(hi, dtype=torch.float64)
    if nfe(lo) >= budget:
        return torch.tensor(lo, dtype=torch.float64)
    for _ in range(iterations):  # invariant: nfe(lo) < budget <= nfe(hi)
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if nfe(mid) >= budget else (mid, hi)
    return torch.tensor(hi if abs(nfe(hi) - budget) <= abs(nfe(lo) - budget) else lo, dtype=torch.float64)


# Tables and calibration γ computed in this process, by everything they depend on (the frozen model,
# its scheduler, T, w, the rule's space, the distance, stop scales, the device): the searches of one
# sweep at several budgets tabulate the same pairs once.
_SHARED_TABLES: dict[str, dict[int, "Outcomes"]] = {}
_SHARED_CALIBRATION: dict[str, dict[tuple[int, int], torch.Tensor]] = {}


# -- the Lightning module -------------------------------------------------------------------------
class ThresholdSearchModule(SearchBase):
    """Per-step thresholds of the adaptive rule, trained against the full-CFG teacher.

    What ``PolicySearchModule(space=<an adaptive space>, ...)`` becomes (so ``agsearch search
    --model.space=adaptive_cosine`` selects it); it takes the same arguments, and those that only
    mean something for gates must keep their defaults. The trainable parameters are ``thresholds_u``
    (T,), u(θ_t), and with stop scales ``stop_shift`` (T,), δ_t; the tables of every pair are
    computed once, without gradients, and cached, so after the first epoch a step costs
    microseconds.
    """

    def __init__(self, space: str | dict = "adaptive_cosine", budget: int = 40, model: str | None = None,
                 pipeline: str | None = None, prompts: str | None = None, scheduler: str | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, lr: float = 0.1, dual_lr: float = 2.0, distance: str = "mse",
                 temperature_start: float | None = None, temperature_end: float | None = None, init: str = "budget"):
        super().__init__()
        from agsearch.search.space import SearchSpace, SpaceError

        model, scheduler, T, guidance_scale = resolve_run(model, pipeline, prompts, scheduler, num_inference_steps,
                                                          guidance_scale)
        check_size(model, height, width, num_frames)
        self.space = SearchSpace.load(space)
        if self.space.kind != "adaptive":
            raise SpaceError(f"{self.space.source}: not an adaptive space")
        if temperature_start is not None or temperature_end is not None:
            self.space = dataclasses.replace(
                self.space, temperature=self.space.temperature.overridden(temperature_start, temperature_end))
        check(isinstance(T, int) and 2 <= T <= MAX_STEPS,
              f"Expected model.num_inference_steps in [2, {MAX_STEPS}] for an adaptive rule, but got {T}")
        check(math.isfinite(guidance_scale) and 0 <= guidance_scale <= MAX_SCALE,
              f"Expected model.guidance_scale to be a number in [0, {MAX_SCALE:g}], but got {guidance_scale}")
        check(isinstance(budget, int) and T + 1 <= budget <= 2 * T,
               f"Expected model.budget to be an integer between {T + 1} and {2 * T} NFE for model.num_inference_steps={T} "
               f"(an adaptive rule always guides step 0), but got {budget}")
        for name, value in (("lr", lr), ("dual_lr", dual_lr)):
            check(math.isfinite(value) and value >= 0, f"Expected model.{name} to be a finite number >= 0, but got {value}")
        check(distance in DISTANCES, f"Expected model.distance in {DISTANCES}, but got {distance!r}")
        check(init in ("budget", "teacher", "uniform"), f"Expected model.init in ('budget', 'teacher', 'uniform'), but got {init!r}")
        self.save_hyperparameters()
        self.hparams.update(model=model, scheduler=scheduler, num_inference_steps=T, guidance_scale=guidance_scale,
                            space_spec=self.space.to_dict())
        # u(θ_t): "budget" starts at AG calibrated to the budget on the first batch; "teacher" never
        # stops (θ = 1); "uniform" at θ = 0.9.
        start = U_MAX if init == "teacher" else float(to_u(0.9))
        self.thresholds_u = torch.nn.Parameter(torch.full((T,), start, dtype=torch.float64))
        # δ_t: the stop scale of step t minus the guided scale (0: AG's convention, CFG at w).
        if self.searches_stop_scales:
            check(distance == "mse", f"the space {self.space.name!r} searches stop scales, which needs "
                                      f"model.distance=mse, not {distance!r}")
            self.stop_shift = torch.nn.Parameter(torch.zeros(T, dtype=torch.float64))
        else:
            self.register_parameter("stop_shift", None)
        self.register_buffer("dual", torch.zeros((), dtype=torch.float64))
        self.register_buffer("loss_scale", torch.zeros((), dtype=torch.float64))
        self.register_buffer("initialised", torch.tensor(init != "budget"))
        self.backend = load_backend(model, scheduler, pipeline, prompts,  # frozen, not a submodule: not in checkpoints
                                    size=(height, width, num_frames))
        check(getattr(self.backend, "conditions", 1) == 1,
              f"the adaptive spaces gate full CFG against cond on one condition; model {model!r} is an image "
              "editor (two conditions): search it with a two-condition space such as editing")
        self._tables: dict[int, Outcomes] = {}  # per noise seed, rows of (1, T)
        self._calibration: dict[tuple[int, int], torch.Tensor] = {}
        self.last_guided = torch.ones(T, dtype=torch.float64)  # share of the batch still guided per step

    # -- the rule -----------------------------------------------------------------------------------
    @property
    def num_inference_steps(self) -> int:
        return self.thresholds_u.shape[0]

    @property
    def rule_space(self) -> str:
        return self.space.rule["space"]

    @property
    def searches_stop_scales(self) -> bool:
        return bool(self.space.rule.get("stop_scales", False))

    def stop_scales(self) -> list[float] | None:
        """Each step's stop scale w + δ_t (≥ 0; the last step's is never used and stays w), or None."""
        if self.stop_shift is None:
            return None
        scales = (self.guidance_scale + self.stop_shift.detach().cpu()).clamp_min(0.0)
        scales[-1] = self.guidance_scale
        return [round(float(v), 6) for v in scales]

    def thresholds(self, offset: float = 0.0) -> list[float]:
        """θ_t (T,) of the hard rule, with ``offset`` added to every u(θ_t)."""
        return [float(v) for v in from_u(self.thresholds_u.detach().cpu() + offset)]

    # -- tables ---------------------------------------------------------------------------------------
    def outcomes(self, batch: dict) -> Outcomes:
        """The tables of ``batch``'s pairs (computed once per noise seed, then cached)."""
        self._on_device()
        seeds = batch["seed"]
        shared = _SHARED_TABLES.setdefault(self._cache_key(), {})
        for s in seeds.tolist():
            if s not in self._tables and s in shared:
                self._tables[s] = shared[s]
        missing = [j for j, s in enumerate(seeds.tolist()) if s not in self._tables]
        if missing:
            idx = torch.tensor(missing, device=seeds.device)
            noise = self.backend.noise(seeds[idx], self.device)
            cond = self.backend.condition(batch["label"][idx])
            with torch.autocast(self.device.type, enabled=False):
                table = tabulate(self.backend.denoiser, self.backend.scheduler, noise, cond, self.num_inference_steps,
                                 self.guidance_scale, self.rule_space, self.hparams.distance,
                                 stop_scales=self.searches_stop_scales).to("cpu")
            for n, j in enumerate(missing):
                self._tables[int(seeds[j])] = shared[int(seeds[j])] = table[n:n + 1]
        return Outcomes.cat([self._tables[int(s)] for s in seeds.tolist()]).to(self.device)

    @torch.no_grad()
    def calibration_gamma(self, seed: int, pairs: int) -> torch.Tensor:
        """γ (N, T) of the teacher on ``pairs`` held-out calibration pairs with noise seed ``seed``."""
        from agsearch.search.data import PairDataset

        key = (int(seed), int(pairs))
        shared = _SHARED_CALIBRATION.setdefault(self._cache_key(), {})
        if key not in self._calibration and key in shared:
            self._calibration[key] = shared[key]
        if key not in self._calibration:
            self._on_device()
            batch = PairDataset(seed, pairs, self.backend.num_conditions).batch(self.device)
            noise = self.backend.noise(batch["seed"], self.device)
            _, gamma = teacher_gamma(self.backend.denoiser, self.backend.scheduler, noise,
                                     self.backend.condition(batch["label"]), self.num_inference_steps,
                                     self.guidance_scale, self.rule_space)
            self._calibration[key] = shared[key] = gamma.double().cpu()
        return self._calibration[key]

    def _cache_key(self) -> str:
        """What the tables of a pair depend on besides its seed and condition."""
        import json

        return json.dumps({"backend": self.backend.provenance(), "scheduler": type(self.backend.scheduler).__name__,
                           "scheduler_config": dict(self.backend.scheduler.config), "T": self.num_inference_steps,
                           "w": self.guidance_scale, "space": self.rule_space, "distance": self.hparams.distance,
                           "stop_scales": self.searches_stop_scales, "device": str(self.device)},
                          sort_keys=True, default=str)

    def gamma_quantiles(self) -> list[list[float]] | None:
        """Per step, the 5/50/95% quantiles of the teacher's γ over the pairs tabulated so far."""
        if not self._tables:
            return None
        gamma = torch.cat([t.gamma for t in self._tables.values()])
        q = torch.nanquantile(gamma, torch.tensor([0.05, 0.5, 0.95], dtype=gamma.dtype), dim=0)  # (3, T)
        return [[round(float(v), 8) for v in q[:, t]] for t in range(q.shape[1])]

    # -- Lightning ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):

        table = self.outcomes(batch)
        T, budget = self.num_inference_steps, self.hparams.budget
        if not bool(self.initialised):  # AG at the budget: one threshold for every step
            gamma = self.all_gather(table.gamma).reshape(-1, T) if self.trainer.world_size > 1 else table.gamma
            with torch.no_grad():
                self.thresholds_u.fill_(float(calibrate(gamma.cpu(), torch.zeros(T, dtype=torch.float64), budget)))
            self.initialised.fill_(True)
        tau = self.temperature()
        e_nfe, e_dist, guided = soft_outcome(table, self.thresholds_u, tau, self.stop_shift)
        if self.loss_scale.item() == 0:
            d0 = e_dist.detach().clamp_min(1e-12)
            if self.trainer.world_size > 1:
                d0 = self.trainer.strategy.reduce(d0, reduce_op="mean")
            self.loss_scale.fill_(float(d0))
        loss = e_dist / self.loss_scale + self.dual * (e_nfe - budget) / T
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"search loss is {loss.item()} at step {self.global_step} "
                                     f"(distance {e_dist.item()}, λ {self.dual.item():.4g}); the run stopped")
        with torch.no_grad():
            hard_nfe, hard_dist = hard_outcome(table, self.thresholds_u, self.stop_shift)
        self._last_nfe = e_nfe.detach()
        self.last_guided = guided.detach().cpu()
        B = len(batch["seed"])
        self.log_dict({
            "train/loss": loss.detach(), "train/distance": e_dist.detach(), "train/expected_nfe": e_nfe.detach(),
            "train/hard_nfe": hard_nfe, "train/hard_distance": hard_dist,
            "train/dual": self.dual.clone(), "train/temperature": float(tau),
        }, on_step=True, on_epoch=False, batch_size=B)
        self.log("nfe", e_nfe.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=B)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Dual ascent: λ ← max(0, λ + ρ (E[NFE] − B) / T), E[NFE] of the batch over all processes.
        with torch.no_grad():
            gap = self._last_nfe - self.hparams.budget
            if self.trainer.world_size > 1:
                gap = self.trainer.strategy.reduce(gap, reduce_op="mean")
            self.dual.copy_((self.dual + self.hparams.dual_lr * gap / self.num_inference_steps).clamp_min(0))

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        table = self.outcomes(batch)
        e_nfe, e_dist, _ = soft_outcome(table, self.thresholds_u, self.temperature(), self.stop_shift)
        hard_nfe, hard_dist = hard_outcome(table, self.thresholds_u, self.stop_shift)
        self.log_dict({
            "val/relaxed_distance": e_dist, "val/expected_nfe": e_nfe,
            "val/discrete_distance": hard_dist, "val/discrete_nfe": hard_nfe,
        }, on_epoch=True, batch_size=len(batch["seed"]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in (self.thresholds_u, self.stop_shift) if p is not None], lr=self.hparams.lr)

    # -- export -----------------------------------------------------------------------------------------
    def monitor(self, run_dir):
        from agsearch.search.callbacks import ThresholdMonitor

        return ThresholdMonitor(run_dir)

    def end_of_run_policy(self, data, **provenance) -> Policy:
        return self.export_policy(calibration_seed=int(data["calibration_seed"]),
                                  calibration_pairs=int(data["num_calibration"]), **provenance)

    def exported_policy(self, budget: int | None, mode: str, data, **provenance) -> Policy:
        from agsearch.seeds import CALIBRATION_SEED

        return self.export_policy(budget, calibration_seed=int(data.get("calibration_seed", CALIBRATION_SEED)),
                                  calibration_pairs=int(data.get("num_calibration", 512)), **provenance)

    def export_policy(self, budget: int | None = None, calibration_seed: int = 2, calibration_pairs: int = 512,
                      **provenance) -> Policy:
        """The hard rule with every u(θ_t) shifted by one offset so that its mean NFE on the
        calibration pairs (teacher γ, ``calibration_seed``) meets ``budget`` (default the search's)."""
        budget = self.hparams.budget if budget is None else budget
        T = self.num_inference_steps
        if not (isinstance(budget, int) and T + 1 <= budget <= 2 * T):
            raise ValueError(f"Expected a budget between {T + 1} and {2 * T} NFE for {T} steps, but got {budget}")
        gamma = self.calibration_gamma(calibration_seed, calibration_pairs)
        u = self.thresholds_u.detach().cpu()
        offset = float(calibrate(gamma, u, budget))
        nfe = float((T + guided_steps(gamma, u + offset)).double().mean())
        thresholds = self.thresholds(offset)
        search = {
            "space": self.space.name, "rule": dict(self.space.rule), "relaxation": self.space.relaxation,
            "budget": int(budget), "search_budget": int(self.hparams.budget),
            "calibration": {"seed": int(calibration_seed), "pairs": int(calibration_pairs),
                            "offset_u": round(offset, 6), "mean_nfe": round(nfe, 4)},
            "train_steps": int(self.global_step),
            "seconds": round(self.search_seconds, 2), **provenance,
        }
        return Policy.adaptive(
            T, self.guidance_scale, thresholds, self.rule_space, stop_scales=self.stop_scales(),
            name=f"searched-{self.space.name}-{budget}",
            provenance={**self.backend.provenance(), "scheduler": type(self.backend.scheduler).__name__,
                        "num_inference_steps": T, "guidance_scale": self.guidance_scale, "search": search},
        )


def calibrated_ag(module: ThresholdSearchModule, policy: Policy) -> Policy:
    """AG (one threshold) calibrated exactly as ``policy`` was: same budget, same calibration pairs."""
    calibration = policy.provenance["search"]["calibration"]
    budget = policy.provenance["search"]["budget"]
    gamma = module.calibration_gamma(calibration["seed"], calibration["pairs"])
    T = module.num_inference_steps
    u = calibrate(gamma, torch.zeros(T, dtype=torch.float64), budget)
    threshold = float(from_u(u))
    return Policy.adaptive(T, module.guidance_scale, threshold, module.rule_space,
                           name=f"AG γ̄={threshold:.6g} (calibrated to {budget})",
                           provenance={"baseline": "ag", "calibration": dict(calibration), "budget": budget})

