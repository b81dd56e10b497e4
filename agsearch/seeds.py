"""Seeds: sample i of a run with seed S draws its noise from seed S·10⁶ + i.

The seed S names the use, so the sets never overlap: the search trains on S = 0 (``SEARCH_SEED``), evaluations use
S = 1 (``EVAL_SEED``), calibrations S = 2 (``CALIBRATION_SEED``), the search's validation S = 3
(``VALIDATION_SEED``). Noise is drawn per sample, so sample i does not depend on the batch.
"""

from __future__ import annotations

import torch

SEED_STRIDE = 10**6
SEARCH_SEED = 0
EVAL_SEED = 1
CALIBRATION_SEED = 2
VALIDATION_SEED = 3


def sample_seeds(seed: int, n: int, start: int = 0) -> list[int]:
    """The noise seeds of samples start, …, start + n − 1 of a run with seed ``seed``."""
    return [seed * SEED_STRIDE + i for i in range(start, start + n)]


def make_noise(seeds: list[int], shape, device="cpu") -> torch.Tensor:
    """Per-sample seeded Gaussian noise, (len(seeds), *shape): sample i does not depend on the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


