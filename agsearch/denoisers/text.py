"""Denoiser adapters for diffusers text-to-image models, behind ``agsearch.denoisers.Denoiser``.

``UNetTextDenoiser`` wraps a ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x; ε or v
prediction — the output is the model's own, the scheduler's ``prediction_type`` says which; SDXL's,
with its added text-time conditioning: the pooled text embedding and the size/crop time ids);
``SD3TextDenoiser`` wraps an ``SD3Transformer2DModel`` (Stable Diffusion 3, rectified-flow
velocity v = ε − x_0, Esser et al. 2024, arXiv 2403.03206); ``PixArtTextDenoiser`` a
``PixArtTransformer2DModel`` of PixArt-Σ (ε prediction from T5 embeddings with their attention
masks; the learned variance half of its output is dropped, as the pipeline drops it);
``WanTextDenoiser`` Wan 2.1's ``WanTransformer3DModel`` (text-to-video, flow velocity on latents
(C, F, h, w); Wan 2.2: the high-noise expert above the pipeline's boundary timestep, the low-noise
one below). The condition is a :class:`TextCondition`
of the prompt and negative-prompt embeddings a pipeline's ``encode_prompt`` returns; the
unconditional pass uses the negative prompt (the empty prompt when none is given). Only the rows a
sample needs are evaluated, conditional and unconditional rows batched into one forward, as in
``agsearch.denoisers.class_conditional.ClassConditionalDenoiser``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextCondition:
    prompt_embeds: torch.Tensor  # (B, L, D)
    negative_prompt_embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, P) SD3's and SDXL's pooled text embeddings
    negative_pooled: torch.Tensor | None = None  # (B, P)
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL: original size, crop, target size
    negative_time_ids: torch.Tensor | None = None  # (B, 6)
    mask: torch.Tensor | None = None  # (B, L) PixArt: the T5 tokens' attention mask
    negative_mask: torch.Tensor | None = None  # (B, L)

    def _map(self, fn) -> "TextCondition":
        return TextCondition(*(None if t is None else fn(t) for t in (
            self.prompt_embeds, self.negative_prompt_embeds, self.pooled, self.negative_pooled, self.time_ids,
            self.negative_time_ids, self.mask, self.negative_mask)))

    def __getitem__(self, index) -> "TextCondition":
        """Rows ``index`` (a tensor of indices or a mask) of every embedding: the conditions of a
        sub-batch, e.g. the prompts of the search's pairs."""
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def to(self, device) -> "TextCondition":
        return self._map(lambda t: t.to(device))

    @classmethod
    def from_pipeline(cls, pipe, prompts: list[str], negative_prompts: list[str | None] | None = None,
                      size: int | tuple[int, int] | None = None) -> "TextCondition":
        """Encode ``prompts`` with the pipeline's own text encoders (SD 1.x/2.x, SDXL or SD3). A
        negative prompt that is None is the pipeline's own default: the empty prompt, or for SDXL
        with ``force_zeros_for_empty_prompt`` zero embeddings. SDXL's time ids are those of its
        call at ``size`` pixels, one side or (height, width) (default: the UNet's sample size)."""
        device = pipe.device
        missing = [n is None for n in (negative_prompts or [None] * len(prompts))]
        negative_prompts = [n or "" for n in (negative_prompts or [None] * len(prompts))]
        with torch.no_grad():
            if type(pipe).__name__ == "WanPipeline":  # as its __call__ encodes (512 tokens)
                pe, npe = pipe.encode_prompt(prompts, negative_prompts, do_classifier_free_guidance=True,
                                             num_videos_per_prompt=1, max_sequence_length=512, device=device)
                return cls(pe, npe)
            if type(pipe).__name__ == "PixArtSigmaPipeline":  # as its __call__ encodes (clean_caption, 300 tokens)
                pe, pm, npe, npm = pipe.encode_prompt(prompts, True, negative_prompt=negative_prompts, device=device,
                                                      clean_caption=True, max_sequence_length=300)
                return cls(pe, npe, mask=pm, negative_mask=npm)
            if hasattr(pipe, "text_encoder_2") and hasattr(pipe, "unet"):  # SDXL
                pe, npe, pooled, npooled = pipe.encode_prompt(
                    prompts, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                    negative_prompt=negative_prompts)
                if pipe.config.get("force_zeros_for_empty_prompt", False) and any(missing):
                    zero = torch.tensor(missing, device=device)
                    npe = torch.where(zero.view(-1, 1, 1), torch.zeros_like(npe), npe)
                    npooled = torch.where(zero.view(-1, 1), torch.zeros_like(npooled), npooled)
                side = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
                hw = tuple(side) if isinstance(side, (tuple, list)) else (side, side)
                projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                              else pipe.text_encoder_2.config.projection_dim)
                ids = pipe._get_add_time_ids(hw, (0, 0), hw, dtype=pe.dtype,
                                             text_encoder_projection_dim=projection).to(device)
                ids = ids.expand(len(prompts), -1)
                return cls(pe, npe, pooled, npooled, ids, ids.clone())
            if hasattr(pipe, "transformer"):
                pe, npe, pooled, npooled = pipe.encode_prompt(
                    prompts, prompts, None, device=device, do_classifier_free_guidance=True,
                    negative_prompt=negative_prompts, negative_prompt_2=negative_prompts)
                return cls(pe, npe, pooled, npooled)
            pe, npe = pipe.encode_prompt(prompts, device, 1, True, negative_prompts)
            return cls(pe, npe)


def _rows(cond_rows: torch.Tensor, uncond_rows: torch.Tensor, run_cond, run_uncond) -> torch.Tensor:
    """One batch of the conditional rows that run, then the unconditional ones (``_scatter`` undoes it)."""
    return torch.cat([cond_rows[run_cond], uncond_rows[run_uncond]])


def _scatter(x: torch.Tensor, out: torch.Tensor, run_cond: torch.Tensor, run_uncond: torch.Tensor):
    out_c, out_u = torch.zeros_like(x), torch.zeros_like(x)
    n = int(run_cond.sum())
    # index_put keeps the graph for the search's backward pass.
    out_c = out_c.index_put((run_cond.nonzero(as_tuple=True)[0],), out[:n].to(x.dtype))
    out_u = out_u.index_put((run_uncond.nonzero(as_tuple=True)[0],), out[n:].to(x.dtype))
    return out_c, out_u


class UNetTextDenoiser:
    """Adapter over a text-conditioned ``UNet2DConditionModel`` (ε or v prediction).

    ``evaluations`` counts per-sample evaluations (NFE summed over the batch).
    """

    def __init__(self, unet, parameterisation: str = "epsilon"):
        self.unet = unet
        self.parameterisation = parameterisation  # "epsilon" or "v_prediction": the scheduler config's prediction_type
        self.evaluations = 0

    def __call__(self, x, t, cond: TextCondition, run_cond, run_uncond):
        x_in = _rows(x, x, run_cond, run_uncond)  # (n_c + n_u, C, H, W)
        if len(x_in) == 0:
            return torch.zeros_like(x), torch.zeros_like(x)
        dtype = self.unet.dtype
        ctx = _rows(cond.prompt_embeds, cond.negative_prompt_embeds, run_cond, run_uncond)
        added = None
        if cond.time_ids is not None:  # SDXL's added text-time conditioning
            added = {"text_embeds": _rows(cond.pooled, cond.negative_pooled, run_cond, run_uncond).to(dtype),
                     "time_ids": _rows(cond.time_ids, cond.negative_time_ids, run_cond, run_uncond).to(dtype)}
        self.evaluations += len(x_in)
        out = self.unet(x_in.to(dtype), t, encoder_hidden_states=ctx.to(dtype), added_cond_kwargs=added).sample
        return _scatter(x, out, run_cond, run_uncond)


class SD3TextDenoiser:
    """Adapter over an ``SD3Transformer2DModel``: the output is the flow velocity v = ε − x_0."""

    parameterisation = "flow"

    def __init__(self, transformer):
        self.transformer = transformer
        self.evaluations = 0

    def __call__(self, x, t, cond: TextCondition, run_cond, run_uncond):
        x_in = _rows(x, x, run_cond, run_uncond)
        if len(x_in) == 0:
            return torch.zeros_like(x), torch.zeros_like(x)
        dtype = self.transformer.dtype
        ctx = _rows(cond.prompt_embeds, cond.negative_prompt_embeds, run_cond, run_uncond)
        pooled = _rows(cond.pooled, cond.negative_pooled, run_cond, run_uncond)
        self.evaluations += len(x_in)
        out = self.transformer(hidden_states=x_in.to(dtype), timestep=t.expand(len(x_in)),
                               encoder_hidden_states=ctx.to(dtype), pooled_projections=pooled.to(dtype)).sample
        return _scatter(x, out, run_cond, run_uncond)


class PixArtTextDenoiser:
    """Adapter over PixArt-Σ's ``PixArtTransformer2DModel`` (ε or v prediction, as its scheduler says)."""

    def __init__(self, transformer, parameterisation: str = "epsilon"):
        self.transformer = transformer
        self.parameterisation = parameterisation
        self.evaluations = 0

    def __call__(self, x, t, cond: TextCondition, run_cond, run_uncond):
        x_in = _rows(x, x, run_cond, run_uncond)
        if len(x_in) == 0:
            return torch.zeros_like(x), torch.zeros_like(x)
        dtype = self.transformer.dtype
        ctx = _rows(cond.prompt_embeds, cond.negative_prompt_embeds, run_cond, run_uncond)
        mask = _rows(cond.mask, cond.negative_mask, run_cond, run_uncond)
        self.evaluations += len(x_in)
        out = self.transformer(x_in.to(dtype), encoder_hidden_states=ctx.to(dtype), encoder_attention_mask=mask,
                               timestep=t.expand(len(x_in)), added_cond_kwargs={"resolution": None, "aspect_ratio": None}
                               ).sample
        if out.shape[1] == 2 * x.shape[1]:  # learned σ: the pipeline keeps the first half
            out = out[:, : x.shape[1]]
        return _scatter(x, out, run_cond, run_uncond)


class WanTextDenoiser:
    """Adapter over Wan's ``WanTransformer3DModel`` (flow velocity, latents (B, C, F, h, w)); with
    Wan 2.2's two experts, ``transformer`` runs the timesteps ≥ ``boundary`` and ``transformer_2``
    the rest, as the pipeline does."""

    parameterisation = "flow"

    def __init__(self, transformer, transformer_2=None, boundary: float | None = None):
        self.transformer, self.transformer_2, self.boundary = transformer, transformer_2, boundary
        self.evaluations = 0

    def __call__(self, x, t, cond: TextCondition, run_cond, run_uncond):
        x_in = _rows(x, x, run_cond, run_uncond)
        if len(x_in) == 0:
            return torch.zeros_like(x), torch.zeros_like(x)
        model = self.transformer
        if self.boundary is not None and self.transformer_2 is not None and float(t) < self.boundary:
            model = self.transformer_2
        dtype = model.dtype
        ctx = _rows(cond.prompt_embeds, cond.negative_prompt_embeds, run_cond, run_uncond)
        self.evaluations += len(x_in)
        out = model(hidden_states=x_in.to(dtype), timestep=t.expand(len(x_in)), encoder_hidden_states=ctx.to(dtype)).sample
        return _scatter(x, out, run_cond, run_uncond)


def denoiser_for(pipe):
    """The adapter for a pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``)."""
    if type(pipe).__name__ == "WanPipeline":
        ratio = pipe.config.get("boundary_ratio")
        boundary = None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps
        return WanTextDenoiser(pipe.transformer, getattr(pipe, "transformer_2", None), boundary)
    if type(pipe).__name__ == "PixArtSigmaPipeline":
        return PixArtTextDenoiser(pipe.transformer, pipe.scheduler.config.get("prediction_type", "epsilon"))
    if type(pipe).__name__ == "StableDiffusion3Pipeline":
        return SD3TextDenoiser(pipe.transformer)
    if getattr(pipe, "unet", None) is not None and getattr(pipe.unet.config, "addition_embed_type", None) in (None, "text_time"):
        return UNetTextDenoiser(pipe.unet, pipe.scheduler.config.get("prediction_type", "epsilon"))
    raise ValueError(f"no denoiser adapter for {type(pipe).__name__} (supported: SD 1.x/2.x and SDXL UNets, SD3, "
                     "PixArt-Σ, Wan)")
