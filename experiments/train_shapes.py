"""Train the built-in shapes text-to-image model (a miniature Stable Diffusion) from scratch.

    python experiments/train_shapes.py                 # CPU: see the model card for the time
    python experiments/train_shapes.py --device cuda   # the same run on a GPU

Writes the ``StableDiffusionPipeline`` folder ``agsearch/models/shapes/weights/shapes/`` (``--out``):
``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``, ``scheduler/``, ``model_index.json``,
``training.json`` (the settings, losses and wall times) and ``README.md`` (the model card).

Two stages, both on endless seeded renders of :mod:`agsearch.models.shapes.scenes`'s *training*
captions (held-out combinations never appear in a caption):

1. the ``AutoencoderKL`` (32×32×3 ↔ 8×8×8): L1 + MSE + a small KL term; its ``scaling_factor`` is set
   afterwards to 1 / the latents' standard deviation, as Stable Diffusion's is;
2. the ``UNet2DConditionModel`` and the ``CLIPTextModel`` together, ε-prediction under SD's β
   schedule, the caption replaced by the empty prompt with probability ``--cond-dropout`` (one
   network gives both CFG passes), Min-SNR-γ loss weights (Hang et al., ICCV 2023, arXiv
   2303.09556; faster convergence), AdamW with warm-up and cosine decay; the shipped weights are
   an exponential moving average (EMA). A held-out loss (fixed images, captions, t and noise,
   EMA weights) is logged every ``--log-every`` steps so that the plateau is visible.

The folder is rewritten from the EMA weights every ``--save-every`` steps, and ``--resume``
continues from the last state in ``--work-dir``. ``--init-from FOLDER`` starts a further stage from
a pipeline folder this script wrote (its VAE kept frozen, the UNet and text encoder trained on with a
fresh optimiser and schedule; the folder's ``training.json`` is kept under ``previous_stages``):
that is how a run that had not reached its plateau is trained on.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agsearch.models.shapes import (
    PIPELINE_DIR,
    SCHEDULER_CONFIG,
    build_components,
    scenes,
)


class Tokens:
    """Token ids of captions, cached (the grammar has under 2,000 captions)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, texts, device):
        missing = [t for t in set(texts) if t not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[t] for t in texts]).to(device)


def lr_at(step, total, warmup, floor=0.1):
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def train_vae(vae, args, device, log):
    stream = scenes.SceneStream(seed=args.seed + 1, drop=0.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    held = scenes.to_tensor(scenes.SceneStream(seed=10**6, drop=0.0).batch(256)[1]).to(device)
    start, history = time.time(), []
    vae.train()
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * lr_at(step, args.vae_steps, 50)
        x = scenes.to_tensor(stream.batch(args.vae_batch)[1]).to(device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        # L1 keeps small objects' edges (MSE alone blurs them); the images are mostly background
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            vae.eval()
            with torch.no_grad():
                mse = F.mse_loss(vae.decode(vae.encode(held).latent_dist.mode()).sample.clamp(-1, 1), held).item()
            vae.train()
            psnr = 10 * math.log10(4 / mse)
            history.append(dict(step=step + 1, loss=loss.item(), kl=kl.item(), heldout_psnr=psnr,
                                seconds=round(time.time() - start, 1)))
            log(f"vae step {step + 1}/{args.vae_steps}  loss {loss.item():.5f}  held-out PSNR {psnr:.2f} dB  "
                f"{time.time() - start:.0f}s")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(held).latent_dist.sample() for _ in range(4)])
    scale = 1.0 / latents.std().item()
    return history, scale, time.time() - start


def add_slow_tokenizer_files(tokenizer_dir: Path):
    """vocab.json and merges.txt beside tokenizer.json: transformers 4.x's CLIPTokenizer reads those."""
    from agsearch.diffusers.clip_tokenizer import _tokenizer_dir, clip_vocab_file

    source = Path(_tokenizer_dir(str(clip_vocab_file())))
    for name in ("vocab.json", "merges.txt"):
        (tokenizer_dir / name).write_bytes((source / name).read_bytes())


def load_stage(folder: Path, device):
    """The VAE, text encoder and UNet of a pipeline folder this script wrote, and its training record."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    record_file = folder / "training.json"
    if not record_file.is_file():
        raise SystemExit(f"--init-from {folder}: no training.json there (not a folder this script wrote)")
    previous = json.loads(record_file.read_text("utf-8"))
    vae = AutoencoderKL.from_pretrained(folder / "vae").to(device)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device)
    return vae, text_encoder, unet, previous


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, record: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    add_slow_tokenizer_files(tmp / "tokenizer")
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n", "utf-8")
    if out.exists():
        old = out.with_name(out.name + ".old")
        keep = [p for p in ("README.md",) if (out / p).exists()]
        for p in keep:
            (tmp / p).write_bytes((out / p).read_bytes())
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1.5e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=3200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=PIPELINE_DIR)
    p.add_argument("--work-dir", type=Path, default=Path("runs/train_shapes"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", type=Path, default=None, metavar="FOLDER",
                   help="continue training from this pipeline folder (frozen VAE, fresh optimiser and schedule)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(args.work_dir / "log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    vae, text_encoder, tokenizer, unet, _ = build_components()
    vae, text_encoder, unet = vae.to(device), text_encoder.to(device), unet.to(device)
    state_file = args.work_dir / "state.pt"
    record = dict(command="python experiments/train_shapes.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  torch=torch.__version__, device=str(device),
                  parameters=dict(unet=sum(p.numel() for p in unet.parameters()),
                                  text_encoder=sum(p.numel() for p in text_encoder.parameters()),
                                  vae=sum(p.numel() for p in vae.parameters())))
    start_step = 0
    if args.resume and state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=True)
        vae.load_state_dict(state["vae"])
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        record.update(json.loads(state["record"]))
        start_step = state["step"]
        vae.eval().requires_grad_(False)
        log(f"resumed at step {start_step}")
    elif args.init_from is not None:
        vae, text_encoder, unet, previous = load_stage(args.init_from, device)
        record["vae"] = previous["vae"]
        record["previous_stages"] = previous.pop("previous_stages", []) + [previous]
        vae.eval().requires_grad_(False)
        log(f"initialised from {args.init_from} (after {previous['steps_done']} steps there)")
    else:
        vae_history, scale, vae_seconds = train_vae(vae, args, device, log)
        vae.register_to_config(scaling_factor=scale)
        vae.save_pretrained(args.work_dir / "vae")  # to look at before the long stage ends
        record["vae"] = dict(history=vae_history, seconds=round(vae_seconds, 1), scaling_factor=scale)
        log(f"vae done in {vae_seconds:.0f}s, scaling factor {scale:.4f}")
    scale = vae.config.scaling_factor

    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight_of_t = torch.clamp(snr, max=args.min_snr_gamma) / snr  # Min-SNR-γ for ε-prediction

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    if start_step:
        opt.load_state_dict(state["opt"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
    tokens = Tokens(tokenizer)
    stream = scenes.SceneStream(seed=args.seed, drop=args.cond_dropout)
    for _ in range(start_step):  # the same data order as an uninterrupted run
        stream.batch(args.batch_size)

    # a fixed held-out batch: held-out captions, fixed t and noise
    g = torch.Generator().manual_seed(12345)
    held_caps = scenes.eval_captions(256, seed=99, split="train") + scenes.eval_captions(256, seed=99, split="heldout")
    rng = np.random.default_rng(99)
    held_x = scenes.to_tensor(scenes.render_batch([scenes.sample_scene(c, rng) for c in held_caps])).to(device)
    held_ids = tokens([c.text for c in held_caps], device)
    held_t = torch.randint(0, 1000, (len(held_caps),), generator=g).to(device)
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    held_noise = torch.randn(len(held_caps), *latent_shape, generator=g).to(device)
    with torch.no_grad():
        held_lat = vae.encode(held_x).latent_dist.mode() * scale
        held_xt = noise_sched.add_noise(held_lat, held_noise, held_t)

    def held_loss(u, te):
        with torch.no_grad():
            emb = te(held_ids)[0]
            eps = u(held_xt, held_t, encoder_hidden_states=emb).sample
            per = (eps - held_noise).pow(2).flatten(1).mean(1)
            return per[:256].mean().item(), per[256:].mean().item()

    history = record.setdefault("unet_history", [])
    start = time.time() - record.get("unet_seconds", 0.0)
    unet.train()
    text_encoder.train()
    for step in range(start_step, args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_at(step, args.steps, args.warmup)
        texts, images = stream.batch(args.batch_size)
        x = scenes.to_tensor(images).to(device)
        with torch.no_grad():
            lat = vae.encode(x).latent_dist.sample() * scale
        noise = torch.randn_like(lat)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(lat),), device=device)
        xt = noise_sched.add_noise(lat, noise, t)
        emb = text_encoder(tokens(texts, device))[0]
        eps = unet(xt, t, encoder_hidden_states=emb).sample
        loss = (weight_of_t[t] * (eps - noise).pow(2).flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            train_l, held_l = held_loss(ema_unet, ema_text)
            secs = time.time() - start
            history.append(dict(step=done, loss=round(loss.item(), 5), ema_loss_train_captions=round(train_l, 5),
                                ema_loss_heldout_captions=round(held_l, 5), lr=opt.param_groups[0]["lr"],
                                seconds=round(secs, 1)))
            log(f"step {done}/{args.steps}  loss {loss.item():.4f}  EMA held-out-noise loss: train captions "
                f"{train_l:.4f}, held-out captions {held_l:.4f}  {secs / 60:.1f} min")
        if done % args.save_every == 0 or done == args.steps:
            record["unet_seconds"] = round(time.time() - start, 1)
            record["steps_done"] = done
            save_pipeline(args.out, vae, ema_text, tokenizer, ema_unet, record)
            tmp = state_file.with_suffix(".tmp")
            torch.save(dict(vae=vae.state_dict(), scaling_factor=scale, unet=unet.state_dict(),
                            text_encoder=text_encoder.state_dict(), ema_unet=ema_unet.state_dict(),
                            ema_text=ema_text.state_dict(), opt=opt.state_dict(), step=done,
                            record=json.dumps(record)), tmp)
            os.replace(tmp, state_file)
            log(f"saved {args.out} at step {done}")


if __name__ == "__main__":
    main()
