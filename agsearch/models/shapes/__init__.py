"""The built-in shapes text-to-image model: a miniature Stable Diffusion and its exact scorer.

- ``weights/shapes/``: a diffusers ``StableDiffusionPipeline`` folder (``save_pretrained``
  layout) — a small ``AutoencoderKL`` (32×32 RGB ↔ 8×8×8 latents), a small ``CLIPTextModel``
  with the real CLIP BPE tokenizer, a ``UNet2DConditionModel`` with cross-attention and a DDIM
  scheduler config (Euler and DPM-Solver++ take it too) — trained from scratch on the
  procedural scenes of :mod:`agsearch.models.shapes.scenes` by ``experiments/train_shapes.py``, with
  the caption dropped to the empty prompt 10% of the time so one network gives both CFG passes;
- ``weights/shapes_scorer.safetensors``: :class:`ShapesScorer`, a CNN trained on renders only
  (``experiments/train_shapes_scorer.py``) that reads every grid cell's object back (shape or
  empty, colour, size); a caption is satisfied when the scene it reads satisfies it.

``load_pipeline()`` loads the pipeline offline; ``--pipeline builtin:shapes`` names it on the
command line. The model card is ``weights/shapes/README.md``.

The editing test bed: :mod:`agsearch.models.shapes.edits` (edit triples, instructions, metrics) and
``weights/shapes_edit/``, a ``StableDiffusionInstructPix2PixPipeline`` folder trained by
``experiments/train_shapes_edit.py`` from the shapes model (``load_edit_pipeline()``,
``builtin:shapes_edit``).
"""

from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from agsearch.models.shapes import scenes

WEIGHTS_DIR = Path(str(resources.files("agsearch.models.shapes") / "weights"))
PIPELINE_DIR = WEIGHTS_DIR / "shapes"
EDIT_PIPELINE_DIR = WEIGHTS_DIR / "shapes_edit"
SCORER_FILE = WEIGHTS_DIR / "shapes_scorer.safetensors"
BENCHMARK_FILE = WEIGHTS_DIR / "shapes_benchmark.json"  # written by experiments/calibrate_shapes.py
EDIT_BENCHMARK_FILE = WEIGHTS_DIR / "shapes_edit_benchmark.json"  # written by experiments/calibrate_shapes_edit.py
BUILTIN_PREFIX = "builtin:"

TOKENIZER_MAX_LENGTH = 32  # the longest caption is 14 tokens with BOS/EOS; SD's 77 would only pad

TEXT_CONFIG = dict(
    vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
    max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=64,
)
LATENT_CHANNELS = 8  # with 4 (SD's), small crosses and squares came back from the decoder as blobs
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=32, layers_per_block=2,
    block_out_channels=(16, 32, 64), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
UNET_CONFIG = dict(
    sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
# Stable Diffusion's β schedule; "trailing" spacing so that few-step samplers start at pure noise.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="trailing",
)


def build_components(scaling_factor: float = 1.0):
    """Freshly initialised (vae, text_encoder, tokenizer, unet, scheduler) of the shapes pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from agsearch.diffusers.clip_tokenizer import clip_tokenizer

    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=scaling_factor)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    tokenizer = clip_tokenizer(model_max_length=TOKENIZER_MAX_LENGTH)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return vae, text_encoder, tokenizer, unet, DDIMScheduler(**SCHEDULER_CONFIG)


BUILTIN_PIPELINES = {  # builtin:NAME → (folder, how it is made)
    "shapes": (PIPELINE_DIR, "run experiments/train_shapes.py"),
    "shapes_edit": (EDIT_PIPELINE_DIR, "run experiments/train_shapes_edit.py and copy its --out folder there"),
}


def pipeline_path(name: str | Path) -> Path:
    """A pipeline folder, or a built-in model named ``builtin:NAME`` (``builtin:shapes``, ``builtin:shapes_edit``)."""
    text = str(name)
    if text.startswith(BUILTIN_PREFIX):
        model = text[len(BUILTIN_PREFIX):]
        if model not in BUILTIN_PIPELINES:
            expected = " or ".join(repr(BUILTIN_PREFIX + k) for k in BUILTIN_PIPELINES)
            raise ValueError(f"unknown built-in pipeline {text!r}: expected {expected}")
        folder, how = BUILTIN_PIPELINES[model]
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"the {model} pipeline is not in {folder}: {how}")
        return folder
    return Path(name)


@contextlib.contextmanager
def _quiet_loading():
    """diffusers' and transformers' loading progress bars off for the duration."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in restore:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_enabled in restore:
            if was_enabled:
                lib.enable_progress_bar()


def load_pipeline(device="cpu", dtype=torch.float32, progress: bool = False):
    """The built-in shapes ``StableDiffusionPipeline``, loaded offline from the package."""
    from diffusers import StableDiffusionPipeline

    extra = {} if dtype == torch.float32 else {"torch_dtype": dtype}  # fp32 is the default
    with _quiet_loading():  # a 37 MB folder: no loading bars, no advice to install accelerate
        pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_path("builtin:shapes")), local_files_only=True,
                                                       low_cpu_mem_usage=False, **extra)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


def load_edit_pipeline(device="cpu", dtype=torch.float32, progress: bool = False):
    """The built-in shapes editor, a ``StableDiffusionInstructPix2PixPipeline``, loaded offline from the package."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    extra = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    with _quiet_loading():
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            str(pipeline_path("builtin:shapes_edit")), local_files_only=True, low_cpu_mem_usage=False, **extra)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


def edit_unet(unet):
    """InstructPix2Pix's UNet from a text-to-image one: ``in_channels`` doubled, every weight copied,
    the new input channels of ``conv_in`` zero (the image channels, after the noisy latent's)."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config, in_channels=2 * unet.config.in_channels)
    edit = UNet2DConditionModel.from_config(config).to(unet.device)
    state = unet.state_dict()
    weight = state.pop("conv_in.weight")  # (C_out, C_in, 3, 3)
    missing, unexpected = edit.load_state_dict(state, strict=False)
    if missing != ["conv_in.weight"] or unexpected:
        raise ValueError(f"the UNets differ beyond conv_in: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        edit.conv_in.weight.zero_()
        edit.conv_in.weight[:, : weight.shape[1]] = weight
    return edit


def benchmark_settings() -> dict:
    """The benchmark protocol's settings for the shapes model (scheduler, steps, best scale).

    Written by ``experiments/calibrate_shapes.py`` after its guidance-scale sweep.
    """
    import json

    if BENCHMARK_FILE.is_file():
        return json.loads(BENCHMARK_FILE.read_text("utf-8"))
    return {"scheduler": "ddim", "num_inference_steps": 25, "guidance_scale": 5.0}


def edit_benchmark_settings() -> dict:
    """The benchmark protocol's settings for the shapes editor (scheduler, steps, the text and image
    guidance scales s_T and s_I). Written by ``experiments/calibrate_shapes_edit.py`` after its
    scale sweep; InstructPix2Pix's image scale and this model's text scale until then."""
    import json

    if EDIT_BENCHMARK_FILE.is_file():
        return json.loads(EDIT_BENCHMARK_FILE.read_text("utf-8"))
    return {"scheduler": "ddim", "num_inference_steps": 25, "guidance_scale": 4.0, "image_guidance_scale": 1.5}


# --- the scorer ------------------------------------------------------------------------------


class ShapesScorer(nn.Module):
    """Reads a 32×32 scene back: per grid cell, its shape or "empty", its colour and its size.

    Input (B, 3, 32, 32) in [-1, 1]. ``features`` (B, 256) is the penultimate layer (Fréchet
    distance); ``forward`` gives logits (B, 9, 5) shape (index 0 = empty, then ``scenes.SHAPES``),
    (B, 9, 6) colour and (B, 9, 2) size, cells in row-major order.
    """

    feature_dim = 256
    n_cells = scenes.GRID * scenes.GRID

    def __init__(self):
        super().__init__()
        conv = lambda i, o, s: [nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.SiLU()]
        self.body = nn.Sequential(*conv(3, 32, 1), *conv(32, 64, 2), *conv(64, 64, 1), *conv(64, 128, 2),
                                  *conv(128, 128, 1), *conv(128, 128, 2), nn.Flatten(),  # (B, 128, 4, 4)
                                  nn.Linear(128 * 4 * 4, self.feature_dim), nn.SiLU())
        self.shape_head = nn.Linear(self.feature_dim, self.n_cells * (len(scenes.SHAPES) + 1))
        self.colour_head = nn.Linear(self.feature_dim, self.n_cells * len(scenes.COLOURS))
        self.size_head = nn.Linear(self.feature_dim, self.n_cells * len(scenes.SIZES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def heads(self, feats: torch.Tensor):
        b = len(feats)
        return (self.shape_head(feats).view(b, self.n_cells, -1), self.colour_head(feats).view(b, self.n_cells, -1),
                self.size_head(feats).view(b, self.n_cells, -1))

    def forward(self, images: torch.Tensor):
        return self.heads(self.features(images))

    @staticmethod
    def decode(shape_logits, colour_logits, size_logits) -> list[tuple[scenes.Obj, ...]]:
        """The scenes the logits say: one object per cell whose shape is not "empty"."""
        shape, colour, size = shape_logits.argmax(-1), colour_logits.argmax(-1), size_logits.argmax(-1)
        out = []
        for b in range(len(shape)):
            objs = []
            for k in range(shape.shape[1]):
                if shape[b, k] > 0:
                    objs.append(scenes.Obj(scenes.SHAPES[shape[b, k] - 1], scenes.COLOUR_NAMES[colour[b, k]],
                                           scenes.SIZES[size[b, k]], divmod(k, scenes.GRID)))
            out.append(tuple(objs))
        return out

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[tuple[scenes.Obj, ...]]:
        return self.decode(*self(images))


def scene_targets(scene_list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cell targets (B, 9) of scenes: shape index (0 empty), colour and size (−100 where empty)."""
    n = scenes.GRID * scenes.GRID
    shape = torch.zeros(len(scene_list), n, dtype=torch.long)
    colour = torch.full((len(scene_list), n), -100, dtype=torch.long)
    size = torch.full((len(scene_list), n), -100, dtype=torch.long)
    for b, scene in enumerate(scene_list):
        for obj in scene:
            k = obj.cell[0] * scenes.GRID + obj.cell[1]
            shape[b, k] = scenes.SHAPES.index(obj.shape) + 1
            colour[b, k] = scenes.COLOUR_NAMES.index(obj.colour)
            size[b, k] = scenes.SIZES.index(obj.size)
    return shape, colour, size


def load_scorer(path: str | Path = SCORER_FILE) -> ShapesScorer:
    from safetensors.torch import load_file

    model = ShapesScorer()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
