"""Fit LinearAG's affine coefficients by ridge regression on full-CFG teacher trajectories.

See :mod:`agsearch.linear_ag` for the map and the coefficients file; ``agsearch fit-affine`` runs
:func:`fit_builtin` on a built-in model (digits or shapes).
"""

from __future__ import annotations

import math
import time

import torch

from agsearch.linear_ag import FORMAT, REGRESSORS, VERSION, AffineError


@torch.no_grad()
def teacher_regressors(denoiser, scheduler, noise: torch.Tensor, cond, num_inference_steps: int,
                       guidance_scale: float) -> dict[str, torch.Tensor]:
    """Run full CFG from ``noise`` and collect, per step, the regressors and the target.

    Returns tensors (T, B, C, ...): ``eps_c``, ``eps_u``, ``x`` and the past ``eps_c_prev``,
    ``eps_u_prev`` (zeros at step 0)."""
    from agsearch.guidance.sampler import sample
    from agsearch.policy import Policy

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


def _digits_source(device, scheduler: str | None):
    """(settings, scheduler, denoiser, collect(seed, rows) -> (noise, cond)) of the digits model."""
    from agsearch.denoisers.class_conditional import ClassConditionalDenoiser
    from agsearch.diffusers.schedulers import make_scheduler
    from agsearch.models.digits import SCHEDULER_CONFIG, benchmark_settings, load_unet
    from agsearch.models.digits.data import IMAGE_SHAPE, NULL_CLASS, NUM_CLASSES
    from agsearch.seeds import make_noise, sample_seeds

    settings = benchmark_settings()
    sched = make_scheduler(scheduler or settings["scheduler"], SCHEDULER_CONFIG)
    denoiser = ClassConditionalDenoiser(load_unet().to(device), NULL_CLASS)

    def batch(seed: int, lo: int, hi: int):  # balanced class labels, as the evaluation's
        return make_noise(sample_seeds(seed, hi - lo, lo), IMAGE_SHAPE, device), torch.arange(lo, hi, device=device) % NUM_CLASSES

    return settings, sched, denoiser, batch


def _shapes_source(device, scheduler: str | None):
    """The same for the shapes pipeline: training captions drawn by the pairs' seed (categories in
    turn, as the search's), the empty prompt unconditional, latent noise."""
    from agsearch.denoisers.text import TextCondition, UNetTextDenoiser
    from agsearch.diffusers.schedulers import make_scheduler
    from agsearch.models.shapes import benchmark_settings, load_pipeline, scenes
    from agsearch.seeds import make_noise, sample_seeds

    settings = benchmark_settings()
    pipe = load_pipeline(device=device)
    sched = make_scheduler(scheduler or settings["scheduler"], dict(pipe.scheduler.config))
    denoiser = UNetTextDenoiser(pipe.unet, pipe.scheduler.config.get("prediction_type", "epsilon"))
    unet = pipe.unet.config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)
    captions: dict[int, list] = {}

    def batch(seed: int, lo: int, hi: int):
        if len(captions.get(seed, ())) < hi:
            captions[seed] = scenes.eval_captions(max(hi, 2 * len(captions.get(seed, ()))), seed, "train")
        texts = [c.text for c in captions[seed][lo:hi]]
        return (make_noise(sample_seeds(seed, hi - lo, lo), shape, device),
                TextCondition.from_pipeline(pipe, texts, [""] * len(texts)))

    return settings, sched, denoiser, batch


def fit_builtin(model: str = "digits", pairs: int = 200, heldout: int = 100, ridge: float = 1e-4,
                per_channel: bool = False, seed: int = 0, heldout_seed: int = 3, device: str = "cpu",
                scheduler: str | None = None, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, batch_size: int = 500) -> dict:
    """Fit LinearAG coefficients on a built-in model (``digits`` or ``shapes``, at its benchmark
    settings unless given) on ``pairs`` full-CFG teacher trajectories of seed ``seed``, with the
    held-out R² on ``heldout`` of ``heldout_seed``; returns the coefficients file."""
    for name, value in (("pairs", pairs), ("heldout", heldout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise AffineError(f"Expected {name} to be an integer >= 2, but got {value}")
    if seed == 1 or heldout_seed == 1:
        raise AffineError("seed 1 is the held-out evaluation seed; fit on other seeds (the search uses 0, validation 3)")
    if seed == heldout_seed:
        raise AffineError(f"Expected different fit and held-out seeds, but both are {seed}")
    sources = {"digits": _digits_source, "shapes": _shapes_source}
    if model not in sources:
        raise AffineError(f"unknown built-in model {model!r}; expected digits or shapes")
    settings, sched, denoiser, batch = sources[model](device, scheduler)
    T = num_inference_steps or settings["num_inference_steps"]
    w = float(settings["guidance_scale"] if guidance_scale is None else guidance_scale)

    def collect(s: int, n: int) -> dict:
        parts = [teacher_regressors(denoiser, sched, *batch(s, lo, min(lo + batch_size, n)), T, w)
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
        "model": f"agsearch-{model}", "scheduler": type(sched).__name__,
        "num_inference_steps": T, "guidance_scale": w,
        "regressors": list(REGRESSORS),
        "target": "eps_u = eps_c - delta; delta fitted by ridge least squares",
        "per_channel": per_channel, "ridge": ridge,
        "pairs": {"fit": {"seed": seed, "count": pairs}, "heldout": {"seed": heldout_seed, "count": heldout}},
        "coefficients": result["coefficients"],
        "r2": result["r2"],
        "seconds": {"teacher": round(teacher_seconds, 3), "fit": round(fit_seconds, 3)},
    }


def fit_digits(**kwargs) -> dict:
    """:func:`fit_builtin` on the digits model."""
    return fit_builtin("digits", **kwargs)


def r2_table(document: dict) -> str:
    """Per-step held-out R² as a markdown table."""
    r2 = document["r2"]
    lines = ["| step | R² of ε_u | R² of δ = ε_c − ε_u | R² of δ for `cond` (δ̂ = 0) |", "|---:|---:|---:|---:|"]
    for t, (u, d, c) in enumerate(zip(r2["eps_u"], r2["delta"], r2["delta_cond"])):
        lines.append(f"| {t} | {u:.6f} | {d:.4f} | {c:.4f} |")
    return "\n".join(lines)


