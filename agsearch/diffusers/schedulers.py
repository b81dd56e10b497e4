"""diffusers schedulers by short name, all built from the model's training noise schedule."""

from __future__ import annotations

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler ``name`` (one of ``SCHEDULERS``) for a model trained with ``config``."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    # from_config keeps the keys this scheduler knows (the noise schedule) and drops the others.
    return cls.from_config({**config, **overrides})
