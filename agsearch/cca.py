"""Condition Contrastive Alignment (CCA) for the built-in AR digits model.

Chen, Su, Sun & Zhu, "Toward Guidance-Free AR Visual Generation via Condition Contrastive
Alignment", ICLR 2025 (arXiv 2410.09347). Fine-tune p_θ (initialised from, and contrasted with, the
frozen pretrained reference p_φ) so that guidance-free sampling (1 forward pass per token) matches
CFG sampling (2 per token). With r(x, c) = log p_θ(x|c) − log p_φ(x|c), log-likelihoods summed
over the 64 tokens:

    L = −log σ(β·r(x, c)) − λ·log σ(−β·r(x, c⁻))                 (per image x with its class c)

Negatives c⁻ are the batch's classes rolled by one (``torch.roll``); a pair whose rolled class
equals its own (a collision) counts as positive: its term is −log σ(+β·r(x, c⁻)) with weight 1
instead of λ. A ``null_ratio`` share of the images get c = c⁻ = ∅ (the null class) and count as
positives too, which keeps the unconditional model alive so CFG still works on top. Both terms
are batch means and the sum is divided by max(λ, 1). Paper values: β = 0.02, λ ∈ [50, 1000],
null ratio 0.1, lr 1e-5, one epoch (our tiny model: lr 3e-4, 80 steps of batch 64, λ = 1).

``agsearch cca`` (``agsearch/cli/cca.py``) runs ``CCAModule`` with ``DigitsTokens`` under a
LightningCLI; ``ARDigitsEvaluator`` scores samples with the core's classifier (accuracy and
Fréchet distance, the code of ``agsearch.eval.digits``).
"""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from agsearch.eval.digits import balanced_labels
from agsearch.models.digits.data import (
    NULL_CLASS,
    NUM_CLASSES,
    load_digits_tensors,
    train_test_split_indices,
)
from agsearch.models.digits_ar import (
    DigitsAR,
    generate,
    images_to_tokens,
    load_model,
    nfe_per_token,
    tokens_to_images,
)
from agsearch.seeds import EVAL_SEED, sample_seeds


# -- the loss ---------------------------------------------------------------------------------------
def make_conditions(labels: torch.Tensor, null_ratio: float, generator: torch.Generator | None = None):
    """Positive and negative classes for a batch: (c (B,), c⁻ (B,), negative-counts-as-positive (B,) bool).

    c⁻ = roll(c, 1); a share ``null_ratio`` of the pairs (drawn with ``generator``) get c = c⁻ = ∅.
    """
    c_neg = torch.roll(labels, shifts=1, dims=0)
    null = torch.rand(len(labels), generator=generator).to(labels.device) < null_ratio
    c = labels.masked_fill(null, NULL_CLASS)
    c_neg = c_neg.masked_fill(null, NULL_CLASS)
    return c, c_neg, null | (c_neg == c)


def cca_loss(pos_ratio: torch.Tensor, neg_ratio: torch.Tensor, neg_is_positive: torch.Tensor,
             beta: float, lam: float) -> torch.Tensor:
    """The CCA loss from the log-ratios r(x, c) (B,) and r(x, c⁻) (B,) (see the module docstring).

    ``neg_is_positive`` (B,) marks collisions and null pairs: their c⁻ term pulls r up with weight 1.
    """
    one = neg_ratio.new_ones(())
    sign = torch.where(neg_is_positive, one, -one)  # (B,)
    weight = torch.where(neg_is_positive, one, lam * one)  # (B,)
    pos = -F.logsigmoid(beta * pos_ratio).mean()
    neg = -(weight * F.logsigmoid(sign * beta * neg_ratio)).mean()
    return (pos + neg) / max(lam, 1.0)


def check_hparams(beta: float, lam: float, null_ratio: float) -> None:
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"Expected model.beta > 0, but got {beta}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"Expected model.lam (λ) >= 0, but got {lam}")
    if not (0 <= null_ratio < 1):
        raise ValueError(f"Expected model.null_ratio in [0, 1), but got {null_ratio}")


# -- the LightningModule ----------------------------------------------------------------------------
class CCAModule(pl.LightningModule):
    """CCA fine-tuning: a trainable copy of the reference AR model against the frozen reference.

    Args:
        reference: safetensors of the pretrained DigitsAR (None: the built-in one); it must
            match the model (ValueError otherwise).
        beta: β > 0, the scale of the log-ratios inside the sigmoid (paper 0.02).
        lam: λ ≥ 0, the weight of the negative term (paper 50–1000); the loss is divided by max(λ, 1).
        null_ratio: share in [0, 1) of pairs with c = c⁻ = ∅, counted as positives (paper 0.1).
        lr, weight_decay: AdamW on the trainable copy only.

    The reference is a frozen submodule (so it follows the module across devices) whose tensors
    are left out of checkpoints; only ``model.*`` is trained and saved.
    """

    def __init__(self, reference: str | None = None, beta: float = 0.02, lam: float = 1.0,
                 null_ratio: float = 0.1, lr: float = 3e-4, weight_decay: float = 0.0):
        super().__init__()
        check_hparams(beta, lam, null_ratio)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"Expected model.lr > 0, but got {lr}")
        self.save_hyperparameters()
        ref = load_model(reference)
        self.reference = ref.requires_grad_(False).eval()
        # The trainable copy runs without dropout, like the reference: r(x, c) is exactly 0 at step 0.
        self.model = DigitsAR(type(ref.config)(**{**ref.config.__dict__, "dropout": 0.0}))
        self.model.load_state_dict(ref.state_dict())
        self.strict_loading = False  # checkpoints hold model.* only

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()  # always: no dropout in the reference
        return self

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return type(state)((k, v) for k, v in state.items() if not k.startswith("reference."))

    def log_ratios(self, tokens: torch.Tensor, c: torch.Tensor, c_neg: torch.Tensor):
        """(r(x, c), r(x, c⁻)), each (B,); one batched pass per model over the 2B (image, class) pairs."""
        x2, c2 = torch.cat([tokens, tokens]), torch.cat([c, c_neg])  # (2B, 64), (2B,)
        with torch.no_grad():
            ref = self.reference.log_likelihood(x2, c2)
        return (self.model.log_likelihood(x2, c2) - ref).chunk(2)

    def model_step(self, batch, stage: str):
        tokens, labels = batch
        c, c_neg, neg_pos = make_conditions(labels, self.hparams.null_ratio)
        pos_ratio, neg_ratio = self.log_ratios(tokens, c, c_neg)
        loss = cca_loss(pos_ratio, neg_ratio, neg_pos, self.hparams.beta, self.hparams.lam)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite CCA loss {loss.item()} at step {self.global_step}")
        true_neg = ~neg_pos  # the pairs that are real negatives
        self.log_dict({
            f"{stage}/loss": loss,
            f"{stage}/pos_log_ratio": pos_ratio.mean(),
            f"{stage}/neg_log_ratio": neg_ratio[true_neg].mean() if true_neg.any() else neg_ratio.new_zeros(()),
            f"{stage}/pos_gt_neg": (pos_ratio > neg_ratio)[true_neg].float().mean() if true_neg.any() else neg_ratio.new_zeros(()),
        }, prog_bar=stage == "train", batch_size=len(tokens))
        return loss

    def training_step(self, batch, batch_idx):
        return self.model_step(batch, "train")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class DigitsTokens(pl.LightningDataModule):
    """The AR model's training split (stratified 80%, seed 0) as (tokens (B, 64), labels (B,)) batches.

    ``drop_last`` keeps every batch at ``batch_size``: a batch of one has no negative.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0):
        super().__init__()
        if batch_size < 2:
            raise ValueError(f"Expected data.batch_size >= 2 (negatives come from the batch), but got {batch_size}")
        self.save_hyperparameters()

    def train_dataloader(self):
        images, labels = load_digits_tensors()
        train, _ = train_test_split_indices(labels)
        dataset = torch.utils.data.TensorDataset(images_to_tokens(images[train]), labels[train])
        return torch.utils.data.DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(self.hparams.seed))


def finetune(reference: str | None = None, beta: float = 0.02, lam: float = 1.0, null_ratio: float = 0.1,
             lr: float = 3e-4, steps: int = 80, batch_size: int = 64, seed: int = 0, logger=False,
             progress: bool = False) -> tuple[DigitsAR, float]:
    """One CCA fine-tune with a plain Trainer (the λ sweep's): (the tuned model in eval mode, seconds)."""
    pl.seed_everything(seed, verbose=False)
    module = CCAModule(reference, beta, lam, null_ratio, lr)
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="auto", devices=1, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                         log_every_n_steps=5, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=DigitsTokens(batch_size, seed))
    return module.model.eval(), time.perf_counter() - start


# -- evaluation -------------------------------------------------------------------------------------
class ARDigitsEvaluator:
    """Samples AR models from fixed per-sample seeds and balanced classes; scores them with the
    core's classifier: class accuracy and the Fréchet distance of its penultimate features against
    all 1,797 real digits (as ``agsearch.eval.digits.DigitsEvaluator`` does for the diffusion model).

    Sample i uses seed ``seed``·10⁶ + i (the default seed 1 is disjoint from the training seeds).
    """

    def __init__(self, samples: int = 1000, seed: int = EVAL_SEED, batch_size: int = 1000, device: str = "cpu",
                 temperature: float = 1.0, top_k: int | None = None):
        from agsearch.eval.digits import DigitsScorer

        if samples < 2:
            raise ValueError(f"Expected eval.samples >= 2 (a Fréchet distance needs a covariance), but got {samples}")
        if batch_size < 1:
            raise ValueError(f"Expected eval.batch_size >= 1, but got {batch_size}")
        self.device = torch.device(device)
        self.scorer = DigitsScorer(self.device)
        self.seeds = sample_seeds(seed, samples)
        self.labels = balanced_labels(samples, self.device)
        self.batch_size, self.temperature, self.top_k = batch_size, temperature, top_k

    def sample(self, model: DigitsAR, guidance_scale: float = 1.0) -> torch.Tensor:
        model = model.to(self.device).eval()
        chunks = []
        for lo in range(0, len(self.seeds), self.batch_size):
            chunks.append(generate(model, self.labels[lo: lo + self.batch_size], self.seeds[lo: lo + self.batch_size],
                                   guidance_scale, self.temperature, self.top_k))
        return torch.cat(chunks)  # (N, 64)

    @torch.no_grad()
    def evaluate(self, model: DigitsAR, name: str, guidance_scale: float = 1.0) -> dict:
        start = time.perf_counter()
        tokens = self.sample(model, guidance_scale)
        seconds = time.perf_counter() - start
        accuracy, fd = self.scorer.score(tokens_to_images(tokens), self.labels)
        return {"name": name, "guidance_scale": guidance_scale, "nfe_per_token": nfe_per_token(guidance_scale),
                "accuracy": accuracy, "fd": fd,
                "seconds": round(seconds, 2), "samples": len(tokens)}


def format_rows(rows: list[dict]) -> str:
    """A markdown table of evaluation rows."""
    lines = ["| model | guidance s | NFE/token | accuracy % | FD |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['guidance_scale']:g} | {r['nfe_per_token']} | {100 * r['accuracy']:.1f} | "
              f"{r['fd']:.3f} |" for r in rows]
    return "\n".join(lines)


def best_cfg(evaluator: ARDigitsEvaluator, model: DigitsAR, scales, name: str = "base") -> tuple[dict, list[dict]]:
    """(the best CFG row by accuracy, lower FD breaking ties; every row of the scale sweep)."""
    rows = [evaluator.evaluate(model, f"{name} + CFG", s) for s in scales]
    return max(rows, key=lambda r: (r["accuracy"], -r["fd"])), rows


__all__ = ["cca_loss", "make_conditions", "CCAModule", "DigitsTokens", "ARDigitsEvaluator", "NUM_CLASSES"]
