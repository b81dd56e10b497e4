"""Side-by-side evaluation of guidance policies on the built-in shapes text-to-image model.

The protocol of :mod:`agsearch.eval.digits` on a text-to-image model whose prompts can be checked
exactly. Sample i of an evaluation with ``seed=S`` draws its noise (the pipeline's 8×8×8 latents) from seed
S·10⁶ + i and its caption from :func:`agsearch.models.shapes.scenes.eval_captions` (categories in turn,
each caption drawn by the same seed from the split's captions: "heldout" — combinations no
training caption holds — by default, or "train"); a caption file gives the captions instead, in
its order, cycled. Every policy sees the same noise and captions; the unconditional pass uses
the empty prompt, the one the model was trained to drop captions to. Metrics per policy:

    nfe          mean denoiser evaluations per sample (exact count from the sampler)
    adherence    the share of samples whose caption the scorer finds fully satisfied, overall
                 and per category (``adherence_single``, ``adherence_two_objects``, …)
    fd           Fréchet distance of scorer features, samples vs renders of the same captions
    mse/psnr     against full CFG at the policy's scale from the same noise, images in [-1, 1]
                 (PSNR peak-to-peak 2, as on digits)
    seconds      wall time of sampling and decoding (the policy alone)
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from agsearch.denoisers.text import TextCondition, UNetTextDenoiser
from agsearch.diffusers.schedulers import make_scheduler
from agsearch.eval.base import Evaluator, check_size
from agsearch.eval.records import feature_stats, frechet_distance, mse_psnr
from agsearch.io import read_text_file
from agsearch.models.shapes import scenes
from agsearch.policy import Policy
from agsearch.seeds import EVAL_SEED, make_noise, sample_seeds

SPLITS = ("heldout", "train")


def read_captions(path: str | Path) -> list[scenes.Caption]:
    """A caption file: one caption of the shapes grammar per line (blank lines skipped).

    A caption the grammar cannot parse raises :class:`scenes.CaptionError` naming the file, the
    line, the caption and the word.
    """
    text = read_text_file(path, "caption file")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(scenes.parse_caption(line))
            except scenes.CaptionError as e:
                raise scenes.CaptionError(f"{path}:{n}: {e}") from None
    if not out:
        raise ValueError(f"{path}: the caption file is empty")
    return out


def resolve_captions(spec, n: int, seed: int) -> tuple[list[scenes.Caption], str]:
    """(the n captions of an evaluation, the name of their set): a split name, a caption file or a
    list of :class:`scenes.Caption` (the last two cycled)."""
    if isinstance(spec, (list, tuple)):
        return [spec[i % len(spec)] for i in range(n)], "given"
    if str(spec) in SPLITS:
        return scenes.eval_captions(n, seed, str(spec)), str(spec)
    captions = read_captions(spec)
    return [captions[i % len(captions)] for i in range(n)], str(spec)


class ShapesEvaluator(Evaluator):
    """Samples and scores policies on the built-in shapes pipeline with fixed noise and captions."""

    def __init__(self, samples: int = 1000, seed: int = EVAL_SEED, captions: str | Path = "heldout",
                 scheduler: str = "ddim", batch_size: int = 500, device: str = "cpu", progress: bool = True,
                 pipe=None, scorer=None):
        from agsearch.models.shapes import load_pipeline, load_scorer

        check_size(samples, batch_size)
        self.captions, self.caption_set = resolve_captions(captions, samples, seed)  # bad captions fail here
        self.device = torch.device(device)
        self.pipe = pipe if pipe is not None else load_pipeline(device=self.device)
        self.scorer = (scorer if scorer is not None else load_scorer()).to(self.device)
        self.denoiser = UNetTextDenoiser(self.pipe.unet, self.pipe.scheduler.config.get("prediction_type", "epsilon"))
        self.scheduler = make_scheduler(scheduler, dict(self.pipe.scheduler.config))
        self.scheduler_name = scheduler
        self.seed = seed
        unet = self.pipe.unet.config
        latent_shape = (unet.in_channels, unet.sample_size, unet.sample_size)  # the pipeline's default size
        self.noise = make_noise(sample_seeds(seed, samples), shape=latent_shape, device=self.device)
        texts = [c.text for c in self.captions]
        self.cond = TextCondition.from_pipeline(self.pipe, texts, [""] * len(texts))
        self.batch_size = batch_size
        self.progress = progress

    @cached_property
    def real_stats(self):
        """Scorer-feature statistics of renders of the evaluation's captions (their own scenes)."""
        rng = np.random.default_rng([self.seed, 11])
        images = scenes.to_tensor(scenes.render_batch([scenes.sample_scene(c, rng) for c in self.captions]))
        with torch.no_grad():
            return feature_stats(self.scorer.features(images.to(self.device)))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 8, 8, 8) → images (B, 3, 32, 32) in [-1, 1], as the pipeline decodes them."""
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)

    def condition(self, rows):
        return self.cond[rows]

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        return self.decode(samples)

    def reference(self, num_inference_steps: int, guidance_scale: float) -> torch.Tensor:
        """Full-CFG images from the evaluation noise (cached per step count and scale)."""
        return self.full_cfg(num_inference_steps, guidance_scale)[1]

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> dict:
        """Adherence (overall and per category) and FD of images in [-1, 1] against real renders."""
        feats = self.scorer.features(images.to(self.device))
        read = self.scorer.decode(*self.scorer.heads(feats))
        ok = np.array([scenes.satisfies(scene, cap) for scene, cap in zip(read, self.captions)])
        cats = np.array([c.category for c in self.captions])
        out = {"adherence": float(ok.mean())}
        for cat in scenes.CATEGORIES:
            if (cats == cat).any():
                out[f"adherence_{cat}"] = float(ok[cats == cat].mean())
        out["fd"] = frechet_distance(*feature_stats(feats), *self.real_stats)
        return out

    def evaluate(self, policy: Policy, compare: bool = True) -> dict:
        """One record: name, nfe, adherence (+ per category), fd, mse, psnr, seconds, samples, …

        ``compare=False`` skips the full-CFG reference (``mse`` and ``psnr`` are then None). The
        sampler outputs and images stay in ``self.last`` (the calibration plots their cosines)."""
        mse = psnr = None
        if compare:
            out, images, seconds, reference = self.sample_and_compare(policy)
            mse, psnr = mse_psnr(images, reference)
        else:
            out, images, seconds = self.run_policy(policy)
        record = dict(name=policy.label(), nfe=round(out.nfe.mean().item(), 4), **self.score(images), mse=mse,
                      psnr=psnr, seconds=round(seconds, 3),
                      samples=len(images), policy_nfe=policy.nfe, guidance_scale=policy.guidance_scale,
                      captions=self.caption_set, scheduler=self.scheduler_name)
        self.last = (out, images)
        return record

    def record(self, policy: Policy) -> dict:
        return self.evaluate(policy)
