"""Evaluation records and what every evaluator computes: MSE/PSNR, Fréchet distance, the table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

PSNR_PEAK = 2.0  # samples live in [-1, 1]


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


class FeatureMoments:
    """Running mean and covariance of features added batch by batch (float64, shifted by the first
    batch's mean for accuracy): :meth:`stats` equals :func:`feature_stats` of all of them at once."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def add(self, features: torch.Tensor) -> None:
        f = features.double().cpu().numpy()
        if self.shift is None:
            self.shift = f.mean(0)
            self.s1, self.s2 = np.zeros_like(self.shift), np.zeros((len(self.shift), len(self.shift)))
        d = f - self.shift
        self.n += len(f)
        self.s1 += d.sum(0)
        self.s2 += d.T @ d

    def stats(self):
        """(mean, covariance with n − 1, as ``np.cov``)."""
        mean = self.s1 / self.n
        return self.shift + mean, (self.s2 - self.n * np.outer(mean, mean)) / (self.n - 1)


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


def format_table(records: list[EvalRecord | dict], markdown: bool = True) -> str:
    """A table of evaluation records, one row per policy.

    Columns a record set does not have (accuracy for a text model, adherence for digits, edit
    success for anything but an editor, PSNR and FD for a text-to-image search's comparison) are
    left out.
    """
    from agsearch.models.shapes.edits import KINDS
    from agsearch.models.shapes.scenes import CATEGORIES

    rows = [r.as_dict() if isinstance(r, EvalRecord) else r for r in records]
    pct = lambda r, k: f"{100 * r[k]:.1f}" if r.get(k) is not None else "-"  # noqa: E731
    cats = [c for c in CATEGORIES if any(f"adherence_{c}" in r for r in rows)]
    kinds = [k for k in KINDS if any(f"edit_success_{k}" in r for r in rows)]
    editing = ["edit_success", "preservation", "edited"]
    header = (["policy", "NFE", "accuracy %", "adherence %"] + [f"{c} %" for c in cats]
              + ["edit success %", "preserved %", "both %"] + [f"{k} %" for k in kinds]
              + ["MSE vs full" if kinds else "MSE vs CFG", "PSNR dB", "FD", "CLIP score", "CLIP FD", "seconds"])
    body = [[
        r["name"], f"{r['nfe']:.2f}", pct(r, "accuracy"), pct(r, "adherence"),
        *[pct(r, f"adherence_{c}") for c in cats], *[pct(r, k) for k in editing],
        *[pct(r, f"edit_success_{k}") for k in kinds], "-" if r.get("mse") is None else f"{r['mse']:.5f}",
        "-" if "psnr" not in r or r.get("mse") is None else "inf" if r["psnr"] is None else f"{r['psnr']:.1f}",
        f"{r['fd']:.3f}" if "fd" in r else "-", f"{r['clip_score']:.2f}" if "clip_score" in r else "-",
        f"{r['clip_fd']:.3f}" if "clip_fd" in r else "-", f"{r['seconds']:.2f}",
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
