"""LinearAG: the unconditional prediction as an affine map of past estimates (Castillo et al.,
"Adaptive Guidance", AAAI 2025, arXiv 2312.12487, Sec. "LinearAG").

In the first half of sampling the unconditional prediction ε_u(t) is close to an affine function
of what the sampler already knows, so a CFG step can run the conditional pass only (1 NFE):

    ε̂_u(t) = a_t ε_c(t) + b_t ε_c(t−1) + c_t ε_u(t−1) + d_t x_t + e_t        (REGRESSORS)
    affine CFG:  ε̂_u(t) + w (ε_c(t) − ε̂_u(t))

with x_t the current sample (before the scheduler's input scaling), ε_c(t−1) and ε_u(t−1) the
previous step's conditional and unconditional estimates (ε_u(t−1) is itself an estimate when
the previous step was affine), all in the model's prediction space. The coefficients are
scalars per step and regressor, or one value per channel (``--per-channel``).

Fitting (``agsearch fit-affine``): full-CFG teacher trajectories on (seed, class) pairs — the
search's training seeds (S = 0) — give, at every step, the regressors and the true ε_u(t). Since
ε_c ≈ ε_u to within 1e-3 in cosine, the fit targets the guidance direction δ = ε_c − ε_u (what
CFG amplifies) by ridge least squares, δ̂ = Σ_r β_r r, and stores ε̂_u = ε_c − δ̂, i.e. a = 1 − β_a
and −β_r for the others; the ridge term shrinks towards δ̂ = 0 (``cond``), not towards ε̂_u = 0.
Step 0 has no past: it is fitted on ε_c, x_t and the bias alone (its past coefficients are 0),
so an affine step 0 needs no fallback. Held-out R² (search-validation seeds, S = 3) is reported
per step for ε_u and for δ; the R² of ε_u is near 1 even for ``cond`` (ε̂_u = ε_c), the R² of δ
is the one that says how much of the guidance the map recovers.

Coefficients file (JSON, ``format: agsearch.affine``): the settings it was fitted for, one
coefficient mapping per step, the per-step R² and the fit time.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from agsearch.policy import read_text_file

REGRESSORS = ("eps_c", "eps_c_prev", "eps_u_prev", "x", "bias")
PAST = ("eps_c_prev", "eps_u_prev")  # what a step needs from the step before it
FALLBACKS = ("cond", "cfg")
FORMAT = "agsearch.affine"
VERSION = 1


class AffineError(ValueError):
    """Invalid affine coefficients; the message names where and the bad value."""


# -- coefficients of one step -------------------------------------------------------------------------
def check_coef(coef: Any, where: str = "coef") -> int | None:
    """Validate one step's coefficient mapping; return its channel count (None for scalars)."""
    if not isinstance(coef, dict):
        raise AffineError(f"{where}: expected a mapping of {', '.join(REGRESSORS)} to numbers, got {_short(coef)}")
    keys = set(coef)
    if keys != set(REGRESSORS):
        missing, extra = sorted(set(REGRESSORS) - keys), sorted(keys - set(REGRESSORS))
        raise AffineError(f"{where}: expected exactly the regressors {', '.join(REGRESSORS)}"
                          + (f"; missing {', '.join(missing)}" if missing else "")
                          + (f"; unknown {', '.join(map(str, extra))}" if extra else ""))
    channels = None
    for name in REGRESSORS:
        value = coef[name]
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise AffineError(f"{where}/{name}: per-channel coefficients must be a non-empty list")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise AffineError(f"{where}/{name}: expected a number or a list of numbers, got {_short(value)}")
            if not math.isfinite(v):
                raise AffineError(f"{where}/{name}: {v} is not a finite number")
        if isinstance(value, list):
            if channels is not None and len(value) != channels:
                raise AffineError(f"{where}/{name}: {len(value)} per-channel values, but other regressors have {channels}")
            channels = len(value)
    if channels is not None and not all(isinstance(coef[n], list) for n in REGRESSORS):
        raise AffineError(f"{where}: mixes per-channel lists and scalars; give every regressor {channels} values")
    return channels


def needs_past(coef: dict) -> bool:
    """Whether a step's map uses the previous step's estimates (a non-zero past coefficient)."""
    for name in PAST:
        value = coef[name]
        if isinstance(value, torch.Tensor):
            if value.requires_grad or bool((value != 0).any()):
                return True
        elif any(v != 0 for v in (value if isinstance(value, list) else [value])):
            return True
    return False


def estimate_uncond(coef: dict, eps_c: torch.Tensor, prev_c: torch.Tensor, prev_u: torch.Tensor,
                    x: torch.Tensor) -> torch.Tensor:
    """ε̂_u = a ε_c + b ε_c(t−1) + c ε_u(t−1) + d x_t + e, all (B, C, ...); coefficients are
    numbers, per-channel lists, or tensors (scalar or (C,)), which may carry gradients."""
    channels = eps_c.shape[1] if eps_c.dim() > 1 else 1
    shape = (1, -1) + (1,) * (eps_c.dim() - 2)

    def c(name):
        value = torch.as_tensor(coef[name], dtype=eps_c.dtype, device=eps_c.device)
        if value.dim() == 0:
            return value
        if value.numel() != channels:
            raise AffineError(f"coef/{name}: {value.numel()} per-channel values, but the model's output has {channels} channels")
        return value.view(shape)

    return c("eps_c") * eps_c + c("eps_c_prev") * prev_c + c("eps_u_prev") * prev_u + c("x") * x + c("bias")


# -- the coefficients file ----------------------------------------------------------------------------
def validate_file(document: Any, source: str = "coefficients") -> None:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise AffineError(f"{source}: not an affine coefficients file (expected \"format\": \"{FORMAT}\")")
    if document.get("version") != VERSION:
        raise AffineError(f"{source}: /version: {_short(document.get('version'))} is not supported (expected {VERSION})")
    T = document.get("num_inference_steps")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise AffineError(f"{source}: /num_inference_steps: expected a positive integer, got {_short(T)}")
    w = document.get("guidance_scale")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise AffineError(f"{source}: /guidance_scale: expected a finite number >= 0, got {_short(w)}")
    coefficients = document.get("coefficients")
    if not isinstance(coefficients, list) or len(coefficients) != T:
        n = len(coefficients) if isinstance(coefficients, list) else _short(coefficients)
        raise AffineError(f"{source}: /coefficients: expected one mapping per step ({T}), got {n}")
    channels = {check_coef(c, f"{source}: /coefficients/{i}") for i, c in enumerate(coefficients)}
    if len(channels) > 1:
        raise AffineError(f"{source}: /coefficients: steps disagree on the channel count ({sorted(map(str, channels))})")
    if needs_past(coefficients[0]):
        raise AffineError(f"{source}: /coefficients/0: step 0 has no previous step, so its past coefficients must be 0")


def load_coefficients(path: str | os.PathLike) -> dict:
    """Read and validate a coefficients file written by ``agsearch fit-affine``."""
    path = Path(path)
    text = read_text_file(path, "coefficients file", AffineError)

    def no_constants(name):
        raise AffineError(f"{path}: invalid JSON: {name} is not allowed")

    try:
        document = json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        raise AffineError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    validate_file(document, str(path))
    return document


def builtin_coefficients_path() -> Path:
    from agsearch.models.digits import WEIGHTS_DIR

    return WEIGHTS_DIR / "digits_affine.json"


def load_builtin() -> dict:
    """The coefficients shipped for the built-in digits model (``agsearch fit-affine
    --out agsearch/models/weights/digits_affine.json`` wrote them)."""
    path = builtin_coefficients_path()
    if not path.is_file():
        raise AffineError(f"built-in affine coefficients not found at {path}; run agsearch fit-affine --out {path}")
    return load_coefficients(path)


def check_matches(document: dict, num_inference_steps: int, guidance_scale: float, source: str = "coefficients") -> None:
    """Coefficients are fitted for one step count and scale; refuse them elsewhere."""
    if document["num_inference_steps"] != num_inference_steps:
        raise AffineError(f"{source}: fitted for {document['num_inference_steps']} steps, but the policy has {num_inference_steps}")
    if not math.isclose(document["guidance_scale"], guidance_scale, rel_tol=1e-9, abs_tol=1e-12):
        raise AffineError(f"{source}: fitted at guidance scale {document['guidance_scale']:g}, but the policy uses {guidance_scale:g}")


# -- fitting ------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_regressors(denoiser, scheduler, noise: torch.Tensor, cond, num_inference_steps: int,
                       guidance_scale: float) -> dict[str, torch.Tensor]:
    """Run full CFG from ``noise`` and collect, per step, the regressors and the target.

    Returns tensors (T, B, C, ...): ``eps_c``, ``eps_u``, ``x`` and the past ``eps_c_prev``,
    ``eps_u_prev`` (zeros at step 0)."""
    from agsearch.policy import Policy
    from agsearch.sampling import sample

    steps: list = []
    policy = Policy.static(["cfg"] * num_inference_steps, guidance_scale)
    sample(denoiser, scheduler, policy, noise, cond,
           callback=lambda s: steps.append((s.x.clone(), s.out_c.clone(), s.out_u.clone())))
    x = torch.stack([s[0] for s in steps])
    eps_c = torch.stack([s[1] for s in steps])
    eps_u = torch.stack([s[2] for s in steps])
    zero = torch.zeros_like(eps_c[:1])
    return {"x": x, "eps_c": eps_c, "eps_u": eps_u,
            "eps_c_prev": torch.cat([zero, eps_c[:-1]]), "eps_u_prev": torch.cat([zero, eps_u[:-1]])}


def _design(data: dict, t: int, channel: int | None, use_past: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (pixels × samples) of regressors (N, R) and the target δ = ε_c − ε_u (N,), float64."""
    def take(name):
        v = data[name][t]  # (B, C, ...)
        v = v[:, channel] if channel is not None else v
        return v.reshape(-1).double()

    cols = [take("eps_c"), take("eps_c_prev") if use_past else None, take("eps_u_prev") if use_past else None,
            take("x"), torch.ones_like(take("x"))]
    X = torch.stack([c if c is not None else torch.zeros_like(cols[0]) for c in cols], dim=1)
    return X, take("eps_c") - take("eps_u")


def _ridge(X: torch.Tensor, y: torch.Tensor, ridge: float, active: list[bool]) -> torch.Tensor:
    """argmin ‖y − Xβ‖² + λ‖β‖² over the active columns, λ = ridge · mean diagonal of XᵀX."""
    idx = [j for j, a in enumerate(active) if a]
    Xa = X[:, idx]
    gram = Xa.T @ Xa
    lam = ridge * gram.diagonal().mean()
    beta_a = torch.linalg.solve(gram + lam * torch.eye(len(idx), dtype=X.dtype), Xa.T @ y)
    beta = torch.zeros(X.shape[1], dtype=X.dtype)
    beta[idx] = beta_a
    return beta


def _r2(y: torch.Tensor, pred: torch.Tensor) -> float:
    total = (y - y.mean()).pow(2).sum()
    return float(1 - (y - pred).pow(2).sum() / total) if total > 0 else float("nan")


def fit(train: dict, heldout: dict, ridge: float = 1e-4, per_channel: bool = False) -> dict:
    """Per-step ridge fits of δ = ε_c − ε_u on the regressors; coefficients for ε̂_u and the
    held-out R² of ε_u and of δ per step, with ``cond``'s R² (δ̂ = 0) beside them."""
    if not (math.isfinite(ridge) and ridge >= 0):
        raise AffineError(f"Expected ridge to be a finite number >= 0, but got {ridge}")
    T, channels = train["eps_c"].shape[0], train["eps_c"].shape[2]
    coefficients, r2_u, r2_delta, r2_cond = [], [], [], []
    for t in range(T):
        use_past = t > 0
        active = [True, use_past, use_past, True, True]
        betas = []
        for ch in (range(channels) if per_channel else [None]):
            X, y = _design(train, t, ch, use_past)
            betas.append(_ridge(X, y, ridge, active))
        beta = torch.stack(betas)  # (channels or 1, R)
        # ε̂_u = ε_c − δ̂: a = 1 − β_a, the others −β.
        sign = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0], dtype=beta.dtype)
        coef_t = beta * sign
        coef_t[:, 0] += 1.0
        coef_t = coef_t + 0.0  # no negative zeros in the file
        coefficients.append({name: ([round(float(v), 8) for v in coef_t[:, j]] if per_channel else round(float(coef_t[0, j]), 8))
                             for j, name in enumerate(REGRESSORS)})
        # Held-out R², all channels together.
        ys, preds, us, uhats = [], [], [], []
        for ci, ch in enumerate(range(channels) if per_channel else [None]):
            X, y = _design(heldout, t, ch, use_past)
            delta_hat = X @ beta[ci]
            ys.append(y), preds.append(delta_hat)
            eps_c = X[:, 0]
            us.append(eps_c - y), uhats.append(eps_c - delta_hat)
        y, pred, u, uhat = (torch.cat(v) for v in (ys, preds, us, uhats))
        r2_delta.append(round(_r2(y, pred), 6))
        r2_u.append(round(_r2(u, uhat), 6))
        r2_cond.append(round(_r2(y, torch.zeros_like(y)), 6))
    return {"coefficients": coefficients, "r2": {"eps_u": r2_u, "delta": r2_delta, "delta_cond": r2_cond}}


def fit_digits(pairs: int = 200, heldout: int = 100, ridge: float = 1e-4, per_channel: bool = False,
               seed: int = 0, heldout_seed: int = 3, device: str = "cpu", scheduler: str | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               batch_size: int = 500) -> dict:
    """Fit LinearAG coefficients on the built-in digits model; returns the coefficients file."""
    from agsearch.data import IMAGE_SHAPE, NULL_CLASS
    from agsearch.denoisers import ClassConditionalDenoiser
    from agsearch.evaluation import balanced_labels, make_noise, sample_seeds
    from agsearch.models.digits import SCHEDULER_CONFIG, benchmark_settings, load_unet
    from agsearch.schedulers import make_scheduler

    for name, value in (("pairs", pairs), ("heldout", heldout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise AffineError(f"Expected {name} to be an integer >= 2, but got {value}")
    if seed == 1 or heldout_seed == 1:
        raise AffineError("seed 1 is the held-out evaluation seed; fit on other seeds (the search uses 0, validation 3)")
    if seed == heldout_seed:
        raise AffineError(f"Expected different fit and held-out seeds, but both are {seed}")
    settings = benchmark_settings()
    scheduler = scheduler or settings["scheduler"]
    T = num_inference_steps or settings["num_inference_steps"]
    w = float(settings["guidance_scale"] if guidance_scale is None else guidance_scale)
    sched = make_scheduler(scheduler, SCHEDULER_CONFIG)
    denoiser = ClassConditionalDenoiser(load_unet().to(device), NULL_CLASS)

    def collect(s: int, n: int) -> dict:
        noise = make_noise(sample_seeds(s, n), IMAGE_SHAPE, device)
        labels = balanced_labels(n, device)
        parts = [teacher_regressors(denoiser, sched, noise[lo:lo + batch_size], labels[lo:lo + batch_size], T, w)
                 for lo in range(0, n, batch_size)]
        return {k: torch.cat([p[k] for p in parts], dim=1).cpu() for k in parts[0]}

    start = time.perf_counter()
    train_data = collect(seed, pairs)
    teacher_seconds = time.perf_counter() - start
    held = collect(heldout_seed, heldout)
    start = time.perf_counter()
    result = fit(train_data, held, ridge, per_channel)
    fit_seconds = time.perf_counter() - start
    return {
        "format": FORMAT, "version": VERSION,
        "model": "agsearch-digits", "scheduler": type(sched).__name__,
        "num_inference_steps": T, "guidance_scale": w,
        "regressors": list(REGRESSORS),
        "target": "eps_u = eps_c - delta; delta fitted by ridge least squares",
        "per_channel": per_channel, "ridge": ridge,
        "pairs": {"fit": {"seed": seed, "count": pairs}, "heldout": {"seed": heldout_seed, "count": heldout}},
        "coefficients": result["coefficients"],
        "r2": result["r2"],
        "seconds": {"teacher": round(teacher_seconds, 3), "fit": round(fit_seconds, 3)},
    }


def r2_table(document: dict) -> str:
    """Per-step held-out R² as a markdown table."""
    r2 = document["r2"]
    lines = ["| step | R² of ε_u | R² of δ = ε_c − ε_u | R² of δ for `cond` (δ̂ = 0) |", "|---:|---:|---:|---:|"]
    for t, (u, d, c) in enumerate(zip(r2["eps_u"], r2["delta"], r2["delta_cond"])):
        lines.append(f"| {t} | {u:.6f} | {d:.4f} | {c:.4f} |")
    return "\n".join(lines)


# -- policies -----------------------------------------------------------------------------------------
def affine_step(coef: dict, fallback: str | None = "cond") -> dict:
    step = {"op": "affine", "coef": coef}
    if fallback is not None:
        step["fallback"] = fallback
    return step


def _phase_steps(T: int, fraction: float) -> int:
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise AffineError(f"Expected fraction to be between 0.0 and 1.0, but got {fraction}")
    return int(fraction * T + 0.5)  # half up: the paper's "first half" of 25 steps is 13


def linear_ag_ops(document: dict, fraction: float = 0.5) -> list[dict]:
    """The paper's LinearAG schedule: true CFG and affine CFG alternating over the first
    round(F·T) steps (CFG on even steps, affine on odd ones), ``cond`` after them."""
    T = document["num_inference_steps"]
    k = _phase_steps(T, fraction)
    return [{"op": "cond"} if i >= k else {"op": "cfg"} if i % 2 == 0 else affine_step(document["coefficients"][i])
            for i in range(T)]


def affine_cutoff_ops(document: dict, fraction: float) -> list[dict]:
    """True CFG for the first round(F·T) steps, affine CFG for the rest: T + round(F·T) NFE."""
    T = document["num_inference_steps"]
    k = _phase_steps(T, fraction)
    return [{"op": "cfg"} if i < k else affine_step(document["coefficients"][i]) for i in range(T)]


def upgrade_cond_steps(steps: list[dict], document: dict) -> list[dict]:
    """Another policy's steps with every ``cond`` step replaced by affine CFG (fallback ``cond``):
    a step that skipped guidance gets the fitted estimate of it at the same cost."""
    return [affine_step(document["coefficients"][i]) if s["op"] == "cond" else dict(s) for i, s in enumerate(steps)]


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
