"""(noise seed, condition) pairs for the search: the LightningDataModule that feeds it.

Pair i of a set with seed S has noise seed S·10⁶ + i (as in ``agsearch.eval.digits``) and
condition i mod N, N the backend's ``num_conditions``: the class label for the built-in digits
model (N = 10), the prompt's line for a text-to-image pipeline (N prompts). The training set is fixed — like the Adaptive Guidance paper's 10k noise–prompt
pairs — so the teacher's full-CFG samples are computed once per pair and cached. The order is
sequential; under DDP rank r takes the pairs r, r + W, …, so W processes with per-process batch
b see exactly the pairs one process sees with batch W·b.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from agsearch.models.digits.data import NUM_CLASSES
from agsearch.seeds import CALIBRATION_SEED, SEARCH_SEED, SEED_STRIDE, VALIDATION_SEED


class PairDataset(Dataset):
    def __init__(self, seed: int, size: int, num_conditions: int = NUM_CLASSES):
        self.seed, self.size, self.num_conditions = seed, size, num_conditions

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return {"seed": torch.tensor(self.seed * SEED_STRIDE + i), "label": torch.tensor(i % self.num_conditions)}

    def batch(self, device="cpu") -> dict:
        """All pairs as one batch: {"seed": (N,), "label": (N,)}."""
        i = torch.arange(self.size)
        return {"seed": (self.seed * SEED_STRIDE + i).to(device), "label": (i % self.num_conditions).to(device)}


class GuidancePairs(pl.LightningDataModule):
    """Seeds and conditions (class labels or prompt indices) for the search and its validation.

    Args:
        num_pairs: training pairs (one epoch); the teacher is sampled once per pair.
        num_val: validation pairs, scored every epoch with the relaxed and the discretised gates.
        batch_size: pairs per step and process (the global batch is batch_size × processes).
        seed: S of the training pairs (noise seeds S·10⁶ + i); evaluations use other seeds.
        val_seed: S of the validation pairs.
        num_calibration: adaptive spaces: held-out pairs on which the export calibrates the
            thresholds to the budget (only the teacher runs on them).
        calibration_seed: S of the calibration pairs.
    """

    def __init__(self, num_pairs: int = 128, num_val: int = 32, batch_size: int = 32,
                 seed: int = SEARCH_SEED, val_seed: int = VALIDATION_SEED, num_calibration: int = 512,
                 calibration_seed: int = CALIBRATION_SEED):
        super().__init__()
        for name, value in (("num_pairs", num_pairs), ("batch_size", batch_size), ("num_calibration", num_calibration)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected data.{name} to be a positive integer, but got {value}")
        if not isinstance(num_val, int) or num_val < 0:
            raise ValueError(f"Expected data.num_val to be an integer >= 0, but got {num_val}")
        for name, value in (("seed", seed), ("val_seed", val_seed), ("calibration_seed", calibration_seed)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected data.{name} to be an integer >= 0, but got {value}")
        self.save_hyperparameters()

    def _loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        # In order, also under DDP (Lightning's own distributed sampler would shuffle): rank r
        # takes pairs r, r + W, ..., so the global batch is the one a single process sees.
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = DistributedSampler(dataset, num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)

    def _num_conditions(self) -> int:
        """N of the model being searched (its backend's ``num_conditions``); 10 without one."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return int(getattr(getattr(module, "backend", None), "num_conditions", NUM_CLASSES))

    def train_dataloader(self) -> DataLoader:
        return self._loader(PairDataset(self.hparams.seed, self.hparams.num_pairs, self._num_conditions()),
                            self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(PairDataset(self.hparams.val_seed, self.hparams.num_val, self._num_conditions()),
                            max(1, self.hparams.num_val))
