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

Evaluation streams: :meth:`Evaluator.records` walks the samples batch by batch and, per batch, samples
full CFG once (the reference of every policy with that step count and scale) and then each policy,
adding to running sums (NFE, squared error, quality counts, feature moments for the FD). Memory
depends on the batch size, not on ``--samples``. Full CFG's images are kept between calls only
while they fit ``REFERENCE_CACHE_BYTES``; past that, each call samples the reference batch by batch
again, so pass every policy to one :meth:`~Evaluator.records` call.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from agsearch.eval.records import PSNR_PEAK
from agsearch.guidance.sampler import SampleOutput, sample
from agsearch.policy import Policy
from agsearch.seeds import make_noise, sample_seeds

REFERENCE_CACHE_BYTES = 256 * 2**20  # full CFG's images are kept between calls up to this size
COSINE_SAMPLES = 10_000  # the γ_t of the first samples of a run are kept, for the plots


def check_size(samples: int, batch_size: int, minimum: int = 2) -> None:
    if samples < minimum:
        raise ValueError(f"--samples must be at least {minimum} (a Fréchet distance needs a covariance), got {samples}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")


def is_full_cfg(policy: Policy) -> bool:
    """Full guidance at the policy's scales: ``cfg`` at every step (``edit`` for a two-condition policy)."""
    full = {"op": "edit"} if policy.conditions == 2 else {"op": "cfg"}
    return policy.kind == "static" and all(s == full for s in policy.steps)


def reference_key(policy: Policy) -> tuple:
    """The full-guidance run a policy is compared with: its step count and scale (and a
    two-condition policy's image scale)."""
    key = (policy.num_inference_steps, float(policy.guidance_scale))
    return key if policy.conditions == 1 else (*key, float(policy.image_guidance_scale))


def full_guidance(key: tuple) -> Policy:
    """The full-guidance policy of a :func:`reference_key`."""
    if len(key) == 2:
        return Policy.static(["cfg"] * key[0], key[1])
    return Policy.static(["edit"] * key[0], key[1], image_guidance_scale=key[2], conditions=2)


class Quality:
    """A model's quality scores of one policy, summed batch by batch: :meth:`add` the images of
    evaluation samples ``rows`` (and full CFG's images of those rows, None when not compared),
    then :meth:`result` gives the record's entries."""

    def add(self, images: torch.Tensor, rows: torch.Tensor, reference: torch.Tensor | None) -> None:
        pass

    def result(self) -> dict:
        return {}


class Tally:
    """One policy's running sums over an evaluation's batches."""

    def __init__(self, policy: Policy, quality: Quality, keep: bool = False):
        self.policy, self.quality = policy, quality
        self.samples, self.nfe_sum, self.seconds = 0, 0.0, 0.0
        self.squared_error = None  # sum over samples of the per-sample MSE to full CFG; None when not compared
        self.cosines: tuple[list, list] = ([], [])  # γ_t (T, b) of the first COSINE_SAMPLES samples
        self.kept = ([], []) if keep else None  # every batch's sampler outputs and images

    def add(self, out: SampleOutput, images: torch.Tensor, rows: torch.Tensor, seconds: float,
            reference: torch.Tensor | None) -> None:
        self.samples += len(rows)
        self.nfe_sum += float(out.nfe.double().sum())
        self.seconds += seconds
        if reference is not None:
            error = (images - reference).float().pow(2).flatten(1).mean(1).double().sum()
            self.squared_error = (self.squared_error or 0.0) + float(error)
        room = COSINE_SAMPLES - sum(c.shape[1] for c in self.cosines[0])
        if room > 0:
            self.cosines[0].append(out.cosine_x0[:, :room].cpu())
            self.cosines[1].append(out.cosine_eps[:, :room].cpu())
        if self.kept is not None:
            self.kept[0].append(out)
            self.kept[1].append(images)
        self.quality.add(images, rows, reference)

    @property
    def nfe(self) -> float:
        """Mean denoiser evaluations per sample."""
        return self.nfe_sum / self.samples

    @property
    def mse(self) -> float | None:
        """Mean per-sample MSE to full CFG (None when not compared)."""
        return None if self.squared_error is None else self.squared_error / self.samples

    @property
    def psnr(self) -> float | None:
        """PSNR of the mean MSE (None when identical to full CFG or not compared)."""
        mse = self.mse
        return 10 * math.log10(PSNR_PEAK**2 / mse) if mse else None

    def cosine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """γ_t (T, ≤ COSINE_SAMPLES) in x̂₀ and ε space of the first samples."""
        return torch.cat(self.cosines[0], dim=1), torch.cat(self.cosines[1], dim=1)

    def output(self) -> tuple[SampleOutput, torch.Tensor]:
        """Every sample's outputs and images (kept with ``keep=True`` only)."""
        outs, images = self.kept
        return SampleOutput(torch.cat([o.samples for o in outs]), torch.cat([o.nfe for o in outs]),
                            torch.cat([o.cosine_x0 for o in outs], dim=1),
                            torch.cat([o.cosine_eps for o in outs], dim=1)), torch.cat(images)


class Evaluator:
    """Shared streaming evaluation for every model: a subclass sets ``denoiser``, ``scheduler``,
    ``samples``, ``seed``, ``noise_shape``, ``device``, ``batch_size`` and ``progress``, implements
    :meth:`condition`, :meth:`quality` and :meth:`make_record`, and overrides :meth:`images` where
    samples are latents to decode (and :meth:`noise` where noise is not drawn as in
    :mod:`agsearch.seeds`)."""

    denoiser = scheduler = None
    samples: int = 0
    seed: int = 1
    noise_shape: tuple = ()
    device = torch.device("cpu")
    batch_size: int = 1000
    progress: bool = True

    def noise(self, rows: torch.Tensor) -> torch.Tensor:
        """The noise of evaluation samples ``rows`` (consecutive indices): sample i from seed S·10⁶ + i."""
        return make_noise(sample_seeds(self.seed, len(rows), int(rows[0])), self.noise_shape, self.device)

    def condition(self, rows: torch.Tensor):
        """The conditions of evaluation samples ``rows`` (an index tensor)."""
        raise NotImplementedError

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        """What the quality scores and the MSE look at: the samples themselves for a pixel model."""
        return samples

    def quality(self) -> Quality:
        """A fresh accumulator of this model's quality scores for one policy."""
        return Quality()

    def make_record(self, tally: Tally) -> dict:
        """One policy's record (see the module doc) from its tally."""
        raise NotImplementedError

    def records(self, policies: list[Policy], compare: bool = True) -> list[dict]:
        """Every policy's record, from one pass over the samples (full CFG sampled once per batch)."""
        return [self.make_record(t) for t in self.tallies(policies, compare)]

    def record(self, policy: Policy, compare: bool = True) -> dict:
        return self.records([policy], compare)[0]

    def run(self, policy: Policy) -> tuple[SampleOutput, torch.Tensor, float]:
        """Every sample under ``policy``, kept: (sampler outputs, images, seconds). Memory grows with
        the samples: for sample grids and plots, not for scores (use :meth:`records`)."""
        tally = self.tallies([policy], compare=False, keep=True)[0]
        return (*tally.output(), tally.seconds)

    @torch.no_grad()
    def tallies(self, policies: list[Policy], compare: bool = True, keep: bool = False) -> list[Tally]:
        """Sample every policy on every evaluation noise, batch by batch, into one :class:`Tally` each.

        Per batch the full-CFG policies run first (their images are the reference of their step
        count and scale); any other reference is sampled on its own. γ_t of full CFG's first samples
        are kept in ``self.full_cfg_cosines[(steps, scale)]``."""
        tallies = [Tally(p, self.quality(), keep) for p in policies]
        if not tallies:
            return []
        order = sorted(tallies, key=lambda t: not is_full_cfg(t.policy))
        cache = self.__dict__.setdefault("_references", {})
        cosines = self.__dict__.setdefault("full_cfg_cosines", {})
        wanted = {reference_key(p) for p in policies} if compare else set()
        fresh = {key: Tally(full_guidance(key), Quality()) for key in
                 wanted | {reference_key(t.policy) for t in order if is_full_cfg(t.policy)} if key not in cache}
        kept = {key: [] for key in fresh}  # this call's reference images, cached when they fit
        n = self.samples
        label = policies[0].label() if len(policies) == 1 else f"{len(policies)} policies"
        with tqdm(total=n * len(policies), desc=label, unit="sample", disable=not self.progress, leave=False) as bar:
            for lo in range(0, n, self.batch_size):
                rows = torch.arange(lo, min(lo + self.batch_size, n), device=self.device)
                noise, cond = self.noise(rows), self.condition(rows)
                references = {key: cache[key][rows] for key in wanted if key in cache}
                for tally in order:
                    key = reference_key(tally.policy)
                    out, images, seconds = self._sample(tally.policy, noise, cond, rows)
                    if is_full_cfg(tally.policy) and key not in references:
                        references[key] = images
                        if key in fresh:
                            fresh[key].add(out, images, rows, seconds, None)
                    if key in wanted and key not in references:  # the reference alone
                        ref_out, references[key], ref_seconds = self._sample(fresh[key].policy, noise, cond, rows)
                        fresh[key].add(ref_out, references[key], rows, ref_seconds, None)
                    tally.add(out, images, rows, seconds, references[key] if key in wanted else None)
                    bar.update(len(rows))
                for key, batches in kept.items():
                    if batches is not None and key in references:
                        fits = references[key][0].numel() * references[key].element_size() * n <= REFERENCE_CACHE_BYTES
                        kept[key] = batches + [references[key]] if fits else None
        for key, batches in kept.items():
            if batches is not None and sum(len(b) for b in batches) == n:
                cache[key] = torch.cat(batches)
            if fresh[key].samples == n:
                cosines[key] = fresh[key].cosine()
        return tallies

    def _sample(self, policy: Policy, noise, cond, rows) -> tuple[SampleOutput, torch.Tensor, float]:
        start = time.perf_counter()
        out = sample(self.denoiser, self.scheduler, policy, noise, cond)
        bad = int((~torch.isfinite(out.samples.flatten(1))).any(1).sum())
        if bad:  # e.g. affine coefficients whose chain of estimates diverges
            raise ValueError(f"{policy.label()}: {bad} of the first {int(rows[-1]) + 1} samples are not finite "
                             f"under this policy (NaN or infinity): nothing to score")
        images = self.images(out.samples)
        return out, images, time.perf_counter() - start


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
        self.seeds, self.labels = pairs["seed"], pairs["label"]
        self.samples, self.seed = samples, seed
        self.denoiser, self.scheduler = backend.denoiser, backend.scheduler
        self.batch_size, self.progress = batch_size, progress
        self.clip = clip  # a ClipScorer: CLIP score against the prompts, CLIP-space FD to full CFG

    def noise(self, rows):
        return self.backend.noise(self.seeds[rows], self.device)

    def condition(self, rows):
        return self.backend.condition(self.labels[rows])

    def quality(self) -> Quality:
        return _ClipQuality(self) if self.clip is not None else Quality()

    def make_record(self, tally: Tally) -> dict:
        return {"name": tally.policy.label(), "nfe": tally.nfe, "mse": tally.mse, "seconds": tally.seconds,
                "samples": tally.samples, **tally.quality.result()}


class _ClipQuality(Quality):
    """CLIP score against the prompts and the CLIP-space FD to full CFG's images, batch by batch."""

    def __init__(self, evaluator: PipelineEvaluator):
        self.evaluator, self.score_sum, self.n = evaluator, 0.0, 0
        self.fd = evaluator.clip.fd_metric()
        self.compared = False

    def add(self, images, rows, reference):
        ev = self.evaluator
        pictures = ev.backend.decode(images)
        self.score_sum += float(ev.clip.score(pictures, ev.backend.prompt_texts(ev.labels[rows])).double().sum())
        self.n += len(rows)
        if reference is not None:
            self.fd.update(ev.backend.decode(reference).float().cpu(), real=True)
            self.fd.update(pictures.float().cpu(), real=False)
            self.compared = True

    def result(self) -> dict:
        out = {"clip_score": self.score_sum / self.n}
        if self.compared and self.n >= 2:
            out["clip_fd"] = float(self.fd.compute())
        return out
