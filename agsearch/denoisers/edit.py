"""The denoiser adapter of an instruction-based image editor (InstructPix2Pix, arXiv 2211.09800).

Its model takes the noisy latent concatenated on channels with the input image's latent, and guides
on two conditions: the image and the text instruction. ``__call__(x, t, cond, run_full, run_image,
run_none)`` evaluates, for the samples each bool mask (B,) selects, the three passes of
:data:`agsearch.guidance.ops.EDIT_PASSES` in one batched forward, and returns ``(ε_IT, ε_I, ε_∅)``
(rows not run are zeros):

    full    ε(image, text)   the image latent and the instruction's embedding
    image   ε(image, ∅)      the image latent and the empty prompt's embedding
    none    ε(∅, ∅)          a zero image latent and the empty prompt's embedding

as diffusers' ``StableDiffusionInstructPix2PixPipeline`` builds its three-way batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EditCondition:
    prompt_embeds: torch.Tensor  # (B, L, D) the instruction
    negative_prompt_embeds: torch.Tensor  # (B, L, D) the empty prompt
    image_latents: torch.Tensor  # (B, C, h, w) the input image's VAE latent, unscaled (as the pipeline has it)

    def __getitem__(self, index) -> "EditCondition":
        return EditCondition(self.prompt_embeds[index], self.negative_prompt_embeds[index], self.image_latents[index])

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def to(self, device) -> "EditCondition":
        return EditCondition(self.prompt_embeds.to(device), self.negative_prompt_embeds.to(device),
                             self.image_latents.to(device))

    @classmethod
    def from_pipeline(cls, pipe, instructions: list[str], images: torch.Tensor) -> "EditCondition":
        """Encode ``instructions`` and ``images`` (B, 3, H, W) in [-1, 1] as an InstructPix2Pix pipeline
        does: its text encoder, the empty prompt as the negative one, the VAE's mode latent."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_instruct_pix2pix import retrieve_latents

        device = pipe.device
        with torch.no_grad():
            embeds = pipe._encode_prompt(instructions, device, 1, True, [""] * len(instructions))  # [text; neg; neg]
            n = len(instructions)
            latents = retrieve_latents(pipe.vae.encode(images.to(device, pipe.vae.dtype)), sample_mode="argmax")
        return cls(embeds[:n], embeds[n:2 * n], latents)


class UNetEditDenoiser:
    """Adapter over an InstructPix2Pix ``UNet2DConditionModel`` (input channels: latent + image latent).

    ``evaluations`` counts per-sample evaluations (NFE summed over the batch)."""

    conditions = 2  # agsearch.guidance.sampler.sample runs it through sample_edit

    def __init__(self, unet, parameterisation: str = "epsilon"):
        self.unet = unet
        self.parameterisation = parameterisation
        self.evaluations = 0

    def __call__(self, x, t, cond: EditCondition, run_full, run_image, run_none):
        masks = (run_full, run_image, run_none)
        outs = [torch.zeros_like(x) for _ in masks]
        rows = [m.nonzero(as_tuple=True)[0] for m in masks]
        if not sum(len(r) for r in rows):
            return tuple(outs)
        zeros = torch.zeros_like(cond.image_latents)
        images = torch.cat([cond.image_latents[rows[0]], cond.image_latents[rows[1]], zeros[rows[2]]])
        text = torch.cat([cond.prompt_embeds[rows[0]], cond.negative_prompt_embeds[rows[1]],
                          cond.negative_prompt_embeds[rows[2]]])
        x_in = torch.cat([x[r] for r in rows])
        dtype = self.unet.dtype
        self.evaluations += len(x_in)
        out = self.unet(torch.cat([x_in, images], dim=1).to(dtype), t, encoder_hidden_states=text.to(dtype)).sample
        out = out.to(x.dtype)
        lo = 0
        for k, r in enumerate(rows):  # index_put keeps the graph for the search's backward pass
            outs[k] = outs[k].index_put((r,), out[lo:lo + len(r)])
            lo += len(r)
        return tuple(outs)
