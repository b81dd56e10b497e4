"""Frozen model backends the search trains against: a denoiser behind the ``agsearch.denoisers.Denoiser``
contract, a scheduler, per-sample seeded noise and the conditions pair i draws from
(``num_conditions``; pair i uses condition i mod ``num_conditions``). Kept outside the
LightningModule's submodules, so checkpoints hold the gates and never the model weights.

Four backends: the built-in digits UNet (``model="digits"``, 10 class labels), a local
diffusers text-to-image pipeline folder with a prompt file (``TextPipelineBackend``: Stable
Diffusion 1.x/2.x and 3; one condition per prompt), the built-in shapes pipeline on its
training captions (``model="shapes"`` or ``pipeline="builtin:shapes"``, ``ShapesBackend``) and
the built-in shapes editor on its training instructions (``model="shapes_edit"`` or
``pipeline="builtin:shapes_edit"``, ``ShapesEditBackend``: two conditions, the image and the
instruction).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.utils.checkpoint

from agsearch.denoisers.class_conditional import ClassConditionalDenoiser
from agsearch.diffusers.schedulers import make_scheduler
from agsearch.models.digits.data import IMAGE_SHAPE, NULL_CLASS, NUM_CLASSES
from agsearch.seeds import make_noise

MODELS = ("digits", "shapes", "shapes_edit", "pipeline")  # "pipeline": the folder given as ``pipeline``
SEARCH_STEPS = 25  # T of a pipeline search unless given: a 25-step teacher costs 50 NFE per pair


class CheckpointedDenoiser:
    """Gradient checkpointing around every denoiser call of a differentiable trajectory.

    The UNet's activations are dropped after the forward pass and recomputed during backward,
    so a T-step chain keeps only its inputs and outputs per step: activation memory stays flat
    in T at the price of one extra forward per call (Chen et al. 2016, arXiv 1604.06174).
    """

    def __init__(self, inner):
        self.inner = inner
        self.parameterisation = getattr(inner, "parameterisation", None)
        self.conditions = getattr(inner, "conditions", 1)  # 2: an editor's three passes

    def __call__(self, x, t, cond, *runs):
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.inner(x, t, cond, *runs)
        return torch.utils.checkpoint.checkpoint(self.inner, x, t, cond, *runs, use_reentrant=False)


class DigitsBackend:
    """The built-in class-conditional digits UNet (``agsearch.models.digits``)."""

    num_conditions = NUM_CLASSES

    def __init__(self, scheduler: str = "ddim", unet=None):
        from agsearch.models.digits import SCHEDULER_CONFIG, load_unet

        self.scheduler = make_scheduler(scheduler, SCHEDULER_CONFIG)  # checks the name
        self.scheduler_name = scheduler
        self.unet = (unet if unet is not None else load_unet()).requires_grad_(False).eval()
        self.denoiser = ClassConditionalDenoiser(self.unet, NULL_CLASS)

    def evaluator(self, samples: int, seed: int, batch_size: int, device, progress: bool, clip=None):
        """The digits evaluator (accuracy, FD) on this backend's UNet and scheduler."""
        if clip is not None:
            raise ValueError("eval.clip_weights applies to a pipeline folder's search, not the digits model")
        from agsearch.eval.digits import DigitsEvaluator

        return DigitsEvaluator(samples=samples, seed=seed, scheduler=self.scheduler_name, batch_size=batch_size,
                               device=device, progress=progress, unet=self.unet)

    def to(self, device) -> "DigitsBackend":
        self.unet.to(device)
        return self

    def noise(self, seeds: torch.Tensor, device) -> torch.Tensor:
        return make_noise([int(s) for s in seeds], IMAGE_SHAPE, device)

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def provenance(self) -> dict:
        return {"model": "digits"}


def pipeline_settings(pipeline: str, prompts: str | None) -> dict:
    """Check a pipeline folder and prompt file cheaply (before loading any weights) and return the
    run defaults: the pipeline's own scheduler (``None``), ``SEARCH_STEPS`` steps and the guidance
    scale of the pipeline class's ``__call__`` (7.5 for SD 1.x/2.x, 5.0 for SDXL, 7.0 for SD3, 4.5 for
    PixArt-Σ)."""
    import inspect

    import diffusers

    from agsearch.diffusers.generate import pipeline_class, read_prompts

    if prompts is None:
        raise ValueError(f"model.pipeline={pipeline} needs model.prompts=FILE (one prompt per line, or JSON Lines)")
    name = pipeline_class(pipeline)  # the folder exists and names a class apply_policy supports
    if name not in TextPipelineBackend.SUPPORTED:
        raise ValueError(f"pipeline class {name!r} in {pipeline} is not supported by the search (no denoiser "
                         f"adapter yet); supported: {', '.join(TextPipelineBackend.SUPPORTED)}")
    read_prompts(prompts)  # empty or malformed files fail here, with the line
    scale = inspect.signature(getattr(diffusers, name).__call__).parameters["guidance_scale"].default
    return {"scheduler": None, "num_inference_steps": SEARCH_STEPS, "guidance_scale": float(scale)}


class PrecomputedConditions:
    """A pipeline backend's noise and conditions: ``self.cond`` holds every condition encoded once
    (a ``TextCondition`` or an ``EditCondition``), indexed by label; noise has ``self.latent_shape``."""

    latent_shape: tuple[int, ...]

    def noise(self, seeds: torch.Tensor, device) -> torch.Tensor:
        return make_noise([int(s) for s in seeds], self.latent_shape, device)

    def condition(self, labels: torch.Tensor):
        """The conditions of labels ``labels`` (B,) as one condition of batch B."""
        return self.cond[labels.to(self.cond.prompt_embeds.device)]


class TextPipelineBackend(PrecomputedConditions):
    """A local diffusers text-to-image pipeline folder and a prompt file.

    The pipeline is loaded with ``local_files_only`` (nothing is downloaded); its prompts are
    encoded once by its own text encoders, which are then dropped with the VAE: the search keeps
    the frozen denoiser (``unet``, or SD3's ``transformer``), the scheduler and the embeddings
    (``agsearch.denoisers.text``). The unconditional pass uses each prompt's negative prompt (when it
    has none, the pipeline's default: the empty prompt, or SDXL's zero embeddings). Noise for seed s is ``torch.randn((C, h, w), generator=
    torch.Generator().manual_seed(s))`` of the pipeline's default latent shape — the latents the
    pipeline itself draws for ``generator=torch.Generator().manual_seed(s)`` — so the teacher is
    the pipeline's own full-CFG call.

    Args:
        pipeline: the folder (``save_pretrained`` layout) of a StableDiffusionPipeline,
            StableDiffusionXLPipeline (its added text-time conditioning at the default size),
            StableDiffusion3Pipeline or PixArtSigmaPipeline.
        prompts: one prompt per line, or JSON Lines with ``prompt`` and ``negative_prompt``
            (``agsearch.diffusers.generate.read_prompts``).
        scheduler: ``None`` for the pipeline's own scheduler, or ``ddim``/``euler``/``dpm++``
            built from its config (SD 1.x/2.x and SDXL; SD3 is flow matching).
    """

    SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "PixArtSigmaPipeline",
                 "WanPipeline")
    FLOW = ("StableDiffusion3Pipeline", "WanPipeline")  # flow matching: their own schedulers only

    def __init__(self, pipeline: str, prompts: str, scheduler: str | None = None,
                 size: tuple[int | None, int | None, int | None] = (None, None, None)):
        from agsearch.denoisers.text import (
            TextCondition,
            denoiser_for,
        )
        from agsearch.diffusers.generate import load_pipeline, pipeline_class
        from agsearch.models.shapes import pipeline_path

        self.folder = pipeline_path(pipeline)
        self.class_name = pipeline_class(pipeline)
        self.prompts = self.read_prompts(prompts)
        if scheduler is not None and self.class_name in self.FLOW:
            raise ValueError(f"model.scheduler={scheduler!r}: a flow-matching pipeline ({self.class_name}) "
                             "runs its own scheduler; leave model.scheduler unset")
        pipe = load_pipeline(pipeline)  # fp32 on the CPU; Lightning moves it and autocasts
        self.scheduler = pipe.scheduler if scheduler is None else make_scheduler(scheduler, dict(pipe.scheduler.config))
        self.pipe = pipe  # its VAE decodes latents for CLIP scores
        self.unet = (pipe.transformer if hasattr(pipe, "transformer") else pipe.unet).requires_grad_(False).eval()
        if getattr(pipe, "transformer_2", None) is not None:
            pipe.transformer_2.requires_grad_(False).eval()
        self.latent_shape, self.size = self._latent_shape(pipe, *size)
        self.cond = TextCondition.from_pipeline(pipe, [p.prompt for p in self.prompts],
                                                [p.negative_prompt for p in self.prompts], size=self.size[:2])
        self.denoiser = denoiser_for(pipe)
        self.num_conditions = len(self.prompts)

    def _latent_shape(self, pipe, height, width, num_frames) -> tuple[tuple[int, ...], tuple]:
        """The latent shape of one sample at the size given (default: the pipeline's own), and that
        size (height, width[, frames]) in pixels."""
        import inspect

        if self.class_name == "WanPipeline":  # (C, F', h, w): the VAE is 8× in space, 4× in time
            defaults = inspect.signature(type(pipe).__call__).parameters
            height, width = height or defaults["height"].default, width or defaults["width"].default
            num_frames = num_frames or defaults["num_frames"].default
            s, f = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
            shape = (self.unet.config.in_channels, (num_frames - 1) // f + 1, height // s, width // s)
            return shape, (height, width, num_frames)
        if num_frames is not None:
            raise ValueError(f"model.num_frames is for video pipelines; {self.class_name} makes images")
        side = self.unet.config.sample_size * pipe.vae_scale_factor  # the pipeline's default size
        height, width = height or side, width or side
        return (self.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor), \
            (height, width)

    def read_prompts(self, prompts: str):
        from agsearch.diffusers.generate import read_prompts

        self.prompt_file = Path(prompts)
        return read_prompts(prompts)

    def evaluator(self, samples: int, seed: int, batch_size: int, device, progress: bool, clip=None):
        """Latent MSE to full CFG on held-out (noise, prompt) pairs of this pipeline and prompts;
        with a :class:`~agsearch.eval.clip.ClipScorer`, CLIP scores and CLIP-space FD too."""
        from agsearch.eval.base import PipelineEvaluator

        if clip is not None and len(self.latent_shape) == 4:
            raise ValueError(f"eval.clip_weights scores images; {self.class_name} makes videos")
        return PipelineEvaluator(self, samples, seed, batch_size, device, progress, clip)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images (B, 3, H, W) in [0, 1], as the pipeline decodes them."""
        vae = self.pipe.vae
        latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None) is not None:  # SD3
            latents = latents + vae.config.shift_factor
        return (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    def prompt_texts(self, labels: torch.Tensor) -> list[str]:
        return [self.prompts[int(i)].prompt for i in labels]

    def to(self, device) -> "TextPipelineBackend":
        self.unet.to(device)
        if getattr(self.pipe, "transformer_2", None) is not None:
            self.pipe.transformer_2.to(device)
        self.pipe.vae.to(device)
        self.cond = self.cond.to(device)
        return self

    def provenance(self) -> dict:
        return {"model": str(self.folder.resolve()),
                "pipeline": {"folder": str(self.folder.resolve()), "class": self.class_name,
                             "prompts": str(self.prompt_file.resolve()), "num_prompts": len(self.prompts),
                             "size": list(self.size),
                             "negative_prompts": sum(bool(p.negative_prompt) for p in self.prompts)}}


class ShapesBackend(TextPipelineBackend):
    """The built-in shapes text-to-image pipeline (``builtin:shapes``) on its training captions.

    The search's prompts are ``SEARCH_CAPTIONS`` training captions drawn by the search seed, the
    categories in turn (:func:`agsearch.models.shapes.scenes.eval_captions`), or a caption file of
    the shapes grammar; the unconditional pass uses the empty prompt the model was trained to drop
    captions to. Its evaluator is the shapes evaluator (prompt adherence overall and per category,
    FD, MSE/PSNR of decoded images) on held-out seeds of the same caption set.
    """

    SEARCH_CAPTIONS = 1000

    def __init__(self, scheduler: str | None = "ddim", captions: str | None = None):
        self.caption_source = captions
        self.scheduler_name = scheduler or "ddim"
        super().__init__("builtin:shapes", captions, self.scheduler_name)

    def read_prompts(self, captions: str | None):
        from agsearch.diffusers.generate import Prompt
        from agsearch.eval.shapes import read_captions
        from agsearch.models.shapes import scenes
        from agsearch.seeds import SEARCH_SEED

        self.prompt_file = None if captions is None else Path(captions)
        chosen = (scenes.eval_captions(self.SEARCH_CAPTIONS, SEARCH_SEED, "train") if captions is None
                  else read_captions(captions))
        return [Prompt(c.text) for c in chosen]

    def evaluator(self, samples: int, seed: int, batch_size: int, device, progress: bool, clip=None):
        """The shapes evaluator on held-out seeds of this search's captions (the training split, or
        the caption file)."""
        if clip is not None:
            raise ValueError("eval.clip_weights applies to a pipeline folder's search; "
                             "the shapes model is scored exactly (adherence, FD)")
        from agsearch.eval.shapes import ShapesEvaluator, max_batch
        from agsearch.models.shapes import load_scorer

        self.pipe.to(device)  # the evaluator encodes its captions batch by batch
        return ShapesEvaluator(samples=samples, seed=seed, captions=self.caption_source or "train",
                               scheduler=self.scheduler_name, batch_size=min(batch_size, max_batch(device)), device=device,
                               progress=progress, pipe=self.pipe, scorer=load_scorer())

    def provenance(self) -> dict:
        captions = (f"{self.SEARCH_CAPTIONS} training captions drawn by seed 0" if self.prompt_file is None
                    else str(self.prompt_file.resolve()))
        return {"model": "agsearch-shapes", "pipeline": {"folder": "builtin:shapes", "class": self.class_name,
                                                          "prompts": captions, "num_prompts": len(self.prompts)}}


class ShapesEditBackend(PrecomputedConditions):
    """The built-in shapes editor (``builtin:shapes_edit``, an InstructPix2Pix pipeline) on its
    training instructions: a backend of two conditions (``conditions = 2``).

    Pair i edits the source of edit i mod ``SEARCH_EDITS`` of ``SEARCH_EDITS`` training edits drawn
    by the search seed (:func:`agsearch.models.shapes.edits.eval_edits`, the kinds in turn); its
    instruction and input image are encoded once (:class:`agsearch.denoisers.edit.EditCondition`).
    The teacher is full two-condition guidance at s_T = the run's ``guidance_scale`` and s_I =
    ``image_guidance_scale`` (default: the editor's benchmark setting). Its evaluator is the editing
    evaluator (edit success, preservation, MSE) on held-out seeds of training instructions.
    """

    SEARCH_EDITS = 1000
    conditions = 2

    def __init__(self, scheduler: str | None = "ddim", image_guidance_scale: float | None = None, pipe=None):
        import math

        from agsearch.denoisers.edit import EditCondition, UNetEditDenoiser
        from agsearch.models.shapes import edit_benchmark_settings, edits, load_edit_pipeline, scenes
        from agsearch.seeds import SEARCH_SEED

        if image_guidance_scale is None:
            image_guidance_scale = float(edit_benchmark_settings()["image_guidance_scale"])
        if not (isinstance(image_guidance_scale, (int, float)) and math.isfinite(image_guidance_scale)
                and 0 <= image_guidance_scale <= 100):
            raise ValueError(f"Expected model.image_guidance_scale to be a number in [0, 100], but got "
                             f"{image_guidance_scale!r}")
        self.image_guidance_scale = float(image_guidance_scale)
        self.pipe = pipe if pipe is not None else load_edit_pipeline()
        self.scheduler_name = scheduler or "ddim"
        self.scheduler = make_scheduler(self.scheduler_name, dict(self.pipe.scheduler.config))
        self.unet = self.pipe.unet.requires_grad_(False).eval()
        self.edits = edits.eval_edits(self.SEARCH_EDITS, SEARCH_SEED, "train")
        chunks = [self.edits[lo:lo + 250] for lo in range(0, len(self.edits), 250)]
        parts = [EditCondition.from_pipeline(self.pipe, [e.text for e in chunk],
                                             scenes.to_tensor(scenes.render_batch([e.source for e in chunk])))
                 for chunk in chunks]
        self.cond = EditCondition(*(torch.cat([getattr(c, f) for c in parts]) for f in
                                    ("prompt_embeds", "negative_prompt_embeds", "image_latents")))
        self.denoiser = UNetEditDenoiser(self.unet, self.pipe.scheduler.config.get("prediction_type", "epsilon"))
        self.num_conditions = len(self.edits)
        config = self.unet.config
        self.latent_shape = (config.out_channels, config.sample_size, config.sample_size)

    def evaluator(self, samples: int, seed: int, batch_size: int, device, progress: bool, clip=None):
        """The editing evaluator on held-out seeds of training instructions."""
        if clip is not None:
            raise ValueError("eval.clip_weights applies to a pipeline folder's search; "
                             "the shapes editor is scored exactly (edit success, preservation)")
        from agsearch.eval.shapes_edit import ShapesEditEvaluator

        return ShapesEditEvaluator(samples=samples, seed=seed, split="train", scheduler=self.scheduler_name,
                                   batch_size=min(batch_size, 250), device=device, progress=progress, pipe=self.pipe)

    def to(self, device) -> "ShapesEditBackend":
        self.pipe.to(device)
        self.cond = self.cond.to(device)
        return self

    def provenance(self) -> dict:
        return {"model": "agsearch-shapes-edit",
                "pipeline": {"folder": "builtin:shapes_edit", "class": type(self.pipe).__name__,
                             "prompts": f"{self.SEARCH_EDITS} training edits drawn by seed 0",
                             "num_prompts": self.SEARCH_EDITS, "image_guidance_scale": self.image_guidance_scale}}


def load_backend(model: str, scheduler: str | None, pipeline: str | None = None, prompts: str | None = None,
                 size: tuple[int | None, int | None, int | None] = (None, None, None),
                 image_guidance_scale: float | None = None):
    if image_guidance_scale is not None and model != "shapes_edit":
        raise ValueError(f"model.image_guidance_scale is the image scale of an editor (model shapes_edit); "
                         f"model {model!r} guides on one condition")
    if model == "shapes_edit":
        return ShapesEditBackend(scheduler, image_guidance_scale)
    if model == "digits":
        return DigitsBackend(scheduler)
    if model == "shapes":
        return ShapesBackend(scheduler, prompts)
    if model == "pipeline":
        return TextPipelineBackend(pipeline, prompts, scheduler, size)
    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
