"""The built-in data: scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes).

Pixels are integers 0–16; the diffusion model sees them scaled to [-1, 1]. The data ships
with scikit-learn, so nothing is ever downloaded.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
NULL_CLASS = 10  # the extra class label that means "no condition" (the unconditional pass)
IMAGE_SHAPE = (1, 8, 8)
MAX_PIXEL = 16


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    """Grey levels 0–16 → [-1, 1]."""
    return pixels.float() / (MAX_PIXEL / 2) - 1.0


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (images in [-1, 1] of shape (N, 1, 8, 8), labels (N,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).reshape(-1, *IMAGE_SHAPE)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return to_model_space(images), labels


def train_test_split_indices(labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0):
    """A stratified split, the same on every machine: (train indices, test indices)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
