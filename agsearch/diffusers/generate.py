"""``agsearch generate``: one text-to-image (or text-to-video) call of a local diffusers pipeline under a policy.

Loads a pipeline folder (``save_pretrained`` layout; nothing is downloaded), samples the prompt(s)
under the policy with :func:`agsearch.diffusers.hook.apply_policy`, then — unless told not to — the
same prompt(s) and noise under full CFG, and reports NFE and wall time of both and the policy's
pixel MSE/PSNR against the full-CFG image (images in [0, 1]; PSNR = 10 log10(1 / MSE)).
Prompt files hold one prompt per line, or JSON Lines ``{"prompt": ..., "negative_prompt": ...}``.
Video pipelines (Wan) write an animated GIF per prompt. An editing pipeline (InstructPix2Pix) edits
an input image (:func:`read_image`) by each instruction under a two-condition policy; its reference is
full two-condition guidance.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from agsearch.diffusers.hook import SUPPORTED, apply_policy
from agsearch.eval.clip import mse_psnr
from agsearch.io import atomic_write_bytes, read_text_file
from agsearch.policy import Policy

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRUE_CFG = ("FluxPipeline", "QwenImagePipeline")  # guided by true_cfg_scale and a negative prompt
VIDEO = ("WanPipeline",)
EDITING = ("StableDiffusionInstructPix2PixPipeline",)  # an input image and an instruction
BINNED = ("PixArtAlphaPipeline", "PixArtSigmaPipeline", "SanaPipeline")  # sizes rounded to trained aspect bins


@dataclass
class Prompt:
    prompt: str
    negative_prompt: str | None = None


def read_prompts(path: str | Path) -> list[Prompt]:
    """A prompt file: one prompt per line, or JSON Lines with ``prompt`` (and ``negative_prompt``).

    Blank lines are skipped. A file is JSON Lines when its first non-blank line starts with ``{``;
    then every line must be an object with a non-empty string ``prompt``.
    """
    path = Path(path)
    text = read_text_file(path, "prompt file")
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: the prompt file is empty")
    if not lines[0][1].startswith("{"):
        return [Prompt(line) for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ValueError(f"{path}:{n}: expected an object with a non-empty string 'prompt', got {line[:60]!r}")
        negative = record.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise ValueError(f"{path}:{n}: 'negative_prompt' must be a string, got {negative!r}")
        unknown = set(record) - {"prompt", "negative_prompt"}
        if unknown:
            raise ValueError(f"{path}:{n}: unknown field(s) {sorted(unknown)}")
        prompts.append(Prompt(record["prompt"], negative))
    return prompts


def read_image(path: str | Path) -> torch.Tensor:
    """An input image file as (3, H, W) in [0, 1] (RGB; any format PIL reads); ``ValueError`` with
    one line if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            width, height = image.size
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None
    return array.view(height, width, 3).permute(2, 0, 1).float() / 255


def pipeline_class(folder: str | Path) -> str:
    """The pipeline class a ``save_pretrained`` folder (or ``builtin:shapes``) names, checked to be supported."""
    from agsearch.models.shapes import pipeline_path

    folder = pipeline_path(folder)
    if not folder.is_dir():
        raise ValueError(f"pipeline folder {folder} does not exist")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        name = json.loads(index.read_text("utf-8")).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{index}: not a valid model_index.json") from None
    if name not in SUPPORTED:
        raise ValueError(f"pipeline class {name!r} in {index} is not supported; supported: {', '.join(SUPPORTED)}")
    return name


@contextlib.contextmanager
def quiet_loading():
    """No progress bars or advice while diffusers and transformers load a local pipeline."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity(50)  # CRITICAL: a file that fails to load is the exception raised, not a log line too
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (level, bars) in zip(libraries, saved):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def load_pipeline(folder: str | Path, device="cpu", dtype: str = "fp32"):
    """A supported pipeline from a local folder or ``builtin:shapes`` (``local_files_only``: nothing
    is downloaded; quietly: no progress bars or advice)."""
    import diffusers

    from agsearch.models.shapes import pipeline_path

    folder = pipeline_path(folder)
    name = pipeline_class(folder)
    index = json.loads((Path(folder) / "model_index.json").read_text("utf-8"))
    # Components saved as absent (SD3 without T5, SDXL without an image encoder) load as absent.
    absent = {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}
    extra = {} if dtype == "fp32" else {"torch_dtype": DTYPES[dtype]}
    with quiet_loading():
        pipe = getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True, **absent, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def png_bytes(image: torch.Tensor) -> bytes:
    """A (3, H, W) image in [0, 1] as PNG."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def generate(pipe, policy: Policy, prompts: list[Prompt], *, seed: int = 0, steps: int | None = None,
             resample: bool = False, reference: bool = True, height: int | None = None,
             width: int | None = None, warmup: bool = True, frames: int | None = None,
             image: torch.Tensor | None = None) -> dict:
    """Sample ``prompts`` (image i from seed ``seed + i``) under ``policy`` and, if ``reference``,
    under full CFG from the same noise. Returns the images (N, 3, H, W) in [0, 1] (a video
    pipeline: (N, F, 3, H, W), ``frames`` frames) and a report. An editing pipeline edits ``image``
    (3, H, W) in [0, 1] by each prompt (an instruction)."""
    steps = steps or policy.num_inference_steps
    policy = policy.for_steps(steps, resample)  # refused here, before any sampling
    device = pipe.device
    name = type(pipe).__name__
    kwargs = dict(prompt=[p.prompt for p in prompts], num_inference_steps=steps, output_type="pt",
                  height=height, width=width)
    # The call's scale only makes the pipeline build the unconditional inputs: the policy's scales apply.
    kwargs["true_cfg_scale" if name in TRUE_CFG else "guidance_scale"] = policy.guidance_scale
    if any(p.negative_prompt for p in prompts) or name in TRUE_CFG:  # true CFG runs only with a negative prompt
        kwargs["negative_prompt"] = [p.negative_prompt or "" for p in prompts]
    if name in BINNED and height is not None and width is not None:
        kwargs["use_resolution_binning"] = False  # a size given is the size made
    if frames is not None:
        kwargs["num_frames"] = frames
    if name in EDITING:
        if image is None:
            raise ValueError(f"{name} edits an input image: give one")
        kwargs.update(image=image.expand(len(prompts), -1, -1, -1).to(device),
                      image_guidance_scale=policy.image_guidance_scale)
        del kwargs["height"], kwargs["width"]  # the input image's size
    elif image is not None:
        raise ValueError(f"{name} is not an editing pipeline: it takes no input image")

    if warmup:  # the first calls of a process at each batch shape pay one-time setup costs
        ops = [policy.steps[0], policy.steps[-1]] if policy.steps else (["edit", "cond"] if policy.conditions == 2
                                                                         else ["cfg", "cond"])
        warm = Policy.static(ops, policy.guidance_scale, conditions=policy.conditions,
                             image_guidance_scale=policy.image_guidance_scale)
        with torch.inference_mode(), apply_policy(pipe, warm):
            pipe(**{**kwargs, "num_inference_steps": 2})

    def call(**extra):
        generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(prompts))]
        start = time.perf_counter()
        with torch.inference_mode():
            out = pipe(generator=generators, **kwargs, **extra)
            images = out.frames if name in VIDEO else out.images
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images.float().cpu(), time.perf_counter() - start

    with apply_policy(pipe, policy) as runner:
        images, seconds = call()
    report = {"policy": policy.label(), "steps": steps, "guidance_scale": policy.guidance_scale,
              "nfe_per_image": runner.nfe.tolist(), "full_cfg_nfe": (policy.conditions + 1) * steps, "seconds": seconds}
    if policy.conditions == 2:
        report["image_guidance_scale"] = policy.image_guidance_scale
    full = None
    if reference:
        full, full_seconds = call()
        mse, psnr = mse_psnr(images, full)  # (N,), N values in dB
        report.update(full_cfg_seconds=full_seconds, speedup=full_seconds / seconds,
                      mse_vs_full_cfg=mse.tolist(), psnr_vs_full_cfg=psnr)
    return {"images": images, "full_cfg_images": full, "report": report}


def output_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image; ``<stem>-<i><suffix>`` for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i:03d}{out.suffix}") for i in range(count)]


def gif_bytes(frames: torch.Tensor, fps: int = 8) -> bytes:
    """(F, 3, H, W) frames in [0, 1] as an animated GIF that loops."""
    from PIL import Image

    arrays = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    images = [Image.fromarray(a) for a in arrays]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    return buffer.getvalue()


def write_images(images: torch.Tensor, out: Path) -> list[Path]:
    """PNGs of (N, 3, H, W) images, or GIFs of (N, F, 3, H, W) videos."""
    encode = gif_bytes if images.dim() == 5 else png_bytes
    data = [encode(image) for image in images]  # encode everything before writing anything
    paths = output_paths(out, len(data))
    for path, blob in zip(paths, data):
        atomic_write_bytes(path, blob)
    return paths
