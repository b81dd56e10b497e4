"""Differentiable search of a per-step guidance policy (Adaptive Guidance, Castillo et al.,
AAAI 2025, arXiv 2312.12487; the relaxation of DARTS, Liu et al., ICLR 2019).

Gate logits α (T, K) choose, at every sampling step, among K guidance ops of a search space
(``agsearch.search.space``). A student trajectory runs through the one sampling loop with the
gates as per-sample op weights; the teacher is full CFG from the same noise and condition. The
loss is

    L = d(x_student, x_teacher) / d₀  +  λ · (E[NFE] − B) / T  (+ η · H(p))

with d the mean squared error of the final samples (L1 optional; optional per-step trajectory
terms), d₀ the distance at the first step (so the loss is scale-free), E[NFE] = Σ_t Σ_k p_tk c_k
the expected cost under the gate probabilities, B the budget in NFE per sample, and λ ≥ 0 a
Lagrange multiplier raised by dual ascent after every step, λ ← max(0, λ + ρ (E[NFE] − B) / T):
the user picks a budget, not a penalty weight.

Relaxations: ``softmax`` mixes every op with weights softmax(α / τ); ``gumbel_st`` samples one op
per step and sample from softmax(α) with Gumbel noise, runs it hard in the forward pass and
passes softmax((α + g) / τ) gradients backward (straight-through, Jang et al. 2017). Hard forward
ops close the discretisation gap that a soft mix leaves open: a mix of ``cfg`` and ``cond`` with
weight p is CFG at scale 1 + p (w − 1), which no discrete policy can reproduce.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from agsearch.eval.base import full_guidance
from agsearch.guidance.controllers import StepPlan
from agsearch.guidance.sampler import sample
from agsearch.policy import MAX_SCALE, MAX_STEPS, Policy
from agsearch.search.backends import CheckpointedDenoiser, load_backend
from agsearch.search.base import (
    DISTANCES,
    NonFiniteLossError,
    SearchBase,
    check,
    check_size,
    is_adaptive,
    resolve_run,
)
from agsearch.search.discretize import MODES, discretize
from agsearch.search.polish import TrajectoryEvaluator, polish
from agsearch.search.space import SearchSpace

STRAIGHT_THROUGH = ("all", "sampled")
INITS = ("teacher", "budget", "uniform", "cutoff")
OPTIMIZERS = ("shared_adam", "adam")
POLISH_FROM = ("leader", "both")


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam whose second-moment estimate is one scalar per parameter tensor, not one per entry.

    Plain Adam rescales every gate logit by its own gradient history, so a step whose gradient is
    pure noise (a step the loss cannot see, e.g. where the scheduler clips x̂_0) moves as fast as
    a step that matters. A shared scale keeps the relative sizes of the gradients: gates move in
    proportion to how much they matter, and the loss stays free of an absolute scale.
    """

    def __init__(self, params, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    # shared=False: plain Adam (one scale per entry), e.g. affine coefficients
                    # whose regressors differ in scale.
                    state["v"] = torch.zeros((), dtype=p.dtype, device=p.device) if group.get("shared", True) else torch.zeros_like(p)
                state["step"] += 1
                state["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                g2 = p.grad.pow(2)
                state["v"].mul_(b2).add_(g2.mean() if group.get("shared", True) else g2, alpha=1 - b2)
                m_hat = state["m"] / (1 - b1 ** state["step"])
                v_hat = state["v"] / (1 - b2 ** state["step"])
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])
        return loss


class GateController:
    """Per-sample op weights (B, T, K) as a sampling controller (``agsearch.guidance.sampler.sample``); an
    ``affine`` op takes step i's coefficients from ``affine_coef`` (T, R) or (T, R, C)."""

    def __init__(self, ops: list[dict], weights: torch.Tensor, guidance_scale: float, compute_all: bool,
                 affine_coef: torch.Tensor | None = None, image_guidance_scale: float | None = None):
        self.ops = ops
        self.guidance_scale = guidance_scale
        self.image_guidance_scale = image_guidance_scale  # two-condition ops (an image editor)
        self.weights = weights
        self.compute_all = compute_all
        self.num_inference_steps = weights.shape[1]
        self.affine_coef = affine_coef

    def plan(self, i: int, batch: int, device) -> StepPlan:
        w = self.weights[:, i]  # (B, K)
        ops = [dict(op, coef=affine_coef_at(self.affine_coef, i)) if op["op"] == "affine" and self.affine_coef is not None
               else op for op in self.ops]
        return StepPlan(ops, w, torch.ones_like(w, dtype=torch.bool) if self.compute_all else None)

    def observe(self, i, stats) -> None:
        pass


def affine_coef_at(coef: torch.Tensor, i: int) -> dict:
    """Step i's coefficient mapping from a (T, R[, C]) tensor; step 0 has no past, so its past
    coefficients are constant zeros (its affine op then needs no fallback)."""
    from agsearch.linear_ag import PAST, REGRESSORS

    return {name: (torch.zeros_like(coef[i, j]).detach() if i == 0 and name in PAST else coef[i, j])
            for j, name in enumerate(REGRESSORS)}


def _gumbel(seeds: torch.Tensor, step: int, shape: tuple[int, int]) -> torch.Tensor:
    """Gumbel(0, 1) noise (B, T, K), one generator per sample seeded by (seed, step), so a sample's
    draw does not depend on the batch it is in or the process that runs it."""
    out = []
    for s in seeds.tolist():
        g = torch.Generator().manual_seed(hash((int(s), int(step), 0x6A7E)) & (2**62 - 1))
        u = torch.rand(shape, generator=g, dtype=torch.float64).clamp(1e-20, 1 - 1e-12)
        out.append(-torch.log(-torch.log(u)))
    return torch.stack(out).float()


class PolicySearchModule(SearchBase):
    """Gate logits over a search space, trained against a full-CFG teacher under an NFE budget.

    Args:
        space: a built-in space name (``minimal``, ``cfg_scales``, ``adaptive_guidance``) or a
            YAML file (see ``search_spaces/``).
        budget: target NFE per sample, an integer in [T · min cost, T · max cost] (e.g. 25–50
            for T = 25 with ``cfg`` and ``cond``).
        model: the frozen model: ``shapes`` (the built-in text-to-image pipeline), ``digits`` (the
            built-in class-conditional UNet, the fast one) or ``pipeline`` (the folder given as
            ``pipeline``). Default: ``pipeline`` when a folder is given, else ``shapes``.
        pipeline: a local diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3, PixArt-Σ, Wan 2.1/2.2)
            (``save_pretrained`` layout, nothing is downloaded); needs ``prompts``. The teacher is
            the pipeline's own full-CFG call from the same noise (``TextPipelineBackend``).
        prompts: the pipeline's prompt file: one prompt per line, or JSON Lines with ``prompt`` and
            ``negative_prompt`` (used for the unconditional pass); pair i uses prompt i mod N.
        scheduler: ``ddim``, ``euler`` or ``dpm++``; default the model's benchmark setting (for a
            pipeline: its own scheduler).
        num_inference_steps: T; default the model's benchmark setting (for a pipeline: 25).
        guidance_scale: the teacher's scale w; default the model's benchmark setting (for a
            pipeline: its ``__call__`` default, 7.5 for SD 1.x/2.x, 7.0 for SD3).
        height: a pipeline's image height in pixels, a multiple of 8 (default: its own).
        width: a pipeline's image width in pixels, a multiple of 8 (default: its own).
        num_frames: a video pipeline's frames, 4k + 1 (default: its own default).
        lr: Adam learning rate of the gate logits.
        dual_lr: ρ, the dual-ascent step of λ per unit of (E[NFE] − B) / T.
        distance: ``mse`` or ``l1`` between final samples.
        trajectory_weight: weight of the mean per-step distance of intermediate samples (0: off).
        entropy_weight: η ≥ 0, pushes gates towards one-hot (0: off).
        relaxation: override the space's relaxation (``softmax`` or ``gumbel_st``).
        temperature_start: override the space's initial temperature τ (> 0).
        temperature_end: override the space's final temperature τ (> 0).
        straight_through: ``all`` computes every op's passes so every gate gets a gradient;
            ``sampled`` runs only the sampled op (fewer NFE in the forward pass, gradients only
            through the chosen op, as in GDAS).
        checkpointing: gradient-checkpoint every denoiser call of the student trajectory, so its
            activation memory stays flat in T. None (the default) decides by device: on for an
            accelerator (CUDA, MPS), off on CPU, where memory is plentiful and recomputing every
            call costs time (measured by experiments/search_memory.py: results/search_memory.md).
        discretization: ``exact`` (meets the budget exactly) or ``argmax``.
        optimizer: ``shared_adam`` (Adam with one second-moment scale for all gates, see
            ``SharedScaleAdam``) or ``adam``.
        polish_rounds: rounds of ``polish`` on the validation pairs after the search (0: off).
        polish_from: where the polish starts (``polish_starts``): ``leader``, the discretised
            gates or the cutoff at the budget, whichever is closer to the teacher on the
            validation pairs; ``both``, from each, keeping the better (twice the time).
        init: ``budget`` starts the gates at E[NFE] = budget (ops of equal cost equally likely),
            so λ does not first have to undo an over-budget start; ``teacher`` puts 0.9 on CFG at
            the run's scale; ``uniform`` starts at zeros; ``cutoff`` puts 0.9 on the budget's CFG
            cutoff (CFG for the first k steps, ``cond`` after).
        affine_lr: Adam learning rate of the affine coefficients when the space trains them
            (``{op: affine, train: true}``); they start from the space's fit.

    An adaptive space (``kind: adaptive``, e.g. ``adaptive_cosine``) searches per-step thresholds
    of a per-sample rule instead of gates (:class:`agsearch.search.thresholds.ThresholdSearchModule`);
    :func:`agsearch.search.modules.search_module` takes these arguments and builds either.
    """


    def __init__(
        self,
        space: str | dict = "cfg_scales",
        budget: int = 35,
        model: str | None = None,
        pipeline: str | None = None,
        prompts: str | None = None,
        scheduler: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        lr: float = 0.1,
        dual_lr: float = 2.0,
        distance: str = "mse",
        trajectory_weight: float = 0.0,
        entropy_weight: float = 0.0,
        relaxation: str | None = None,
        temperature_start: float | None = None,
        temperature_end: float | None = None,
        straight_through: str = "all",
        checkpointing: bool | None = None,
        discretization: str = "exact",
        init: str = "budget",
        optimizer: str = "shared_adam",
        polish_rounds: int = 1,
        polish_from: str = "leader",
        affine_lr: float = 1e-3,
        image_guidance_scale: float | None = None,
    ):
        if is_adaptive(space):
            from agsearch.search.space import SpaceError

            raise SpaceError(f"{space!r} is an adaptive space (thresholds, not gates): build its search with "
                             "agsearch.search.modules.search_module, as agsearch search does")
        super().__init__()
        model, scheduler, num_inference_steps, guidance_scale = resolve_run(
            model, pipeline, prompts, scheduler, num_inference_steps, guidance_scale)
        check_size(model, height, width, num_frames)
        self.space = SearchSpace.load(space)
        if relaxation is not None or temperature_start is not None or temperature_end is not None:
            from agsearch.search.space import RELAXATIONS, SpaceError

            if relaxation is not None and relaxation not in RELAXATIONS:
                raise SpaceError(f"Expected model.relaxation in {RELAXATIONS}, but got {relaxation!r}")
            temperature = self.space.temperature.overridden(temperature_start, temperature_end)
            self.space = dataclasses.replace(self.space, relaxation=relaxation or self.space.relaxation,
                                             temperature=temperature)
        check(isinstance(num_inference_steps, int) and 1 <= num_inference_steps <= MAX_STEPS,
              f"Expected model.num_inference_steps to be an integer in [1, {MAX_STEPS}], but got {num_inference_steps}")
        check(math.isfinite(guidance_scale) and 0 <= guidance_scale <= MAX_SCALE,
              f"Expected model.guidance_scale to be a number in [0, {MAX_SCALE:g}], but got {guidance_scale}")
        self.candidates = self.space.candidates(guidance_scale)
        self.costs = self.space.costs(self.candidates)
        T = num_inference_steps
        lo, hi = T * min(self.costs), T * max(self.costs)
        check(isinstance(budget, int) and lo <= budget <= hi,
               f"Expected model.budget to be an integer between {lo} and {hi} NFE for model.num_inference_steps={T}, but got {budget}")
        for name, value in (("lr", lr), ("dual_lr", dual_lr), ("affine_lr", affine_lr), ("trajectory_weight", trajectory_weight),
                            ("entropy_weight", entropy_weight)):
            check(math.isfinite(value) and value >= 0, f"Expected model.{name} to be a finite number >= 0, but got {value}")
        check(distance in DISTANCES, f"Expected model.distance in {DISTANCES}, but got {distance!r}")
        check(straight_through in STRAIGHT_THROUGH,
               f"Expected model.straight_through in {STRAIGHT_THROUGH}, but got {straight_through!r}")
        check(discretization in MODES, f"Expected model.discretization in {MODES}, but got {discretization!r}")
        check(isinstance(polish_rounds, int) and polish_rounds >= 0,
               f"Expected model.polish_rounds to be an integer >= 0, but got {polish_rounds}")
        check(polish_from in POLISH_FROM, f"Expected model.polish_from in {POLISH_FROM}, but got {polish_from!r}")
        check(optimizer in OPTIMIZERS, f"Expected model.optimizer in {OPTIMIZERS}, but got {optimizer!r}")
        check(init in INITS, f"Expected model.init in {INITS}, but got {init!r}")
        self.save_hyperparameters()
        # The resolved run settings and space travel in the checkpoint, so export needs no files.
        self.hparams.update(model=model, scheduler=scheduler, num_inference_steps=T, guidance_scale=guidance_scale,
                            space_spec=self.space.to_dict())

        # α (T, K): the trainable parameters (with the affine coefficients where the space trains them).
        self.gate_logits = torch.nn.Parameter(_initial_logits(self.candidates, self.costs, T, budget, init,
                                                              self.space.full_op))
        # LinearAG coefficients (T, R) or (T, R, C): trained with the gates, or fixed (still saved).
        entry = self.space.affine_entry()
        if entry is not None:
            self.affine_coef = torch.nn.Parameter(_affine_coefficients(entry, T, guidance_scale, model),
                                                  requires_grad=bool(entry.get("train", False)))
        else:
            self.register_parameter("affine_coef", None)
        self.register_buffer("dual", torch.zeros(()))  # λ ≥ 0
        self.register_buffer("loss_scale", torch.zeros(()))  # d₀, set at the first step
        self.backend = load_backend(model, scheduler, pipeline, prompts,  # frozen, not a submodule: not in checkpoints
                                    size=(height, width, num_frames), image_guidance_scale=image_guidance_scale)
        if getattr(self.backend, "image_guidance_scale", None) is not None:  # the editor's s_I, resolved
            self.hparams.update(image_guidance_scale=float(self.backend.image_guidance_scale))
        conditions = getattr(self.backend, "conditions", 1)
        check(conditions == self.space.conditions,
              f"space {self.space.name!r} has {'two-condition (editing)' if self.space.conditions == 2 else 'one-condition'} "
              f"ops but model {model!r} guides on {'two conditions (an image editor)' if conditions == 2 else 'one'}")
        self._teacher_cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # -- gates ------------------------------------------------------------------------------------
    @property
    def num_inference_steps(self) -> int:
        return self.gate_logits.shape[0]

    def _op_probabilities(self) -> torch.Tensor:
        """(T, K), differentiable: ``gumbel_st`` samples ops from softmax(α); ``softmax`` mixes
        them with softmax(α / τ) at the current temperature."""
        logits = self.gate_logits.float()
        if self.space.relaxation == "softmax":
            logits = logits / self.temperature()
        return logits.softmax(dim=1)

    def gate_probabilities(self) -> torch.Tensor:
        """(T, K): the op probabilities, detached (for logging and plots)."""
        return self._op_probabilities().detach()

    def expected_nfe(self) -> torch.Tensor:
        """E[NFE] per sample under the gates (differentiable)."""
        probs = self._op_probabilities()
        return (probs * torch.tensor(self.costs, dtype=probs.dtype, device=probs.device)).sum()

    def gate_weights(self, seeds: torch.Tensor) -> torch.Tensor:
        """Per-sample op weights (B, T, K) for a training trajectory."""
        B = len(seeds)
        if self.space.relaxation == "softmax":
            return self._op_probabilities().expand(B, -1, -1)
        logits = self.gate_logits.float()
        g = _gumbel(seeds.cpu(), self.global_step, tuple(logits.shape)).to(logits.device)
        y = ((logits + g) / self.temperature()).softmax(dim=2)  # (B, T, K)
        one_hot = F.one_hot(y.argmax(dim=2), y.shape[2]).to(y.dtype)
        return one_hot - y.detach() + y  # straight-through: hard values, soft gradients

    def discrete_indices(self, budget: int | None = None, mode: str | None = None) -> list[int]:
        mode = mode or self.hparams.discretization
        budget = self.hparams.budget if budget is None else budget
        return discretize(self.gate_logits.detach().float().softmax(dim=1), self.costs, budget, mode)

    def _hard_weights(self, picks: list[int], batch: int) -> torch.Tensor:
        """One-hot op weights (B, T, K) of a discrete policy given as op indices (T,)."""
        return F.one_hot(torch.tensor(picks, device=self.device), len(self.costs)).float().expand(batch, -1, -1)

    @torch.no_grad()
    def polish(self, batch: dict, picks: list[int], rounds: int) -> tuple[list[int], dict]:
        """:func:`agsearch.search.polish.polish` of ``picks`` with exact trajectories on ``batch``
        (its pairs' teacher is the target): ``rounds`` rounds of single-step moves at the same NFE.
        Returns the picks and a record of the moves."""
        if rounds <= 0:
            return picks, {"rounds": 0, "moves": [], "evaluations": 0}
        self._on_device()
        full = self.space.full_op
        k_teacher = self.candidates.index(full) if full in self.candidates else None
        logp = self.gate_logits.detach().float().log_softmax(dim=1).cpu()
        B = len(batch["seed"])
        noise = self.backend.noise(batch["seed"], self.device)
        target, _ = self.teacher(batch["seed"], noise, self.backend.condition(batch["label"]))

        def run(weights, M: int, resume, callback):
            controller = self._controller(weights, False)
            return sample(self.backend.denoiser, self.backend.scheduler, None, noise.repeat(M, *([1] * (noise.dim() - 1))),
                          self.backend.condition(batch["label"].repeat(M)), controller=controller, callback=callback,
                          resume=resume).samples

        # Spaces with ``affine`` ops (which need the past estimates) always run candidates in full.
        evaluator = TrajectoryEvaluator(run, lambda p: self._hard_weights(p, B), target, self._distance, B,
                                        reuse=all(c["op"] != "affine" for c in self.candidates))
        return polish(picks, self.costs, logp, k_teacher, self.space.labels(self.candidates), rounds, evaluator,
                      evaluator.accept, progress=getattr(self, "progress", None))

    def cutoff_picks(self, budget: int | None = None) -> list[int] | None:
        """The cutoff at ``budget`` (full guidance at the run's scales for the first steps, then
        ``cond``) as op indices, or None where the space cannot express it at exactly that NFE.

        With a 3-NFE full op (an editor's ``edit``) an odd surplus over T leaves one NFE over:
        the step after the guided ones then takes the space's first 2-NFE op (``text``: one
        guidance direction), so that the start the polish compares with spends the whole budget.
        """
        budget = self.hparams.budget if budget is None else budget
        T, full = self.num_inference_steps, self.space.full_op
        if full not in self.candidates or {"op": "cond"} not in self.candidates:
            return None
        k_full, k_cond = self.candidates.index(full), self.candidates.index({"op": "cond"})
        guided, extra = divmod(budget - T, self.costs[k_full] - 1)  # each guided step costs this much more
        middle = [k for k, c in enumerate(self.costs) if c == 1 + extra][:1] if extra else []
        if (extra and not middle) or not 0 <= guided <= T - len(middle):
            return None
        return [k_full] * guided + middle + [k_cond] * (T - guided - len(middle))

    def polish_starts(self, batch: dict, picks: list[int], rounds: int) -> tuple[list[int], dict]:
        """``polish`` from the discretised gates or from the cutoff at the budget (where the space
        holds it), as ``polish_from`` says. A local search from the gates alone can stay in their
        basin (e.g. ``cond`` at early steps, where the gradients are blind); the cutoff is the
        hand-tuned policy the search must at least match. ``leader`` polishes the start closer to
        the teacher on ``batch``; ``both`` polishes each and keeps the one that ends closer,
        for twice the time (the start behind can overtake: results/search_polish_starts)."""
        starts = {"gates": picks}
        cutoff = self.cutoff_picks(sum(self.costs[k] for k in picks))
        if cutoff is not None and cutoff != picks:
            starts["cutoff"] = cutoff
        if self.hparams.get("polish_from", "leader") == "leader" and len(starts) > 1:
            B = len(batch["seed"])
            with torch.no_grad():
                before = {name: self._student_distance(batch, self._hard_weights(p, B), False, False)[1].item()
                          for name, p in starts.items()}
            name = min(before, key=before.get)
            kept, record = self.polish(batch, starts[name], rounds)
            return kept, {**record, "start": name, "distance_before_by_start": before}
        found = {name: self.polish(batch, p, rounds) for name, p in starts.items()}
        start = min(found, key=lambda name: found[name][1]["distance_after"])
        kept, record = found[start]
        record = {**record, "start": start,
                  "distance_after_by_start": {name: r["distance_after"] for name, (_, r) in found.items()}}
        return kept, record

    def monitor(self, run_dir):
        from agsearch.search.callbacks import GateMonitor

        return GateMonitor(run_dir)

    def end_of_run_policy(self, data, **provenance) -> Policy:
        """The discretised gates, polished on the validation pairs where ``polish_rounds`` asks."""
        picks, polish = self.discrete_indices(), None
        if self.hparams.polish_rounds and data["num_val"]:
            from agsearch.search.data import PairDataset

            batch = PairDataset(data["val_seed"], data["num_val"], self.backend.num_conditions).batch(self.device)
            picks, polish = self.polish_starts(batch, picks, self.hparams.polish_rounds)
        return self.export_policy(picks=picks, polish=polish, **provenance)

    def exported_policy(self, budget: int | None, mode: str, data, **provenance) -> Policy:
        return self.export_policy(budget, mode, **provenance)

    def export_policy(self, budget: int | None = None, mode: str | None = None, picks: list[int] | None = None,
                      **provenance) -> Policy:
        """The discretised policy (or the given ``picks``) as a policy file object, with the
        search's provenance."""
        mode = mode or self.hparams.discretization
        budget = self.hparams.budget if budget is None else budget
        picks = self.discrete_indices(budget, mode) if picks is None else picks
        steps = [dict(self.candidates[k]) for k in picks]
        for i, step in enumerate(steps):
            if step["op"] == "affine":
                coef = affine_coef_at(self.affine_coef.detach().cpu(), i)
                step["coef"] = {name: (v.tolist() if v.dim() else float(v)) for name, v in coef.items()}
        nfe = sum(self.costs[k] for k in picks)
        backend = self.backend
        search = {
            "space": self.space.name,
            "ops": self.space.labels(self.candidates),
            "relaxation": self.space.relaxation,
            "budget": int(budget),
            "search_budget": int(self.hparams.budget),
            "discretization": mode,
            "train_steps": int(self.global_step),
            "seconds": round(self.search_seconds, 2),
            **provenance,
        }
        return Policy.static(
            steps, self.guidance_scale, name=f"searched-{self.space.name}-{nfe}", **self._conditions(),
            provenance={
                **backend.provenance(),  # "model" (and for a pipeline its folder and prompt file)
                "scheduler": type(backend.scheduler).__name__,
                "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale,
                "search": search,
            },
        )

    @property
    def checkpointing(self) -> bool:
        """Whether the student's denoiser calls are gradient-checkpointed (``checkpointing=None``:
        on an accelerator, not on CPU)."""
        if self.hparams.checkpointing is None:
            return self.device.type != "cpu"
        return bool(self.hparams.checkpointing)

    # -- trajectories -----------------------------------------------------------------------------
    def _trajectory(self, noise, cond, weights: torch.Tensor | None, compute_all: bool, checkpointing: bool):
        """Final samples and, if trajectory terms are on, the intermediate ones (T, B, ...)."""
        xs: list[torch.Tensor] = []
        keep = self.hparams.trajectory_weight > 0
        callback = (lambda stats: xs.append(stats.x)) if keep else None
        denoiser = CheckpointedDenoiser(self.backend.denoiser) if checkpointing else self.backend.denoiser
        if weights is None:  # the teacher: full guidance at the run's scale(s)
            out = sample(denoiser, self.backend.scheduler, self.teacher_policy(), noise, cond, callback=callback)
        else:
            out = sample(denoiser, self.backend.scheduler, None, noise, cond, controller=self._controller(weights, compute_all),
                         callback=callback)
        return out.samples, (torch.stack(xs[1:]) if keep and len(xs) > 1 else None)

    def _conditions(self) -> dict:
        """The policy fields of a two-condition (editing) run: its image scale; none otherwise."""
        if self.space.conditions == 1:
            return {}
        return {"conditions": 2, "image_guidance_scale": float(self.backend.image_guidance_scale)}

    def teacher_policy(self) -> Policy:
        """Full guidance at the run's scale(s): CFG, or full two-condition guidance for an editor."""
        key = (self.num_inference_steps, float(self.guidance_scale))
        return full_guidance(key if self.space.conditions == 1 else (*key, float(self.backend.image_guidance_scale)))

    def _controller(self, weights: torch.Tensor, compute_all: bool) -> GateController:
        return GateController(self.candidates, weights, self.guidance_scale, compute_all, self.affine_coef,
                              self._conditions().get("image_guidance_scale"))

    @torch.no_grad()
    def teacher(self, seeds: torch.Tensor, noise: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full-CFG final samples (and trajectories) for ``seeds``, computed once per seed."""
        missing = [j for j, s in enumerate(seeds.tolist()) if s not in self._teacher_cache]
        if missing:
            idx = torch.tensor(missing, device=noise.device)
            final, traj = self._trajectory(noise[idx], cond[idx], None, False, False)
            for n, j in enumerate(missing):
                self._teacher_cache[int(seeds[j])] = (final[n].cpu(), None if traj is None else traj[:, n].cpu())
        items = [self._teacher_cache[int(s)] for s in seeds.tolist()]
        final = torch.stack([f for f, _ in items]).to(noise.device)
        traj = None if items[0][1] is None else torch.stack([t for _, t in items], dim=1).to(noise.device)
        return final, traj

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = (a - b).float()
        return diff.pow(2).mean() if self.hparams.distance == "mse" else diff.abs().mean()

    def _student_distance(self, batch, weights, compute_all: bool, checkpointing: bool):
        self._on_device()
        seeds, labels = batch["seed"], batch["label"]
        noise = self.backend.noise(seeds, self.device)
        cond = self.backend.condition(labels)
        target, target_traj = self.teacher(seeds, noise, cond)
        final, traj = self._trajectory(noise, cond, weights, compute_all, checkpointing)
        d_final = self._distance(final, target)
        d = d_final
        if traj is not None and target_traj is not None:
            d = d + self.hparams.trajectory_weight * self._distance(traj, target_traj)
        return d, d_final

    # -- Lightning --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        weights = self.gate_weights(batch["seed"])
        compute_all = self.hparams.straight_through == "all"
        distance, d_final = self._student_distance(batch, weights, compute_all, self.checkpointing)
        if self.loss_scale.item() == 0:
            d0 = distance.detach().clamp_min(1e-12)
            if self._trainer is not None:
                d0 = self.trainer.strategy.reduce(d0, reduce_op="mean")
            self.loss_scale.fill_(float(d0))
        T = self.num_inference_steps
        e_nfe = self.expected_nfe()
        probs = self.gate_logits.float().softmax(dim=1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean()
        loss = distance / self.loss_scale + self.dual * (e_nfe - self.hparams.budget) / T
        if self.hparams.entropy_weight > 0:
            loss = loss + self.hparams.entropy_weight * entropy
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"search loss is {loss.item()} at step {self.global_step} (distance {distance.item()}, "
                f"λ {self.dual.item():.4g}); the run stopped"
            )
        self.log_dict({
            "train/loss": loss.detach(), "train/distance": d_final.detach(), "train/expected_nfe": e_nfe.detach(),
            "train/dual": self.dual.clone(), "train/temperature": float(self.temperature()), "train/entropy": entropy.detach(),
        }, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(batch["seed"]))
        self.log("nfe", e_nfe.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch["seed"]))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Dual ascent on λ after the gates moved: λ ← max(0, λ + ρ (E[NFE] − B) / T).
        with torch.no_grad():
            gap = (self.expected_nfe() - self.hparams.budget) / self.num_inference_steps
            self.dual.copy_((self.dual + self.hparams.dual_lr * gap).clamp_min(0))

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        B = len(batch["seed"])
        relaxed = (self.gate_logits.float() / self.temperature()).softmax(dim=1).expand(B, -1, -1)
        _, d_relaxed = self._student_distance(batch, relaxed, False, False)
        picks = self.discrete_indices()
        _, d_discrete = self._student_distance(batch, self._hard_weights(picks, B), False, False)
        self.log_dict({
            "val/relaxed_distance": d_relaxed, "val/discrete_distance": d_discrete,
            "val/discrete_nfe": float(sum(self.costs[k] for k in picks)),
            "val/expected_nfe": self.expected_nfe(),
        }, prog_bar=False, on_epoch=True, batch_size=B, sync_dist=True)

    def configure_optimizers(self):
        groups = [{"params": [self.gate_logits]}]
        if self.affine_coef is not None and self.affine_coef.requires_grad:
            groups.append({"params": [self.affine_coef], "lr": self.hparams.affine_lr, "shared": False})
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam([{k: v for k, v in g.items() if k != "shared"} for g in groups], lr=self.hparams.lr)
        return SharedScaleAdam(groups, lr=self.hparams.lr)

def _initial_logits(candidates: list[dict], costs: list[int], T: int, budget: int, init: str,
                    full: dict | None = None) -> torch.Tensor:
    """(T, K) starting logits, the same at every step.

    ``uniform``: zeros. ``teacher``: probability 0.9 on CFG at the run's scale (the teacher's
    op), the rest spread evenly: the student starts as the teacher and the budget takes guidance
    away where it matters least. ``budget``: probability split between the cheapest and the
    dearest ops so that E[NFE] = budget. ``cutoff``: probability 0.9 on CFG at the run's scale for
    the first k steps and on ``cond`` after them, k the most the budget allows (the CFG cutoff of
    that budget), the rest spread evenly: the search starts at the strongest simple baseline and
    moves off it only where the loss says so (``budget`` without a ``cfg`` and a ``cond`` op).
    """
    logits = torch.zeros(T, len(costs))
    lo, hi = min(costs), max(costs)
    full = full or {"op": "cfg"}  # the teacher's op: cfg, or edit for an image editor
    if init == "cutoff" and full in candidates and {"op": "cond"} in candidates:
        guide, skip = candidates.index(full), candidates.index({"op": "cond"})
        k = max(0, min(T, (budget - T * costs[skip]) // max(1, costs[guide] - costs[skip])))
        rest = math.log(0.1 / (len(costs) - 1))
        logits[:] = rest
        logits[:k, guide] = math.log(0.9)
        logits[k:, skip] = math.log(0.9)
        return logits
    if init == "teacher" and full in candidates:
        k = candidates.index(full)
        rest = 0.1 / (len(costs) - 1)
        logits[:] = math.log(rest)
        logits[:, k] = math.log(0.9)
        return logits
    if init == "uniform" or lo == hi:
        return logits
    target = budget / T  # per-step cost
    # Probability q on the dearest ops and 1 − q on the others, spread evenly within each group,
    # so that E[cost] = q · hi + (1 − q) · (the others' mean cost) = the budget's per-step cost.
    n_hi = sum(c == hi for c in costs)
    n_lo = len(costs) - n_hi
    mean_lo = sum(c for c in costs if c != hi) / n_lo
    q = min(max((target - mean_lo) / (hi - mean_lo), 1e-3), 1 - 1e-3)
    for k, c in enumerate(costs):
        logits[:, k] = math.log(q / n_hi) if c == hi else math.log((1 - q) / n_lo)
    return logits


def _affine_coefficients(entry: dict, T: int, guidance_scale: float, model: str = "digits") -> torch.Tensor:
    """(T, R) or (T, R, C) starting coefficients of a space's ``affine`` op, from its fit file."""
    from agsearch.linear_ag import (
        BUILTIN_MODELS,
        REGRESSORS,
        AffineError,
        check_matches,
        load_builtin,
        load_coefficients,
    )

    source = entry.get("coefficients", "builtin")
    if source == "builtin" and model not in BUILTIN_MODELS:  # never another model's coefficients
        raise AffineError("the space's affine op uses a built-in model's shipped LinearAG coefficients; for a "
                          "pipeline folder, fit its own and name that file in the space's 'coefficients'")
    document = load_builtin(model) if source == "builtin" else load_coefficients(source)
    check_matches(document, T, guidance_scale, "builtin" if source == "builtin" else source)
    return torch.tensor([[c[name] for name in REGRESSORS] for c in document["coefficients"]], dtype=torch.float32)
