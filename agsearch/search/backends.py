"""Frozen model backends the search trains against: a denoiser behind the ``sampling.Denoiser``
contract, a scheduler, and per-sample seeded noise. Kept outside the LightningModule's
submodules, so checkpoints hold the gates and never the model weights.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from agsearch.data import IMAGE_SHAPE, NULL_CLASS
from agsearch.denoisers import ClassConditionalDenoiser
from agsearch.evaluation import make_noise
from agsearch.schedulers import make_scheduler

MODELS = ("digits",)


class CheckpointedDenoiser:
    """Gradient checkpointing around every denoiser call of a differentiable trajectory.

    The UNet's activations are dropped after the forward pass and recomputed during backward,
    so a T-step chain keeps only its inputs and outputs per step: activation memory stays flat
    in T at the price of one extra forward per call (Chen et al. 2016, arXiv 1604.06174).
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x, t, cond, run_cond, run_uncond):
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.inner(x, t, cond, run_cond, run_uncond)
        return torch.utils.checkpoint.checkpoint(self.inner, x, t, cond, run_cond, run_uncond, use_reentrant=False)


class DigitsBackend:
    """The built-in class-conditional digits UNet (``agsearch.models.digits``)."""

    def __init__(self, scheduler: str = "ddim", unet=None):
        from agsearch.models.digits import SCHEDULER_CONFIG, load_unet

        self.scheduler = make_scheduler(scheduler, SCHEDULER_CONFIG)  # checks the name
        self.unet = (unet if unet is not None else load_unet()).requires_grad_(False).eval()
        self.denoiser = ClassConditionalDenoiser(self.unet, NULL_CLASS)

    def to(self, device) -> "DigitsBackend":
        self.unet.to(device)
        return self

    def noise(self, seeds: torch.Tensor, device) -> torch.Tensor:
        return make_noise([int(s) for s in seeds], IMAGE_SHAPE, device)

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        return labels


def load_backend(model: str, scheduler: str):
    if model == "digits":
        return DigitsBackend(scheduler)
    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
