"""Side-by-side evaluation of two-condition guidance policies on the built-in shapes image editor.

The protocol of :mod:`agsearch.eval.shapes` for an editor (``builtin:shapes_edit``, an
InstructPix2Pix pipeline). Sample i of an evaluation with ``seed=S`` draws its noise (the
pipeline's 8×8×8 latents) from seed S·10⁶ + i and its edit from
:func:`agsearch.models.shapes.edits.eval_edits` (the kinds recolour, move, add, remove in turn,
from the split's instructions: "heldout" — combinations no training instruction holds — by
default, or "train"). The input image is the edit's source scene rendered; the image pass drops
the instruction to the empty prompt and the unconditional pass drops the image too (a zero image
latent), as the pipeline does. Every policy sees the same noise, sources and instructions. The
scorer reads the edited image back as a scene; metrics per policy:

    nfe             mean denoiser evaluations per sample (exact count from the sampler; full
                    two-condition guidance costs 3 per step)
    edit_success    the share of edits whose region reads as the target
                    (:func:`agsearch.models.shapes.edits.edit_success`), overall and per kind
                    (``edit_success_recolour``, …)
    preservation    the share whose image outside the region still reads as the source
    edited          the share with both: the edit done and nothing else touched
    mse/psnr        against full two-condition guidance at the policy's scales from the same
                    noise, images in [-1, 1] (PSNR peak-to-peak 2)
    seconds         wall time of sampling and decoding (the policy alone)
"""

from __future__ import annotations

import torch

from agsearch.denoisers.edit import EditCondition, UNetEditDenoiser
from agsearch.diffusers.schedulers import make_scheduler
from agsearch.eval.base import Evaluator, Quality, Tally, check_size
from agsearch.models.shapes import edits, scenes
from agsearch.seeds import EVAL_SEED

SPLITS = ("heldout", "train")


class ShapesEditEvaluator(Evaluator):
    """Samples and scores two-condition policies on the built-in shapes editor with fixed noise and edits."""

    def __init__(self, samples: int = 1000, seed: int = EVAL_SEED, split: str = "heldout", scheduler: str = "ddim",
                 batch_size: int = 250, device: str = "cpu", progress: bool = True, pipe=None, scorer=None):
        from agsearch.models.shapes import load_edit_pipeline, load_scorer

        check_size(samples, batch_size, minimum=1)
        if split not in SPLITS:
            raise ValueError(f"unknown edit split {split!r}; expected {' or '.join(SPLITS)}")
        self.edits, self.caption_set = edits.eval_edits(samples, seed, split), split
        self.device = torch.device(device)
        self.pipe = pipe if pipe is not None else load_edit_pipeline(device=self.device)
        self.pipe.to(self.device)
        self.scorer = (scorer if scorer is not None else load_scorer()).to(self.device)
        self.denoiser = UNetEditDenoiser(self.pipe.unet, self.pipe.scheduler.config.get("prediction_type", "epsilon"))
        self.scheduler = make_scheduler(scheduler, dict(self.pipe.scheduler.config))
        self.scheduler_name = scheduler
        self.samples, self.seed = samples, seed
        unet = self.pipe.unet.config
        self.noise_shape = (unet.out_channels, unet.sample_size, unet.sample_size)  # the noisy latent's half of the input
        self.batch_size = batch_size
        self.progress = progress

    def sources(self, rows) -> torch.Tensor:
        """The input images of evaluation samples ``rows``: their edits' source scenes rendered, (B, 3, 32, 32) in [-1, 1]."""
        return scenes.to_tensor(scenes.render_batch([self.edits[int(i)].source for i in rows]))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 8, 8, 8) → images (B, 3, 32, 32) in [-1, 1], as the pipeline decodes them."""
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)

    def condition(self, rows) -> EditCondition:
        """The instructions of ``rows`` encoded by the pipeline's text encoder and their sources by its VAE."""
        return EditCondition.from_pipeline(self.pipe, [self.edits[int(i)].text for i in rows], self.sources(rows))

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        return self.decode(samples)

    def quality(self) -> Quality:
        return _EditQuality(self)

    def make_record(self, tally: Tally) -> dict:
        policy = tally.policy
        return dict(name=policy.label(), nfe=round(tally.nfe, 4), **tally.quality.result(), mse=tally.mse,
                    psnr=tally.psnr, seconds=round(tally.seconds, 3), samples=tally.samples, policy_nfe=policy.nfe,
                    guidance_scale=policy.guidance_scale, image_guidance_scale=policy.image_guidance_scale,
                    edits=self.caption_set, scheduler=self.scheduler_name)

    def evaluate(self, policy, compare: bool = True) -> dict:
        """One record (see the module doc); ``compare=False`` skips the full-guidance reference."""
        policy.require_conditions(2, "the shapes editor")
        return self.records([policy], compare)[0]

    def records(self, policies, compare: bool = True) -> list[dict]:
        for policy in policies:
            policy.require_conditions(2, "the shapes editor")
        return super().records(policies, compare)


class _EditQuality(Quality):
    """Edit success, preservation and both, per kind, batch by batch."""

    METRICS = ("edit_success", "preservation", "edited")

    def __init__(self, evaluator: ShapesEditEvaluator):
        self.evaluator = evaluator
        self.counts = {kind: dict.fromkeys(self.METRICS, 0) for kind in edits.KINDS}
        self.seen = dict.fromkeys(edits.KINDS, 0)

    def add(self, images, rows, reference):
        ev = self.evaluator
        for scene, i in zip(ev.scorer.read(images.to(ev.device)), rows.tolist()):
            edit = ev.edits[i]
            done, kept = edits.edit_success(edit, scene), edits.preservation(edit, scene)
            kind = edit.instruction.kind
            self.seen[kind] += 1
            for name, value in zip(self.METRICS, (done, kept, done and kept)):
                self.counts[kind][name] += bool(value)

    def result(self) -> dict:
        total = sum(self.seen.values())
        out = {name: sum(c[name] for c in self.counts.values()) / total for name in self.METRICS}
        for kind in edits.KINDS:
            if self.seen[kind]:
                out[f"edit_success_{kind}"] = self.counts[kind]["edit_success"] / self.seen[kind]
        return out

