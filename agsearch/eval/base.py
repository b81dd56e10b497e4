"""The evaluator interface: sample a set of policies on the same noise and conditions, return records.

Every model's evaluator holds fixed evaluation noise (seed S: sample i from seed S·10⁶ + i,
:mod:`agsearch.seeds`) and conditions, runs each policy through the one sampler in batches, and
compares it with full CFG from the same noise. A record is a dict with at least ``name``, ``nfe``
(mean denoiser evaluations per sample), ``mse`` and ``psnr`` against full CFG, ``seconds`` and
``samples``, plus the model's own quality scores:

    :class:`agsearch.eval.digits.DigitsEvaluator`   class accuracy, FD (the digits classifier)
    :class:`agsearch.eval.shapes.ShapesEvaluator`   prompt adherence (overall, per category), FD
    :class:`PipelineEvaluator`                      latent MSE only (any search backend, e.g. a
                                                    pipeline folder and its prompts)

:func:`agsearch.eval.evaluator_for` builds one by model name; ``eval``, ``bench``, ``sweep`` and the search's
end-of-run comparison take what it returns.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from agsearch.guidance.sampler import SampleOutput, sample
from agsearch.policy import Policy


def check_size(samples: int, batch_size: int, minimum: int = 2) -> None:
    if samples < minimum:
        raise ValueError(f"--samples must be at least {minimum} (a Fréchet distance needs a covariance), got {samples}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")


class Evaluator:
    """Shared sampling for every model: a subclass sets ``denoiser``, ``scheduler``, ``noise`` (N, ...),
    ``batch_size`` and ``progress``, implements :meth:`condition` and :meth:`record`, and overrides
    :meth:`images` where samples are latents to decode."""

    denoiser = scheduler = noise = None
    batch_size: int = 1000
    progress: bool = True

    def condition(self, rows: torch.Tensor):
        """The conditions of evaluation samples ``rows`` (an index tensor)."""
        raise NotImplementedError

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        """What the quality scores and the MSE look at: the samples themselves for a pixel model."""
        return samples

    def record(self, policy: Policy) -> dict:
        """One policy's record (see the module doc)."""
        raise NotImplementedError

    def records(self, policies: list[Policy]) -> list[dict]:
        return [self.record(p) for p in policies]

    @torch.no_grad()
    def run(self, policy: Policy, desc: str | None = None) -> tuple[SampleOutput, torch.Tensor, float]:
        """Sample every evaluation noise under ``policy``: (sampler outputs, images, wall seconds)."""
        chunks, images = [], []
        start = time.perf_counter()
        n = len(self.noise)
        with tqdm(total=n, desc=desc or policy.label(), unit="sample", disable=not self.progress, leave=False) as bar:
            for lo in range(0, n, self.batch_size):
                rows = torch.arange(lo, min(lo + self.batch_size, n), device=self.noise.device)
                out = sample(self.denoiser, self.scheduler, policy, self.noise[rows], self.condition(rows))
                bad = int((~torch.isfinite(out.samples.flatten(1))).any(1).sum())
                if bad:  # e.g. affine coefficients whose chain of estimates diverges
                    raise ValueError(f"{policy.label()}: {bad} of the first {int(rows[-1]) + 1} samples are not finite "
                                     f"under this policy (NaN or infinity): nothing to score")
                chunks.append(out)
                images.append(self.images(out.samples))
                bar.update(len(rows))
        seconds = time.perf_counter() - start
        out = SampleOutput(
            torch.cat([c.samples for c in chunks]), torch.cat([c.nfe for c in chunks]),
            torch.cat([c.cosine_x0 for c in chunks], dim=1), torch.cat([c.cosine_eps for c in chunks], dim=1))
        return out, torch.cat(images), seconds

    def full_cfg(self, num_inference_steps: int, guidance_scale: float) -> tuple[SampleOutput, torch.Tensor]:
        """Full CFG from the evaluation noise, (sampler outputs, images), cached per step count and scale."""
        key = (num_inference_steps, float(guidance_scale))
        cache = self.__dict__.setdefault("_full_cfg", {})
        if key not in cache:
            full = Policy.static(["cfg"] * num_inference_steps, guidance_scale)
            out, images, _ = self.run(full, desc=f"full CFG w={guidance_scale:g}")
            cache[key] = (out, images)
        return cache[key]

    def run_policy(self, policy: Policy) -> tuple[SampleOutput, torch.Tensor, float]:
        """:meth:`run`, keeping a full-CFG policy's run as the reference of its steps and scale."""
        out, images, seconds = self.run(policy)
        if policy.kind == "static" and all(s == {"op": "cfg"} for s in policy.steps):
            key = (policy.num_inference_steps, float(policy.guidance_scale))
            self.__dict__.setdefault("_full_cfg", {}).setdefault(key, (out, images))
        return out, images, seconds

    def sample_and_compare(self, policy: Policy) -> tuple[SampleOutput, torch.Tensor, float, torch.Tensor]:
        """(outputs, images, seconds, full CFG's images at the policy's steps and scale)."""
        out, images, seconds = self.run_policy(policy)
        return out, images, seconds, self.full_cfg(policy.num_inference_steps, policy.guidance_scale)[1]


class PipelineEvaluator(Evaluator):
    """Latent MSE to full CFG on a search backend's held-out pairs (``seed`` S: noise seed S·10⁶ + i,
    condition i mod N), e.g. a text-to-image pipeline folder and its prompt file."""

    def __init__(self, backend, samples: int, seed: int, batch_size: int = 1000, device="cpu", progress: bool = False,
                 clip=None):
        from agsearch.search.data import PairDataset

        check_size(samples, batch_size, minimum=1)
        self.backend, self.device = backend, torch.device(device)
        backend.to(self.device)
        pairs = PairDataset(seed, samples, backend.num_conditions).batch(self.device)
        self.noise, self.labels = backend.noise(pairs["seed"], self.device), pairs["label"]
        self.denoiser, self.scheduler = backend.denoiser, backend.scheduler
        self.batch_size, self.progress = batch_size, progress
        self.clip = clip  # a ClipScorer: CLIP score against the prompts, CLIP-space FD to full CFG

    def condition(self, rows):
        return self.backend.condition(self.labels[rows])

    def record(self, policy: Policy) -> dict:
        out, images, seconds, reference = self.sample_and_compare(policy)
        mse = float((images - reference).float().pow(2).flatten(1).mean(1).mean())
        record = {"name": policy.label(), "nfe": float(out.nfe.mean()), "mse": mse, "seconds": seconds,
                  "samples": len(images)}
        if self.clip is not None:
            with torch.no_grad():
                pictures = self._decoded(images)
                record["clip_score"] = float(self.clip.score(pictures, self.backend.prompt_texts(self.labels)).mean())
                if len(images) >= 2:
                    key = (policy.num_inference_steps, float(policy.guidance_scale))
                    decoded = self.__dict__.setdefault("_decoded_full_cfg", {})
                    if key not in decoded:  # full CFG's images, decoded once for every policy compared with it
                        decoded[key] = self._decoded(reference)
                    record["clip_fd"] = self.clip.frechet_distance(decoded[key], pictures)
        return record

    def _decoded(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.backend.decode(latents[i:i + self.batch_size])
                          for i in range(0, len(latents), self.batch_size)])
