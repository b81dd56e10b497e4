"""The guidance kernel: the op table and every formula that combines the two passes.

    op       output                                   passes (cond, uncond)   NFE
    cfg      ε_u + w (ε_c − ε_u)                       both                    2
    cond     ε_c                                       cond                    1
    uncond   ε_u                                       uncond                  1
    affine   p · [ε̂_u + w (ε_c − ε̂_u)] + (1 − p) · fallback,  cond (+ uncond  1 (2 where it falls
             ε̂_u the LinearAG map of past estimates  where it falls back)    back to cfg)

Also here: the scale inversion a pipeline hook needs (:func:`uncond_for_scale`), x̂₀ of a model output
(:func:`predict_x0`), the agreement γ = cos(a, b) (:func:`cosine`) and the Adaptive Guidance stop rule
(:func:`stops`; Castillo et al., AAAI 2025, arXiv 2312.12487). The sampler, the diffusers hook, the
modular-pipeline guider and the adaptive search call these; none writes a formula of its own.
Adding an op is one edit here: ``OP_NFE``, :func:`op_passes`, :func:`op_output`.

Two-condition guidance (image editing, InstructPix2Pix: Brooks et al., CVPR 2023, arXiv 2211.09800)
has three passes, ε_IT = ε(image, text), ε_I = ε(image, ∅) and ε_∅ = ε(∅, ∅), and its own ops
(:data:`EDIT_OP_NFE`, :func:`edit_op_passes`, :func:`edit_output`):

    op      output                                         passes            NFE
    edit    ε_∅ + s_T (ε_IT − ε_I) + s_I (ε_I − ε_∅)        IT, I, ∅          3
    text    ε_I + s_T (ε_IT − ε_I)    (edit at s_I = 1)     IT, I             2
    joint   ε_∅ + s (ε_IT − ε_∅)      (edit at s_T = s_I)   IT, ∅             2
    cond    ε_IT                                           IT                1

Image guidance alone at full text conditioning would need ε(∅, text), which no editor computes;
``joint`` is the cheap combination that keeps an image term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agsearch.linear_ag import estimate_uncond, needs_past

OP_NFE = {"cfg": 2, "cond": 1, "uncond": 1, "affine": 1}  # affine: 2 where it falls back to cfg
PARAMETERISATIONS = ("epsilon", "v_prediction", "flow")
EDIT_OP_NFE = {"edit": 3, "text": 2, "joint": 2, "cond": 1}  # two-condition guidance (editing)
EDIT_PASSES = ("full", "image", "none")  # ε(image, text), ε(image, ∅), ε(∅, ∅)



# -- the ops ----------------------------------------------------------------------------------------
def op_passes(op: dict) -> tuple[bool, bool]:
    """Which passes (conditional, unconditional) an op needs; an ``affine`` op's unconditional
    pass is needed only where it falls back to ``cfg`` (decided per sample by the loop)."""
    name = op["op"]
    return name in ("cfg", "cond", "affine"), name in ("cfg", "uncond")


def cfg(out_c: torch.Tensor, out_u: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance, ε_u + w (ε_c − ε_u) (Ho & Salimans 2022, arXiv 2207.12598)."""
    return out_u + scale * (out_c - out_u)


def uncond_for_scale(out_c: torch.Tensor, out_u: torch.Tensor, scale, call_scale) -> torch.Tensor:
    """The unconditional output ε_u' to hand a pipeline that guides at ``call_scale`` W so that its
    ε_u' + W (ε_c − ε_u') is CFG at ``scale`` w: ε_u' = ε_c − (w − 1)/(W − 1) · (ε_c − ε_u)."""
    return out_c - (scale - 1) / (call_scale - 1) * (out_c - out_u)


def op_output(op: dict, out_c: torch.Tensor, out_u: torch.Tensor, default_scale: float) -> torch.Tensor:
    """The output of a ``cfg`` (at its own scale, else ``default_scale``), ``cond`` or ``uncond`` op."""
    name = op["op"]
    if name == "cfg":
        return cfg(out_c, out_u, op.get("scale", default_scale))
    if name == "cond":
        return out_c
    if name == "uncond":
        return out_u
    if name == "affine":
        raise ValueError("an affine op needs the past estimates: use affine_output")
    raise ValueError(f"unknown guidance op {name!r}")


def edit_op_passes(op: dict) -> tuple[bool, bool, bool]:
    """Which of the three passes (:data:`EDIT_PASSES`) a two-condition op needs."""
    name = op["op"]
    if name not in EDIT_OP_NFE:
        raise ValueError(f"unknown two-condition guidance op {name!r}; expected one of {', '.join(EDIT_OP_NFE)}")
    return True, name in ("edit", "text"), name in ("edit", "joint")


def edit_output(op: dict, e_full: torch.Tensor, e_image: torch.Tensor, e_none: torch.Tensor, scale,
                image_scale) -> torch.Tensor:
    """The output of a two-condition op; ``scale`` (s_T) and ``image_scale`` (s_I) are the policy's,
    which the op's own ``scale`` / ``image_scale`` override. ``edit`` is summed in the order
    diffusers' InstructPix2Pix pipeline sums it, so a full-guidance policy reproduces it bit for bit."""
    name = op["op"]
    s_t, s_i = op.get("scale", scale), op.get("image_scale", image_scale)
    if name == "edit":
        return e_none + s_t * (e_full - e_image) + s_i * (e_image - e_none)
    if name == "text":
        return e_image + s_t * (e_full - e_image)
    if name == "joint":
        return e_none + op.get("scale", image_scale) * (e_full - e_none)
    if name == "cond":
        return e_full
    raise ValueError(f"unknown two-condition guidance op {name!r}; expected one of {', '.join(EDIT_OP_NFE)}")


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
    guided = cfg(out_c, u_hat, default_scale)
    fallback = op.get("fallback")
    fb_out = cfg(out_c, out_u, default_scale) if fallback == "cfg" else out_c
    fb_u = 1.0 if fallback == "cfg" else 0.0
    pv = p.view(shape)
    output = pv * guided + (1 - pv) * fb_out
    provided_u = pv * u_hat + (1 - pv) * fb_u * out_u
    return output, provided_u, p + (1 - p) * fb_u


# -- x̂₀, agreement, the stop rule ----------------------------------------------------------------------
def predict_x0(scheduler, x: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, i: int,
               parameterisation: str = "epsilon") -> torch.Tensor:
    """The denoised estimate x̂_0 implied by a model output at step ``i`` (timestep ``t``) of the
    unscaled sample ``x``; ``parameterisation`` is the denoiser's (:data:`PARAMETERISATIONS`)."""
    if parameterisation == "flow":
        # Rectified flow (SD3): x = (1 − σ) x_0 + σ ε and the model predicts v = ε − x_0.
        return x - scheduler.sigmas[i].to(x) * model_output
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        # Karras-style σ parameterisation (Euler): x = x_0 + σ ε, the model sees x / sqrt(σ² + 1).
        sigma = scheduler.sigmas[i].to(x)
        if parameterisation == "epsilon":
            return x - sigma * model_output
        if parameterisation == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
        alpha_bar = scheduler.alphas_cumprod.to(x.device)[int(t)].to(x)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if parameterisation == "epsilon":
            return (x - s * model_output) / a
        if parameterisation == "v_prediction":
            return a * x - s * model_output
    raise ValueError(f"x0 prediction for parameterisation {parameterisation!r} is not supported; "
                     f"expected one of {', '.join(PARAMETERISATIONS)}")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of two batches (B, ...): the agreement γ of the conditional and
    unconditional predictions."""
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


def edit_agreement(full: torch.Tensor, image: torch.Tensor, none: torch.Tensor) -> torch.Tensor:
    """γ of two-condition guidance, per sample: min(cos(full, image), cos(image, none)), the
    agreement of the text direction's and of the image direction's two ends. Each guidance term
    vanishes only when its own pair agrees, so the rule stops guiding only once both are small; the
    outer pair's cosine (full against none) mixes the two, so a large term can hide a small one."""
    return torch.minimum(cosine(full, image), cosine(image, none))


def stops(gamma: torch.Tensor, threshold) -> torch.Tensor:
    """Adaptive Guidance's stop rule: where γ ≥ θ (and θ < 1) a sample stops guiding. NaN γ (a
    step that did not run both passes) never stops; θ = 1 keeps guiding, since a float32 cosine
    can round to 1 where the predictions nearly agree."""
    return (gamma >= threshold) & (threshold < 1)
