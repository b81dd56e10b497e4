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
from agsearch.eval.base import Evaluator, Quality, Tally, check_size
from agsearch.eval.records import FeatureMoments, frechet_distance
from agsearch.io import read_text_file
from agsearch.models.shapes import scenes
from agsearch.policy import Policy
from agsearch.seeds import EVAL_SEED

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


def max_batch(device) -> int:
    """The largest evaluation batch worth running: on a CPU the shapes UNet's cost per row rises past
    ~500 rows (2.25 ms per row up to 512 rows, 2.73 ms at 1000 on this project's 2 cores), and a CFG
    step of 250 samples is 500 rows; an accelerator takes 500 samples."""
    return 250 if torch.device(device).type == "cpu" else 500


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
        self.samples, self.seed = samples, seed
        unet = self.pipe.unet.config
        self.noise_shape = (unet.in_channels, unet.sample_size, unet.sample_size)  # the pipeline's default size
        self.batch_size = batch_size
        self.progress = progress

    @cached_property
    def real_stats(self):
        """Scorer-feature statistics of renders of the evaluation's captions (their own scenes),
        rendered and featurised batch by batch."""
        rng = np.random.default_rng([self.seed, 11])
        moments = FeatureMoments()
        for lo in range(0, self.samples, self.batch_size):
            chunk = [scenes.sample_scene(c, rng) for c in self.captions[lo:lo + self.batch_size]]
            with torch.no_grad():
                moments.add(self.scorer.features(scenes.to_tensor(scenes.render_batch(chunk)).to(self.device)))
        return moments.stats()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 8, 8, 8) → images (B, 3, 32, 32) in [-1, 1], as the pipeline decodes them."""
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)

    def condition(self, rows):
        """The captions of ``rows`` encoded by the pipeline's text encoder; the empty prompt unconditional."""
        texts = [self.captions[int(i)].text for i in rows]
        return TextCondition.from_pipeline(self.pipe, texts, [""] * len(texts))

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        return self.decode(samples)

    def quality(self) -> Quality:
        return _ShapesQuality(self)

    def make_record(self, tally: Tally) -> dict:
        policy = tally.policy
        return dict(name=policy.label(), nfe=round(tally.nfe, 4), **tally.quality.result(), mse=tally.mse,
                    psnr=tally.psnr, seconds=round(tally.seconds, 3), samples=tally.samples, policy_nfe=policy.nfe,
                    guidance_scale=policy.guidance_scale, captions=self.caption_set, scheduler=self.scheduler_name)

    def evaluate(self, policy: Policy, compare: bool = True, keep: bool = False) -> dict:
        """One record: name, nfe, adherence (+ per category), fd, mse, psnr, seconds, samples, …

        ``compare=False`` skips the full-CFG reference (``mse`` and ``psnr`` are then None).
        ``keep=True`` keeps every sample's sampler outputs and images in ``self.last`` (the
        calibration plots their cosines); memory then grows with the samples."""
        tally = self.tallies([policy], compare, keep)[0]
        if keep:
            self.last = tally.output()
        return self.make_record(tally)


class _ShapesQuality(Quality):
    """Adherence counts per category and the moments of the scorer's features, batch by batch."""

    def __init__(self, evaluator: ShapesEvaluator):
        self.evaluator, self.moments = evaluator, FeatureMoments()
        self.satisfied = {c: 0 for c in scenes.CATEGORIES}
        self.seen = {c: 0 for c in scenes.CATEGORIES}

    def add(self, images, rows, reference):
        ev = self.evaluator
        feats = ev.scorer.features(images.to(ev.device))
        read = ev.scorer.decode(*ev.scorer.heads(feats))
        for scene, i in zip(read, rows.tolist()):
            caption = ev.captions[i]
            self.seen[caption.category] += 1
            self.satisfied[caption.category] += bool(scenes.satisfies(scene, caption))
        self.moments.add(feats)

    def result(self) -> dict:
        out = {"adherence": sum(self.satisfied.values()) / sum(self.seen.values())}
        for cat in scenes.CATEGORIES:
            if self.seen[cat]:
                out[f"adherence_{cat}"] = self.satisfied[cat] / self.seen[cat]
        out["fd"] = frechet_distance(*self.moments.stats(), *self.evaluator.real_stats)
        return out
