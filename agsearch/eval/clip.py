"""Metrics for text-to-image policies: CLIP score, Fréchet distance in CLIP space, MSE/PSNR to the teacher.

* CLIP score (Hessel et al. 2021, arXiv 2104.08718, as torchmetrics' ``CLIPScore``):
  100 · max(cos(E_img(x), E_txt(prompt)), 0) per image, with an open-clip-torch model whose weights
  come from a local file the user gives (nothing is downloaded).
* Fréchet distance (Heusel et al. 2017) between two image sets, through torchmetrics'
  ``FrechetInceptionDistance`` with the CLIP image tower as the feature extractor instead of
  Inception (no Inception download): ‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½).
* Teacher MSE and PSNR in pixel space (images in [0, 1]; PSNR = 10 log10(1 / MSE)), against the
  full-CFG images from the same noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

# open_clip's OpenAI CLIP normalisation (open_clip.constants), the default of its models.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipImageFeatures(torch.nn.Module):
    """A CLIP image tower as a torchmetrics feature extractor: (N, 3, H, W) in [0, 1] → (N, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", CLIP_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", CLIP_STD)).view(1, 3, 1, 1), persistent=False)
        self.num_features = int(model.visual.output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255
        x = F.interpolate(images.float(), size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        return self.model.encode_image((x - self.mean) / self.std)


def check_clip_files(model_name: str, weights: str | Path) -> Path:
    """Refuse, before any work, CLIP weights that are not a local safetensors file (a pickle is
    never unpickled) and model names that would make open-clip fetch something (``hf-hub:...``)."""
    weights = Path(weights)
    if not weights.is_file():
        raise ValueError(f"CLIP weights file {weights} does not exist")
    if ":" in model_name:  # hf-hub:..., local-dir:...
        raise ValueError(f"CLIP model {model_name!r}: give an open-clip architecture name (e.g. ViT-B-32) "
                         "and the weights as a local safetensors file; nothing is downloaded")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt"):
            pass
    except Exception:  # a pickle, a truncated file, another format
        raise ValueError(f"CLIP weights file {weights} is not a safetensors file") from None
    return weights


class ClipScorer:
    """CLIP score and CLIP-space Fréchet distance with one open-clip model."""

    def __init__(self, model, tokenizer):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.features = ClipImageFeatures(self.model)

    @classmethod
    def load(cls, model_name: str, weights: str | Path, device="cpu") -> "ClipScorer":
        """An open-clip model ``model_name`` (e.g. ``ViT-B-32``) with weights from a local file."""
        import open_clip

        weights = check_clip_files(model_name, weights)
        try:
            model = open_clip.create_model(model_name, pretrained=str(weights), device=device)
        except RuntimeError as e:  # an unknown architecture, or weights of another one
            raise ValueError(f"CLIP weights {weights} do not load into {model_name!r}: {str(e).splitlines()[0][:200]}") from None
        return cls(model, open_clip.get_tokenizer(model_name))

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N,) CLIP score of images (N, 3, H, W) in [0, 1] against their prompts."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        image = F.normalize(self.features(images.to(device)), dim=-1)  # (N, D)
        text = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(device)), dim=-1)  # (N, D)
        return 100 * (image * text).sum(-1).clamp(min=0)

    def fd_metric(self):
        """A torchmetrics Fréchet distance in CLIP image features, updated with images in [0, 1] batch by batch."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=self.features, normalize=True)

    @torch.no_grad()
    def frechet_distance(self, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 64) -> float:
        """Fréchet distance between two image sets (N, 3, H, W) in [0, 1], in CLIP image features."""
        metric = self.fd_metric()
        for images, is_real in ((real, True), (fake, False)):
            for chunk in images.split(batch_size):
                metric.update(chunk.float().cpu(), real=is_real)
        return float(metric.compute())


def mse_psnr(images: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Per-image pixel MSE (N,) and PSNR in dB of images in [0, 1] against the teacher's."""
    if images.shape != reference.shape:
        raise ValueError(f"image shapes differ: {tuple(images.shape)} vs {tuple(reference.shape)}")
    mse = ((images.float() - reference.float()) ** 2).flatten(1).mean(1)
    return mse, [math.inf if m == 0 else 10 * math.log10(1 / m) for m in mse.tolist()]
