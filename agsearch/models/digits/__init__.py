"""The built-in models on scikit-learn's 8×8 digits, shipped as safetensors next to this file.

- ``digits_unet``: a class-conditional diffusers ``UNet2DModel`` (ε-prediction, 10 classes plus
  the null class ``NULL_CLASS`` for CFG), trained by ``experiments/train_digits.py``;
- ``digits_classifier``: a small CNN whose logits give class accuracy and whose penultimate
  features give a Fréchet distance, trained by ``experiments/train_classifier.py``.

See ``MODEL_CARD.md`` beside the weights for how they were made and what they score.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from agsearch.models.digits.data import NULL_CLASS, NUM_CLASSES

WEIGHTS_DIR = Path(str(resources.files("agsearch.models.digits") / "weights"))

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=16,
    num_class_embeds=NUM_CLASSES + 1,  # + the null class
)

# The training noise schedule; inference schedulers (DDIM, Euler, DPM-Solver++) are built from it.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,  # data live in [-1, 1]
    clip_sample_range=1.0,
    timestep_spacing="trailing",  # few-step samplers start from pure noise
)


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


class DigitsClassifier(nn.Module):
    """A small CNN on 8×8 digits in [-1, 1]; ``features`` is the 128-d penultimate layer."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),  # (B, 64, 4, 4)
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(64 * 4 * 4, self.feature_dim), nn.GELU(),
        )
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _load_state(module: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"built-in weights not found at {path}; train them with the scripts in experiments/"
        )
    module.load_state_dict(load_file(str(path)))
    return module.requires_grad_(False).eval()


def load_unet(path: str | Path | None = None):
    """The built-in class-conditional digits UNet, frozen, in eval mode."""
    return _load_state(build_unet(), Path(path) if path else WEIGHTS_DIR / "digits_unet.safetensors")


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The built-in digits classifier, frozen, in eval mode."""
    return _load_state(
        DigitsClassifier(), Path(path) if path else WEIGHTS_DIR / "digits_classifier.safetensors"
    )


def benchmark_settings() -> dict:
    """The benchmark protocol's settings for the built-in model (scheduler, steps, scale).

    Written by ``experiments/train_digits.py`` after its guidance-scale sweep.
    """
    path = WEIGHTS_DIR / "benchmark.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"scheduler": "ddim", "num_inference_steps": 25, "guidance_scale": 1.5}


__all__ = [
    "NULL_CLASS",
    "UNET_CONFIG",
    "SCHEDULER_CONFIG",
    "DigitsClassifier",
    "build_unet",
    "load_unet",
    "load_classifier",
    "benchmark_settings",
]
