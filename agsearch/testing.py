"""Diffusers text-to-image pipelines built in code, with random weights and nothing downloaded.

Used by the tests, the speed benchmark (``experiments/pipeline_speed.py``) and the README. The
tiny components follow diffusers' own pipeline tests (``UNet2DConditionModel(block_out_channels=
(4, 8), ...)``, a tiny ``AutoencoderKL``, ``CLIPTextModel(CLIPTextConfig(...))``,
``SD3Transformer2DModel``); :func:`sd15_components` uses Stable Diffusion 1.5's real UNet, VAE
and CLIP-text architectures (860M + 84M + 123M parameters) with random weights, for timing.

The tokenizer is a real CLIP BPE tokenizer (49408 tokens, the one SD 1.5/XL/3 use), built offline
from the vocabulary file that open-clip-torch ships (``bpe_simple_vocab_16e6.txt.gz``); the file
is located without importing ``open_clip``. Pipelines can also be called tokenizer-free with
``prompt_embeds`` (see :func:`random_prompt_embeds`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agsearch.diffusers.clip_tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer


def _clip_config(**overrides):
    from transformers import CLIPTextConfig

    config = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=CLIP_VOCAB_SIZE,
                  hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                  num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    config.update(overrides)
    return CLIPTextConfig(**config)


def _tiny_vae(**overrides):
    from diffusers import AutoencoderKL

    config = dict(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    config.update(overrides)
    return AutoencoderKL(**config)


def tiny_sd(seed: int = 0, prediction_type: str = "epsilon", tokenizer=True):
    """A tiny StableDiffusionPipeline (32×32 latents → 64×64 images by default), DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2)
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_clip_config())
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return _quiet(StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer() if tokenizer else None, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False))


def tiny_sdxl(seed: int = 0):
    """A tiny StableDiffusionXLPipeline (two CLIP text encoders, text-time conditioning), Euler."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)  # 80 = 32 + 6·8
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    tokenizer = clip_tokenizer()
    return _quiet(StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_config()), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer_2=tokenizer, unet=unet,
        scheduler=scheduler, image_encoder=None, feature_extractor=None))


def tiny_sd3(seed: int = 0):
    """A tiny StableDiffusion3Pipeline (MMDiT, flow matching), two CLIP encoders and no T5."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4)
    vae = _tiny_vae(block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                    up_block_types=("UpDecoderBlock2D",), norm_num_groups=1, use_quant_conv=False,
                    use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    tokenizer = clip_tokenizer()
    return _quiet(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=CLIPTextModelWithProjection(_clip_config()), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None))


def sd15(seed: int = 0, tokenizer: bool = False, device="cpu", dtype=torch.float32):
    """Stable Diffusion 1.5's architecture (UNet, VAE, CLIP ViT-L/14 text) with random weights.

    The configs are those of ``stable-diffusion-v1-5``'s ``unet/``, ``vae/`` and
    ``text_encoder/`` folders; the scheduler is DDIM with SD 1.5's β schedule. Built directly on
    ``device`` (random init of 1B parameters is slow on a CPU). Without ``tokenizer`` the pipeline
    must be called with ``prompt_embeds``.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_clip_config(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer() if tokenizer else None, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _quiet(pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype))


def random_prompt_embeds(pipe, batch: int, seed: int = 0) -> torch.Tensor:
    """Text embeddings (batch, 77, D) of random token ids through the pipeline's own text
    encoder: a tokenizer-free way to call a (SD 1.x/2.x) pipeline with ``prompt_embeds``."""
    encoder = pipe.text_encoder
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, encoder.config.vocab_size - 2, (batch, 77), generator=g)
    ids[:, 0], ids[:, -1] = encoder.config.bos_token_id, encoder.config.eos_token_id
    with torch.no_grad():
        return encoder(ids.to(encoder.device))[0]


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# A tiny open-clip CLIP (ViT image tower, CLIP BPE text tower), for the CLIP-score tests.
TINY_CLIP_NAME = "agsearch-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_weights(folder: str | Path, seed: int = 0) -> Path:
    """Register the tiny CLIP config with open_clip (as ``TINY_CLIP_NAME``) and save random weights
    for it as ``folder/tiny-clip.safetensors``: what ``ClipScorer.load`` reads for a real model."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG), "utf-8")
    open_clip.add_model_config(folder / f"{TINY_CLIP_NAME}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "tiny-clip.safetensors")
    return folder / "tiny-clip.safetensors"
