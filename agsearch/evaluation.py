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

import math
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from tqdm.auto import tqdm

from agsearch.data import IMAGE_SHAPE, NULL_CLASS, NUM_CLASSES, load_digits_tensors
from agsearch.denoisers import ClassConditionalDenoiser
from agsearch.policy import Policy
from agsearch.sampling import SampleOutput, sample
from agsearch.schedulers import make_scheduler

SEED_STRIDE = 10**6
EVAL_SEED = 1
PSNR_PEAK = 2.0  # samples live in [-1, 1]


def sample_seeds(seed: int, n: int) -> list[int]:
    return [seed * SEED_STRIDE + i for i in range(n)]


def make_noise(seeds: list[int], shape=IMAGE_SHAPE, device="cpu") -> torch.Tensor:
    """Per-sample seeded Gaussian noise, (len(seeds), *shape): sample i does not depend on the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


def balanced_labels(n: int, device="cpu") -> torch.Tensor:
    """Class labels 0, 1, …, 9, 0, 1, … (balanced when n is a multiple of 10)."""
    return (torch.arange(n) % NUM_CLASSES).to(device)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) (Heusel et al. 2017), in float64."""
    from scipy import linalg

    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def mse_psnr(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float | None]:
    """Mean per-image MSE of images in [-1, 1] and the PSNR of that mean (None when identical)."""
    mse = (images - reference).pow(2).flatten(1).mean(1).mean().item()
    return mse, (10 * math.log10(PSNR_PEAK**2 / mse) if mse > 0 else None)


def feature_stats(features: torch.Tensor):
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


@dataclass
class EvalRecord:
    name: str
    nfe: float
    accuracy: float
    mse: float
    psnr: float | None  # None when identical to full CFG (infinite PSNR)
    fd: float
    seconds: float
    samples: int
    policy_nfe: int | None  # the static policy's exact NFE; None for adaptive

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class DigitsEvaluator:
    """Samples and scores policies on the built-in digits model with fixed noise and labels."""

    def __init__(self, samples: int = 1000, seed: int = EVAL_SEED, scheduler: str = "ddim",
                 batch_size: int = 1000, device: str = "cpu", progress: bool = True, unet=None):
        from agsearch.models.digits import SCHEDULER_CONFIG, load_classifier, load_unet

        if samples < 2:
            raise ValueError(f"--samples must be at least 2 (a Fréchet distance needs a covariance), got {samples}")
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.denoiser = ClassConditionalDenoiser((unet or load_unet()).to(self.device), NULL_CLASS)
        self.classifier = load_classifier().to(self.device)
        self.scheduler = make_scheduler(scheduler, SCHEDULER_CONFIG)
        self.scheduler_name = scheduler
        self.noise = make_noise(sample_seeds(seed, samples), device=self.device)
        self.labels = balanced_labels(samples, self.device)
        self.batch_size = batch_size
        self.progress = progress
        self._references: dict[tuple[int, float], SampleOutput] = {}

    @cached_property
    def real_stats(self):
        images, _ = load_digits_tensors()
        with torch.no_grad():
            return feature_stats(self.classifier.features(images.to(self.device)))

    @torch.no_grad()
    def run(self, policy: Policy, desc: str | None = None) -> tuple[SampleOutput, float]:
        """Sample every evaluation noise under ``policy``: (outputs concatenated, wall seconds)."""
        chunks = []
        start = time.perf_counter()
        n = len(self.noise)
        with tqdm(total=n, desc=desc or policy.label(), unit="sample", disable=not self.progress, leave=False) as bar:
            for lo in range(0, n, self.batch_size):
                sl = slice(lo, lo + self.batch_size)
                chunks.append(sample(self.denoiser, self.scheduler, policy, self.noise[sl], self.labels[sl]))
                bar.update(len(chunks[-1].samples))
        seconds = time.perf_counter() - start
        out = SampleOutput(
            torch.cat([c.samples for c in chunks]),
            torch.cat([c.nfe for c in chunks]),
            torch.cat([c.cosine_x0 for c in chunks], dim=1),
            torch.cat([c.cosine_eps for c in chunks], dim=1),
        )
        return out, seconds

    def reference(self, num_inference_steps: int, guidance_scale: float) -> SampleOutput:
        """Full CFG from the evaluation noise (cached per step count and scale), with its cosines."""
        key = (num_inference_steps, float(guidance_scale))
        if key not in self._references:
            full = Policy.static(["cfg"] * num_inference_steps, guidance_scale)
            self._references[key] = self.run(full, desc=f"full CFG w={guidance_scale:g}")[0]
        return self._references[key]

    @torch.no_grad()
    def score(self, samples: torch.Tensor) -> tuple[float, float]:
        """(class accuracy, Fréchet distance to the real digits) of samples in [-1, 1]."""
        feats = self.classifier.features(samples)
        accuracy = (self.classifier.head(feats).argmax(1) == self.labels[: len(samples)]).float().mean().item()
        return accuracy, frechet_distance(*feature_stats(feats), *self.real_stats)

    def evaluate(self, policy: Policy) -> EvalRecord:
        out, seconds = self.run(policy)
        if policy.kind == "static" and all(s == {"op": "cfg"} for s in policy.steps):
            # Full CFG is its own reference: keep it rather than sampling it again.
            self._references.setdefault((policy.num_inference_steps, float(policy.guidance_scale)), out)
        ref = self.reference(policy.num_inference_steps, policy.guidance_scale).samples
        mse, psnr = mse_psnr(out.samples, ref)
        accuracy, fd = self.score(out.samples)
        return EvalRecord(
            name=policy.label(),
            nfe=round(out.nfe.mean().item(), 4),
            accuracy=accuracy,
            mse=mse,
            psnr=psnr,
            fd=fd,
            seconds=round(seconds, 3),
            samples=len(out.samples),
            policy_nfe=policy.nfe,
        )


def format_table(records: list[EvalRecord | dict], markdown: bool = True) -> str:
    """A table of evaluation records, one row per policy.

    Columns a record set does not have (accuracy for a text model, adherence for digits, PSNR and
    FD for a text-to-image search's comparison) are left out.
    """
    from agsearch.models.scenes import CATEGORIES

    rows = [r.as_dict() if isinstance(r, EvalRecord) else r for r in records]
    pct = lambda r, k: f"{100 * r[k]:.1f}" if r.get(k) is not None else "-"  # noqa: E731
    cats = [c for c in CATEGORIES if any(f"adherence_{c}" in r for r in rows)]
    header = (["policy", "NFE", "accuracy %", "adherence %"] + [f"{c} %" for c in cats]
              + ["MSE vs CFG", "PSNR dB", "FD", "seconds"])
    body = [[
        r["name"], f"{r['nfe']:.2f}", pct(r, "accuracy"), pct(r, "adherence"),
        *[pct(r, f"adherence_{c}") for c in cats], "-" if r.get("mse") is None else f"{r['mse']:.5f}",
        "-" if "psnr" not in r or r.get("mse") is None else "inf" if r["psnr"] is None else f"{r['psnr']:.1f}",
        f"{r['fd']:.3f}" if "fd" in r else "-", f"{r['seconds']:.2f}",
    ] for r in rows]
    keep = [j for j in range(len(header)) if any(row[j] != "-" for row in body)]
    header, body = [header[j] for j in keep], [[row[j] for j in keep] for row in body]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = lambda row: "  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])
