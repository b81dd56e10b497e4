"""Side-by-side evaluation of guidance policies on the built-in digits model.

Every policy sees the same noise (one seeded generator per sample) and the same balanced class
labels; each is compared with full CFG from that noise. Metrics per policy:

    nfe       mean denoiser evaluations per sample (exact count from the sampler)
    accuracy  the built-in classifier's accuracy on the samples, against their class labels
    mse/psnr  against full CFG at the policy's scale, same noise; PSNR peak-to-peak is 2 ([-1, 1])
    fd        Fréchet distance of classifier features, samples vs all 1,797 real digits
    seconds   wall time of sampling (the policy alone)

Seeds: sample i of an evaluation with ``seed=S`` draws its noise from seed S·10⁶ + i. The search
draws from S = 0 (seeds below 10⁶); evaluations default to S = 1, so they are held out.
"""

from __future__ import annotations

from functools import cached_property

import torch

from agsearch.denoisers.class_conditional import ClassConditionalDenoiser
from agsearch.diffusers.schedulers import make_scheduler
from agsearch.eval.base import Evaluator, Quality, Tally, check_size
from agsearch.eval.records import EvalRecord, FeatureMoments, feature_stats, frechet_distance
from agsearch.models.digits.data import (
    IMAGE_SHAPE,
    NULL_CLASS,
    NUM_CLASSES,
    load_digits_tensors,
)
from agsearch.policy import Policy
from agsearch.seeds import EVAL_SEED


def balanced_labels(n: int, device="cpu") -> torch.Tensor:
    """Class labels 0, 1, …, 9, 0, 1, … (balanced when n is a multiple of 10)."""
    return (torch.arange(n) % NUM_CLASSES).to(device)


class DigitsScorer:
    """The digits model's quality scores, for any sampler of digit images (the diffusion model's
    evaluator, CCA's AR evaluator): the built-in classifier's accuracy against the intended labels
    and the Fréchet distance of its penultimate features against all 1,797 real digits."""

    def __init__(self, device="cpu"):
        from agsearch.models.digits import load_classifier

        self.device = torch.device(device)
        self.classifier = load_classifier().to(self.device)

    @cached_property
    def real_stats(self):
        images, _ = load_digits_tensors()
        with torch.no_grad():
            return feature_stats(self.classifier.features(images.to(self.device)))

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(class accuracy, Fréchet distance to the real digits) of images in [-1, 1]."""
        feats = self.classifier.features(images)
        accuracy = (self.classifier.head(feats).argmax(1) == labels).float().mean().item()
        return accuracy, frechet_distance(*feature_stats(feats), *self.real_stats)


class DigitsEvaluator(Evaluator):
    """Samples and scores policies on the built-in digits model with fixed noise and labels."""

    def __init__(self, samples: int = 1000, seed: int = EVAL_SEED, scheduler: str = "ddim",
                 batch_size: int = 1000, device: str = "cpu", progress: bool = True, unet=None):
        from agsearch.models.digits import SCHEDULER_CONFIG, load_unet

        check_size(samples, batch_size)
        self.device = torch.device(device)
        self.denoiser = ClassConditionalDenoiser((unet or load_unet()).to(self.device), NULL_CLASS)
        self.scorer = DigitsScorer(self.device)
        self.classifier = self.scorer.classifier
        self.scheduler = make_scheduler(scheduler, SCHEDULER_CONFIG)
        self.scheduler_name = scheduler
        self.samples, self.seed, self.noise_shape = samples, seed, IMAGE_SHAPE
        self.batch_size = batch_size
        self.progress = progress

    def condition(self, rows):
        return rows % NUM_CLASSES  # balanced_labels

    def quality(self) -> Quality:
        return _DigitsQuality(self)

    def make_record(self, tally: Tally) -> dict:
        return EvalRecord(
            name=tally.policy.label(),
            nfe=round(tally.nfe, 4),
            mse=tally.mse,
            psnr=tally.psnr,
            seconds=round(tally.seconds, 3),
            samples=tally.samples,
            policy_nfe=tally.policy.nfe,
            **tally.quality.result(),
        ).as_dict()

    def evaluate(self, policy: Policy) -> EvalRecord:
        return EvalRecord(**self.record(policy))


class _DigitsQuality(Quality):
    """Class accuracy and the moments of the classifier's features, batch by batch."""

    def __init__(self, evaluator: DigitsEvaluator):
        self.evaluator, self.correct, self.n, self.moments = evaluator, 0, 0, FeatureMoments()

    def add(self, images, rows, reference):
        classifier = self.evaluator.classifier
        feats = classifier.features(images)
        self.correct += int((classifier.head(feats).argmax(1) == self.evaluator.condition(rows)).sum())
        self.n += len(rows)
        self.moments.add(feats)

    def result(self) -> dict:
        return {"accuracy": self.correct / self.n,
                "fd": frechet_distance(*self.moments.stats(), *self.evaluator.scorer.real_stats)}
