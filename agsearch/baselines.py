"""Training-free guidance policies a user would otherwise pick by hand, as policy files.

    cfg          full CFG at every step (2T NFE)
    cond         the conditional pass only (T NFE)
    cutoff       CFG for the first round(F·T) steps, then ``cond``: Step-AG, diffusers'
                 ``SDCFGCutoffCallback`` / ``ClassifierFreeGuidance(start, stop)``
    interval     CFG only for steps whose position i/T lies in [A, B) (guidance interval,
                 Kynkäänniemi et al., NeurIPS 2024, arXiv 2404.07724)
    alternating  CFG on even steps, ``cond`` on odd ones
    ag           the Adaptive Guidance rule (Castillo et al., arXiv 2312.12487): per sample, CFG
                 until cos(pred_c, pred_u) reaches a threshold, then ``cond``
    linear-ag    LinearAG (same paper): CFG and ``affine`` (ε_u from fitted affine coefficients,
                 ``agsearch.linear_ag``) alternating over the first half (or the first round(F·T)
                 steps), ``cond`` over the rest
                 (or, given a static policy ``base``: that policy with its ``cond`` steps affine)
    affine-cutoff  CFG for the first round(F·T) steps, then ``affine`` to the end

With ``image_scale`` (s_I) a baseline is a two-condition policy for an image editor
(InstructPix2Pix; ``"conditions": 2``): each ``cfg`` step above is full two-condition guidance
(``edit``, 3 NFE) and ``ag`` watches both guidance directions; one more baseline applies there:

    image-cutoff  ``edit`` for the first round(F·T) steps, then ``text`` (text guidance only, 2 NFE)
"""

from __future__ import annotations

import math

from agsearch.policy import Policy

BASELINES = ("cfg", "cond", "cutoff", "interval", "alternating", "ag", "linear-ag", "affine-cutoff", "image-cutoff")
EDIT_BASELINES = ("cfg", "cond", "cutoff", "interval", "alternating", "ag", "image-cutoff")  # with image_scale


def _check_unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"Expected {name} to be between 0.0 and 1.0, but got {value}")


def cutoff_ops(steps: int, fraction: float) -> list[str]:
    _check_unit("fraction", fraction)
    k = round(fraction * steps)
    return ["cfg"] * k + ["cond"] * (steps - k)


def interval_ops(steps: int, start: float, stop: float) -> list[str]:
    _check_unit("start", start)
    _check_unit("stop", stop)
    if start > stop:
        raise ValueError(f"Expected start <= stop, but got start={start} and stop={stop}")
    return ["cfg" if start <= i / steps < stop else "cond" for i in range(steps)]


def make_baseline(name: str, steps: int, scale: float, *, fraction: float | None = None,
                  start: float | None = None, stop: float | None = None,
                  threshold: float | None = None, space: str = "x0", affine: dict | None = None,
                  base: Policy | None = None, image_scale: float | None = None) -> Policy:
    """The named baseline policy for ``steps`` sampling steps at guidance scale ``scale``;
    ``linear-ag`` needs ``affine``, a coefficients file's contents (``agsearch.linear_ag``). With
    ``image_scale``, the two-condition (editing) baseline at text scale ``scale`` and image scale
    ``image_scale`` (:data:`EDIT_BASELINES`)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected steps to be a positive integer, but got {steps}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"Expected scale to be a finite number >= 0, but got {scale}")
    options: dict = {}
    if image_scale is not None:
        if not (isinstance(image_scale, (int, float)) and math.isfinite(image_scale) and image_scale >= 0):
            raise ValueError(f"Expected the image scale to be a finite number >= 0, but got {image_scale}")
        if name not in EDIT_BASELINES:
            raise ValueError(f"{name!r} is not a two-condition (editing) baseline; expected one of "
                             f"{', '.join(EDIT_BASELINES)}")
        edit = {"image_guidance_scale": image_scale, "conditions": 2}
    elif name == "image-cutoff":
        raise ValueError("image-cutoff is a two-condition (editing) baseline: give an image guidance scale")
    if name == "image-cutoff":
        if fraction is None:
            raise ValueError("image-cutoff needs --fraction F (full guidance for the first round(F*T) steps, then text)")
        k = cutoff_ops(steps, fraction).count("cfg")
        return Policy.static(["edit"] * k + ["text"] * (steps - k), scale, name=f"image-cutoff-{k}/{steps}",
                             provenance={"baseline": name, "options": {"fraction": fraction}}, **edit)
    if name == "cfg":
        ops, label = ["cfg"] * steps, "cfg"
    elif name == "cond":
        ops, label = ["cond"] * steps, "cond"
    elif name == "cutoff":
        if fraction is None:
            raise ValueError("cutoff needs --fraction F (CFG for the first round(F*T) steps)")
        ops, options = cutoff_ops(steps, fraction), {"fraction": fraction}
        label = f"cutoff-{ops.count('cfg')}/{steps}"
    elif name == "interval":
        if start is None or stop is None:
            raise ValueError("interval needs --start A and --stop B (CFG where i/T is in [A, B))")
        ops, options = interval_ops(steps, start, stop), {"start": start, "stop": stop}
        on = [i for i, op in enumerate(ops) if op == "cfg"]
        label = f"interval-{on[0]}:{on[-1] + 1}/{steps}" if on else f"interval-empty/{steps}"
    elif name == "alternating":
        ops, label = ["cfg" if i % 2 == 0 else "cond" for i in range(steps)], "alternating"
    elif name == "ag":
        if threshold is None:
            raise ValueError("ag needs --threshold G")
        if space not in ("x0", "eps"):
            raise ValueError(f"Expected space to be 'x0' or 'eps', but got {space!r}")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and -1 <= threshold <= 1):
            raise ValueError(f"Expected threshold to be between -1.0 and 1.0, but got {threshold}")
        return Policy.adaptive(steps, scale, threshold, space, name=f"ag-{space}-{threshold:g}",
                               provenance={"baseline": "ag", "options": {"threshold": threshold, "space": space}},
                               **(edit if image_scale is not None else {}))
    elif name in ("linear-ag", "affine-cutoff"):
        from agsearch.linear_ag import (
            affine_cutoff_ops,
            check_matches,
            linear_ag_ops,
            validate_file,
        )

        if affine is None:
            raise ValueError(f"{name} needs affine coefficients (--affine FILE, written by agsearch fit-affine)")
        validate_file(affine)
        check_matches(affine, steps, scale)
        if name == "linear-ag" and base is not None:
            from agsearch.linear_ag import upgrade_cond_steps

            if base.kind != "static" or base.num_inference_steps != steps or base.guidance_scale != scale:
                raise ValueError(f"--from: expected a static policy with {steps} steps at scale {scale:g}, got a "
                                 f"{base.kind} one with {base.num_inference_steps} steps at {base.guidance_scale:g}")
            ops, label = upgrade_cond_steps(base.steps, affine), f"linear-ag+{base.label()}"
            options = {"from": base.label()}
        elif name == "linear-ag":
            fraction = 0.5 if fraction is None else fraction
            ops = linear_ag_ops(affine, fraction)
            label = "linear-ag" if fraction == 0.5 else f"linear-ag-{fraction:g}"
        else:
            if fraction is None:
                raise ValueError("affine-cutoff needs --fraction F (CFG for the first round(F*T) steps, then affine)")
            ops = affine_cutoff_ops(affine, fraction)
            label = f"affine-cutoff-{sum(op['op'] == 'cfg' for op in ops)}/{steps}"
        options = {**options, "fraction": fraction,
                   "affine": {k: affine[k] for k in ("model", "per_channel", "ridge", "pairs") if k in affine}}
    else:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
    if image_scale is not None:
        return Policy.static(["edit" if op == "cfg" else op for op in ops], scale, name=label,
                             provenance={"baseline": name, "options": options}, **edit)
    return Policy.static(ops, scale, name=label, provenance={"baseline": name, "options": options})
