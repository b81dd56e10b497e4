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


def tiny_instruct_pix2pix(seed: int = 0):
    """A tiny StableDiffusionInstructPix2PixPipeline: the UNet takes the noisy latent and the input
    image's latent on channels (8 in, 4 out), Euler scheduler (the pipeline's usual one)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=8, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2)
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1)
    return _quiet(StableDiffusionInstructPix2PixPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_config()), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False))


def untrained_shapes_editor():
    """The shapes editor before training: a ``StableDiffusionInstructPix2PixPipeline`` of the shipped
    shapes pipeline's VAE, text encoder and tokenizer and :func:`agsearch.models.shapes.edit_unet` of
    its UNet (the image channels zero: it draws the instruction as a caption and ignores the image).
    Real sizes (8×8×8 latents, 32×32 images, the scorer reads them) for tests of the editing
    evaluation and search without the trained editor."""
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

    from agsearch.models.shapes import SCHEDULER_CONFIG, edit_unet, load_pipeline

    base = load_pipeline()
    return _quiet(StableDiffusionInstructPix2PixPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=edit_unet(base.unet).eval(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False))


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


def sdxl_sized(seed: int = 0, device="cpu", dtype=torch.float32):
    """A StableDiffusionXLPipeline whose UNet (2.6B parameters) and VAE have SDXL-base-1.0's
    architectures, with random weights, for timing the denoising loop.

    The UNet and VAE configs are those of ``stable-diffusion-xl-base-1.0``'s ``unet/`` and
    ``vae/`` folders. The two CLIP text encoders keep SDXL's widths (768 and 1280, projection
    1280: the UNet's 2048-wide cross-attention and its 2816-wide text-time embedding) but have one
    layer each: text encoding runs once per call, outside the loop a policy shortens. The real
    CLIP tokenizer is built offline; Euler scheduler as SDXL's.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)  # 2816 = 1280 + 6·256
        vae = AutoencoderKL(
            sample_size=1024, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.13025, force_upcast=True)
        clip = dict(num_hidden_layers=1, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        text_encoder = CLIPTextModel(_clip_config(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                  projection_dim=768, **clip))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280, **clip))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler, image_encoder=None, feature_extractor=None)
    return _quiet(pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype))


def wan_1_3b_sized(seed: int = 0, device="cpu", dtype=torch.float32):
    """A WanPipeline whose transformer (1.4B parameters) and VAE have Wan 2.1 T2V-1.3B's
    architectures, with random weights, for timing the denoising loop.

    The transformer and VAE configs are those of ``Wan2.1-T2V-1.3B-Diffusers``'s
    ``transformer/`` and ``vae/`` folders (30 layers, 12 heads of 128, FFN 8960, text width 4096).
    The UMT5 text encoder keeps the 4096 width but has one layer and a tokenizer trained in code:
    text encoding runs once per call, outside the loop a policy shortens. UniPC on flow sigmas,
    flow shift 3, as Wan 2.1's.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    with torch.device(device):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
        vae = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               temperal_downsample=[False, True, True])
        text_encoder = UMT5EncoderModel(_t5_config(len(tokenizer), umt5=True, d_model=4096, d_kv=64, num_heads=2,
                                                   d_ff=64, num_layers=1))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler,
                       transformer=transformer.eval())
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


# Transformer (DiT/MMDiT) pipelines with T5, Gemma-2 and Qwen2.5-VL text encoders. Their tokenizers
# are the pipelines' own transformers classes (same normaliser, pre-tokeniser and special tokens)
# with a small vocabulary trained in code on the strings below (`train_new_from_iterator`, i.e. a
# `tokenizers` BPE/Unigram trainer), so nothing is fetched from the hub.
_TOKENIZER_CORPUS = (
    "a red circle", "a blue square", "a green triangle on a white background", "blurry", "low quality",
    "bad quality, low resolution, jpeg artifacts", "a photo of a cat", "a photo of a dog sitting on the grass",
    "a painting of a squirrel eating a burger", "an astronaut riding a horse on the moon",
    "a bowl of fruit on a wooden table", "a city street at night, neon lights, rain",
    "a mountain lake at sunrise, mist over the water", "a portrait of an old man, studio lighting",
    "two people walking on a beach at sunset", "a small house in a snowy forest", "a bird flying over the sea",
    "a bicycle leaning against a yellow wall", "a cup of coffee and a book", "a robot in a field of flowers",
    "a close-up of a butterfly on a leaf", "an empty room with a large window", "a car on a desert road",
    "a boat on a calm river", "watercolor, oil painting, pencil sketch, digital art, 3d render",
    "high quality, detailed, sharp focus, 4k, 8k", "ugly, deformed, noisy, overexposed, text, watermark",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background:",
    "system", "user", "assistant", "The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 , . : ; ! ? ' \" ( ) - _ / \\",
)


def _trained_tokenizer(tokenizer, vocab_size: int, **kwargs):
    """``tokenizer``'s class and tokenisation pipeline with a vocabulary of at most ``vocab_size``
    trained on :data:`_TOKENIZER_CORPUS` (deterministic, ~0.1 s)."""
    return tokenizer.train_new_from_iterator([list(_TOKENIZER_CORPUS)], vocab_size=vocab_size,
                                             show_progress=False, **kwargs)


def t5_tokenizer():
    """A T5 tokenizer (Unigram, ``<pad>``=0, ``</s>``=1 appended, ``<unk>``=2), trained in code;
    UMT5 (Wan) uses the same class. No ``<extra_id_*>`` sentinels: no pipeline here uses them."""
    from transformers import T5TokenizerFast

    return _trained_tokenizer(T5TokenizerFast(extra_ids=0), vocab_size=256)


def _t5_config(vocab_size: int, umt5: bool = False, **overrides):
    """A 2-layer T5 v1.1 encoder config (gated GELU, as in PixArt-Σ's, Flux's and Wan's T5s), d_model 32."""
    from transformers import T5Config, UMT5Config

    config = dict(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    config.update(overrides)
    return UMT5Config(**config) if umt5 else T5Config(**config)


def tiny_pixart_sigma(seed: int = 0):
    """A tiny PixArtSigmaPipeline (PixArt-Σ, https://arxiv.org/abs/2403.04692): DiT with cross-attention
    to T5, learned-σ output (8 channels, the pipeline drops the variance half), DPM-Solver++(2M).

    Guidance: ``guidance_scale > 1`` (default 4.5). CFG is one batched call per step on
    ``pipe.transformer``, rows ``[uncond; cond]`` (2·B rows), ``chunk(2)`` then
    ``uncond + w·(cond − uncond)``; one ``scheduler.step`` per step.
    Call with ``use_resolution_binning=False`` (the tiny ``sample_size`` 8 has no aspect-ratio bins:
    ``ValueError: Invalid sample size`` otherwise), ``clean_caption=False`` (``True``, the default,
    needs bs4 and only warns without it) and a small ``max_sequence_length`` (default 300); height
    and width multiples of 8 (16×16 → 8×8 latents, 4×4 patches).
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(_t5_config(len(tokenizer)))
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    # PixArt-Σ's released scheduler: DPM-Solver++ 2M on the linear β schedule (ε prediction).
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return _quiet(PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=_tiny_vae().eval(),
                                      transformer=transformer.eval(), scheduler=scheduler))


def tiny_sana(seed: int = 0):
    """A tiny SanaPipeline (Sana, https://arxiv.org/abs/2410.10629): linear-attention DiT, Gemma-2
    text encoder, deep-compression autoencoder (AutoencoderDC, 2× here), flow matching (Euler).

    Guidance: ``guidance_scale > 1`` (default 4.5). CFG is one batched call per step on
    ``pipe.transformer``, rows ``[uncond; cond]`` (2·B rows), ``chunk(2)`` then
    ``uncond + w·(cond − uncond)``; one ``scheduler.step`` per step.
    Call with ``use_resolution_binning=False`` (``sample_size`` 8 has no aspect-ratio bins:
    ``ValueError: Invalid sample size`` otherwise), ``complex_human_instruction=None`` (else the
    default 8-line instruction, ~650 tokens with this tokenizer, is prepended to the prompt, not
    to the negative) and a small ``max_sequence_length`` (default 300); height and width
    multiples of 32 (32×32 → 16×16 latents, 256 tokens).
    The released checkpoints ship DPMSolverMultistepScheduler with flow sigmas (``flow_shift=3``);
    this uses FlowMatchEulerDiscreteScheduler with the same shift.
    """
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    torch.manual_seed(seed)
    tokenizer = _trained_tokenizer(GemmaTokenizerFast(add_bos_token=True), vocab_size=256)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation="eager"))
    transformer = SanaTransformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
        attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8,
        caption_channels=8)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    return _quiet(SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                               transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)))


def _tiny_wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).eval()


def _wan_pipeline(seed: int, two_experts: bool):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(_t5_config(len(tokenizer), umt5=True))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # 8× spatial, 4× temporal
    transformer = _tiny_wan_transformer()
    transformer_2 = _tiny_wan_transformer() if two_experts else None
    # The released Wan 2.1/2.2 T2V schedulers: UniPC (bh2, order 2) on flow sigmas.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return _quiet(WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                              scheduler=scheduler, transformer=transformer, transformer_2=transformer_2,
                              boundary_ratio=0.875 if two_experts else None))


def tiny_wan(seed: int = 0):
    """A tiny WanPipeline, Wan 2.1 text-to-video (https://arxiv.org/abs/2503.20314): 3D DiT with
    cross-attention to UMT5, causal 3D VAE (8× spatial, 4× temporal), UniPC on flow sigmas.

    Guidance: ``guidance_scale > 1`` (default 5.0). CFG is two calls per step on
    ``pipe.transformer``, each with B rows: cond first, then uncond (the negative prompt, "" by
    default), ``uncond + w·(cond − uncond)``; one ``scheduler.step`` per step.
    ``num_frames`` must be 4k+1 (5 → 2 latent frames); height and width multiples of 16
    (32×32 → 4×4 latents, 2×2 patches); pass a small ``max_sequence_length`` (default 512).
    """
    return _wan_pipeline(seed, two_experts=False)


def tiny_wan22(seed: int = 0):
    """A tiny two-expert WanPipeline, as Wan 2.2 T2V-A14B: ``pipe.transformer`` (high-noise expert)
    denoises the steps with ``t >= boundary_ratio · 1000`` (``boundary_ratio`` 0.875, in
    ``pipe.config``), ``pipe.transformer_2`` (low-noise expert) the rest.

    Guidance: ``guidance_scale > 1`` turns CFG on for every step; the weight is ``guidance_scale``
    on the high-noise steps and ``guidance_scale_2`` (defaults to ``guidance_scale``) on the
    low-noise ones, so ``guidance_scale_2=1`` still runs the uncond call, and
    ``guidance_scale_2 > 1`` with ``guidance_scale <= 1`` gives no CFG at all. CFG is two calls per
    step on the step's expert, each with B rows: cond first, then uncond; one ``scheduler.step``
    per step. With 3 steps (flow_shift 3: t = 999, 857, 600) the first step runs ``transformer``,
    the other two ``transformer_2``. Call as :func:`tiny_wan`.
    """
    return _wan_pipeline(seed, two_experts=True)


def tiny_flux(seed: int = 0):
    """A tiny FluxPipeline (FLUX.1-dev's architecture, described in https://arxiv.org/abs/2506.15742):
    MMDiT with double- and single-stream blocks on 2×2-packed latents, CLIP (pooled) + T5 encoders,
    guidance-distilled (``guidance_scale`` is an embedded input, not CFG), flow matching (Euler,
    resolution-dependent shift).

    Guidance (true CFG): ``true_cfg_scale > 1`` *and* a ``negative_prompt`` (or negative embeds);
    ``guidance_scale`` alone never adds a call. True CFG is two calls per step on
    ``pipe.transformer``, each with B rows: cond first, then uncond,
    ``uncond + s·(cond − uncond)``; one ``scheduler.step`` per step. Height and width multiples
    of 4 (16×16 → 8×8 latents → 16 tokens); pass a small ``max_sequence_length`` (default 512).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer_2 = t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = T5EncoderModel(_t5_config(len(tokenizer_2)))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True)  # in_channels 16 = 4 latent channels × 2×2 packing
    vae = _tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    # FLUX.1's scheduler: shift μ interpolated in the image sequence length (256 → 0.5, 4096 → 1.15).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return _quiet(FluxPipeline(
        scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, transformer=transformer.eval(),
        image_encoder=None, feature_extractor=None))


# Qwen2.5-VL's chat and vision special tokens; the vision ones are only named in the config.
_QWEN_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                        "<|video_pad|>"]


def qwen2_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with the ChatML special tokens, trained in code. Every word
    of Qwen-Image's prompt template is one token, as in the real tokenizer, so the template's
    system prefix is 34 tokens: the ``prompt_template_encode_start_idx`` that the pipeline drops."""
    from transformers import Qwen2TokenizerFast

    return _trained_tokenizer(Qwen2TokenizerFast(), vocab_size=1024, new_special_tokens=_QWEN_SPECIAL_TOKENS)


def tiny_qwen_image(seed: int = 0):
    """A tiny QwenImagePipeline (Qwen-Image, https://arxiv.org/abs/2508.02324): MMDiT on 2×2-packed
    latents, conditioned on the last hidden states of a Qwen2.5-VL model fed a chat template (its
    34-token system prefix dropped), Wan-style causal VAE, flow matching (Euler, exponential shift).

    Guidance (true CFG): ``true_cfg_scale > 1`` *and* a ``negative_prompt`` (or negative embeds);
    ``true_cfg_scale`` defaults to 4.0, so a negative prompt alone turns it on. ``guidance_scale``
    is ignored (with a warning: not guidance-distilled). True CFG is two calls per step on
    ``pipe.transformer``, each with B rows: cond first, then uncond, then
    ``comb = uncond + s·(cond − uncond)`` rescaled to the cond prediction's norm per token
    (``comb · ‖cond‖/‖comb‖``); one ``scheduler.step`` per step. The VAE downsamples 4× here
    (two stages), so height and width are multiples of 8 (32×32 → 8×8 latents → 16 tokens).
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = qwen2_tokenizer()
    ids = dict(zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
                   tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                    "<|vision_end|>"])))
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[1, 1, 2]),
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        **ids)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))  # in 16 = 4 channels × 2×2
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    # Qwen-Image's scheduler: exponential time shift, μ from 0.5 (256 tokens) to 0.9 (8192 tokens).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return _quiet(QwenImagePipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                                    tokenizer=tokenizer, transformer=transformer.eval()))
