"""Train the built-in shapes image editor (an InstructPix2Pix at the shapes model's scale) from the shapes model.

    python experiments/train_shapes_edit.py                 # CPU: see the model card for the time
    python experiments/train_shapes_edit.py --device cuda   # the same run on a GPU

Writes the ``StableDiffusionInstructPix2PixPipeline`` folder ``runs/shapes_edit/`` (``--out``; copied to
``agsearch/models/shapes/weights/shapes_edit/`` it is ``builtin:shapes_edit``): ``vae/``,
``text_encoder/``, ``tokenizer/``, ``unet/``, ``scheduler/``, ``model_index.json``, ``training.json``
(the settings, losses and wall times) and ``README.md`` (the model card, written from training.json).

The recipe is InstructPix2Pix's (Brooks et al., CVPR 2023, arXiv 2211.09800), on endless seeded edit
triples of :mod:`agsearch.models.shapes.edits` from the *training* instructions only:

- the shapes pipeline's VAE, text encoder and tokenizer (``--base``, the shipped model), frozen;
- the UNet: the shapes UNet's config with ``2 * LATENT_CHANNELS`` input channels, initialised from
  the shapes UNet with the new input channels of ``conv_in`` zero, so that the initial editor is the
  text-to-image model and ignores the image, as InstructPix2Pix starts from Stable Diffusion;
- its input in the diffusers pipeline's convention, ``[noisy latents, image latents]`` on channels:
  the noisy latents are Stable Diffusion's (a posterior sample times the VAE's scaling factor), the
  image latents are what ``prepare_image_latents`` gives (the posterior's mode,
  ``sample_mode="argmax"``, *not* scaled), and zeros for the unconditional image;
- condition dropout: the instruction alone, the image alone, or both dropped, each with probability
  ``--drop-text`` / ``--drop-image`` / ``--drop-both`` (5% each in the paper), so one network gives
  the three passes of two-condition guidance;
- ε-prediction under SD's β schedule, Min-SNR-γ loss weights (Hang et al., ICCV 2023, arXiv
  2303.09556), AdamW with warm-up and cosine decay; the shipped UNet is an exponential moving
  average (EMA) of the weights. Every ``--log-every`` steps, the EMA UNet's loss on a fixed batch
  (256 training and 256 held-out instructions, fixed t and noise) is logged, and the held-out loss
  with the image dropped: the gap between the two is how much the editor uses its input image.

The folder is rewritten from the EMA weights every ``--save-every`` steps, and ``--resume``
continues from the last state in ``--work-dir`` (the same data order as an uninterrupted run).
``--init-from FOLDER`` starts a further stage from an editor folder this script wrote: its UNet
trained on (EMA included) with a fresh optimiser and schedule, on the data stream of ``--seed``; the
folder's ``training.json`` is kept under ``previous_stages`` and the model card lists every stage.
That is how a run that had not reached its plateau is trained on.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agsearch.models.shapes import LATENT_CHANNELS, PIPELINE_DIR, SCHEDULER_CONFIG, edit_unet, edits, scenes

HELD_PER_SPLIT = 256  # edits of each split in the fixed held-out batch


def lr_at(step, total, warmup, floor=0.1):
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


class Embeddings:
    """The frozen text encoder's hidden states per instruction, cached (the grammar has 309 texts with "")."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder, self.cache = tokenizer, text_encoder, {}

    @torch.no_grad()
    def __call__(self, texts):
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            states = self.text_encoder(ids.to(self.text_encoder.device))[0]  # (B, L, D)
            self.cache.update(zip(missing, states))
        return torch.stack([self.cache[t] for t in texts])


def latents(vae, sources, targets, image_dropped, device, scale, sample=True):
    """The UNet's two latents of a batch, each (B, 8, 8, 8): the target's, a posterior sample (its mode
    when not ``sample``) times ``scale``, to be noised; the source image's, the posterior's mode
    unscaled (diffusers' ``prepare_image_latents``), zero where ``image_dropped``."""
    with torch.no_grad():
        posterior = vae.encode(scenes.to_tensor(targets).to(device)).latent_dist
        target = (posterior.sample() if sample else posterior.mode()) * scale
        image = vae.encode(scenes.to_tensor(sources).to(device)).latent_dist.mode()
    keep = torch.as_tensor(~image_dropped, device=device).view(-1, 1, 1, 1)
    return target, image * keep


def load_base(folder: Path, device):
    """The frozen VAE, text encoder and tokenizer and the UNet of a shapes ``StableDiffusionPipeline`` folder."""
    from diffusers import StableDiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"--base {folder}: not a pipeline folder (no model_index.json); run "
                         "experiments/train_shapes.py")
    base = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    vae = base.vae.to(device).eval().requires_grad_(False)
    text_encoder = base.text_encoder.to(device).eval().requires_grad_(False)
    return vae, text_encoder, base.tokenizer, base.unet.to(device)


def load_stage(folder: Path, device):
    """The UNet of an editor folder this script wrote, and its training record."""
    from diffusers import UNet2DConditionModel

    record_file = folder / "training.json"
    if not record_file.is_file():
        raise SystemExit(f"--init-from {folder}: no training.json there (not a folder this script wrote)")
    previous = json.loads(record_file.read_text("utf-8"))
    return UNet2DConditionModel.from_pretrained(folder / "unet").to(device), previous


def save_pipeline(out: Path, base: Path, vae, text_encoder, tokenizer, unet, record: dict):
    """The editor's folder, written beside and then swapped in (a reader never sees half of it)."""
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # transformers 4.x's CLIPTokenizer reads these
        if not (tmp / "tokenizer" / name).exists() and (base / "tokenizer" / name).exists():
            shutil.copyfile(base / "tokenizer" / name, tmp / "tokenizer" / name)
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n", "utf-8")
    (tmp / "README.md").write_text(model_card(record, tmp), "utf-8")
    if out.exists():
        old = out.with_name(out.name + ".old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)


def model_card(record: dict, folder: Path) -> str:
    """The editor's README.md, every figure from ``record`` (training.json)."""
    a, p = record["args"], record["parameters"]
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    n_train, n_held = len(edits.instructions("train")), len(edits.instructions("heldout"))
    base = "the shipped shapes model" if Path(a["base"]) == PIPELINE_DIR else f"`{a['base']}`"
    lines = [
        "# agsearch shapes_edit: a miniature InstructPix2Pix on the shapes scenes",
        "",
        "A diffusers `StableDiffusionInstructPix2PixPipeline` that edits the 32×32 scenes of "
        "`agsearch/models/shapes/scenes.py` by instruction (`agsearch/models/shapes/edits.py`: recolour, move, "
        f"add, remove). Some combinations never appear in a training instruction: {n_train} training "
        f"instructions, {n_held} held out (`edits.HELD_OUT_MOVES`, `HELD_OUT_REMOVALS`, `scenes.HELD_OUT_PAIRS`).",
        "",
        "```python",
        "from PIL import Image",
        "from agsearch.models.shapes import edits, load_edit_pipeline, scenes",
        "pipe = load_edit_pipeline()   # = StableDiffusionInstructPix2PixPipeline.from_pretrained(<this folder>)",
        "edit = edits.eval_edits(1, seed=0)[0]   # (source scene, instruction, target scene)",
        "image = pipe(edit.text, image=Image.fromarray(scenes.render(edit.source)), guidance_scale=4,",
        "             image_guidance_scale=1.5).images[0]",
        "```",
        "",
        "On the command line the folder is `builtin:shapes_edit` once it is copied to "
        "`agsearch/models/shapes/weights/shapes_edit/`.",
        "",
        "## Components",
        "",
        "| component | architecture | parameters |",
        "|---|---|---:|",
        f"| `vae` | the shapes model's `AutoencoderKL` (3×32×32 ↔ {LATENT_CHANNELS}×8×8), frozen | {p['vae']:,} |",
        f"| `text_encoder` | the shapes model's `CLIPTextModel`, frozen | {p['text_encoder']:,} |",
        "| `tokenizer` | the shapes model's CLIP BPE tokenizer | - |",
        f"| `unet` | the shapes `UNet2DConditionModel` with {2 * LATENT_CHANNELS} input channels (noisy latent, "
        f"then the input image's unscaled mode latent), initialised from it with the new `conv_in` channels zero | "
        f"{p['unet']:,} |",
        "| `scheduler` | the shapes model's DDIM config (SD's β schedule, trailing spacing) | - |",
        "",
        f"Folder size: {size:.1f} MiB.",
        "",
        "## Training",
        "",
    ]
    stages, offset, rows = [*record.get("previous_stages", []), record], 0, []
    for i, stage in enumerate(stages, 1):
        a, done, minutes = stage["args"], stage.get("steps_done", 0), stage.get("unet_seconds", 0.0) / 60
        where = "a 2-core CPU (shared with other jobs at times)" if stage["device"] == "cpu" else stage["device"]
        start = (f"from {base}" if i == 1 else f"from stage {i - 1}'s EMA weights (`--init-from`), a fresh optimiser "
                 "and schedule")
        lines.append(
            f"{i}. `{stage['command'].strip()}` (seed {a['seed']}, torch {stage['torch']}, {stage['device']}): "
            f"{done} steps of batch {a['batch_size']} {start}, AdamW lr {a['lr']:g} (warm-up {a['warmup']}, cosine to "
            f"10%), Min-SNR-γ {a['min_snr_gamma']:g}, EMA {a['ema']:g}; instruction dropped with probability "
            f"{a['drop_text']:g}, image {a['drop_image']:g}, both {a['drop_both']:g}; {minutes:.1f} min on {where}.")
        rows += [(offset + h["step"], i, h) for h in stage.get("unet_history", [])]
        offset += done
    if len(stages) > 1:
        lines += ["", "To train it again from nothing, run the stages in this order and give each `--init-from` the "
                  "previous stage's `--out` folder (" + ", ".join(
                      f"stage {i}: `{s['args']['out']}`" for i, s in enumerate(stages[:-1], 1)) + "); a stage's "
                  "command above may name the shipped folder, which held the previous stage when it ran."]
    lines += [
        "",
        f"Loss of the EMA UNet on a fixed batch ({HELD_PER_SPLIT} training and {HELD_PER_SPLIT} held-out "
        "instructions, fixed t and noise; unweighted ε-MSE), and on the held-out instructions with the image "
        "dropped (the gap is what the editor takes from its input image); steps counted over all stages, "
        "minutes within each:",
        "",
        "| step | stage | minutes | training instructions | held-out instructions | held-out, image dropped |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for step, i, h in rows:
        lines.append(f"| {step} | {i} | {h['seconds'] / 60:.1f} | {h['ema_loss_train_instructions']:.4f} | "
                     f"{h['ema_loss_heldout_instructions']:.4f} | {h['ema_loss_heldout_no_image']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", type=Path, default=PIPELINE_DIR, help="the shapes StableDiffusionPipeline folder")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)  # from trained weights: half train_shapes.py's first stage
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--drop-text", type=float, default=0.05)
    p.add_argument("--drop-image", type=float, default=0.05)
    p.add_argument("--drop-both", type=float, default=0.05)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("runs/shapes_edit"))
    p.add_argument("--work-dir", type=Path, default=Path("runs/train_shapes_edit"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", type=Path, default=None, metavar="FOLDER",
                   help="an editor folder this script wrote: train its UNet on (a further stage)")
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
    vae, text_encoder, tokenizer, base_unet = load_base(args.base, device)
    if base_unet.config.in_channels != LATENT_CHANNELS:
        raise SystemExit(f"--base {args.base}: its UNet takes {base_unet.config.in_channels} channels, expected "
                         f"{LATENT_CHANNELS} (a text-to-image shapes UNet)")
    unet, previous = edit_unet(base_unet), None
    del base_unet
    if args.init_from is not None and not (args.resume and (args.work_dir / "state.pt").exists()):
        unet, previous = load_stage(args.init_from, device)
        log(f"initialised from {args.init_from} (after {previous['steps_done']} steps there)")
    scale = vae.config.scaling_factor
    state_file = args.work_dir / "state.pt"
    record = dict(command="python experiments/train_shapes_edit.py "
                  + " ".join(argv if argv is not None else sys.argv[1:]),
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  torch=torch.__version__, device=str(device),
                  parameters=dict(unet=sum(p.numel() for p in unet.parameters()),
                                  text_encoder=sum(p.numel() for p in text_encoder.parameters()),
                                  vae=sum(p.numel() for p in vae.parameters())))
    if previous is not None:
        record["previous_stages"] = previous.pop("previous_stages", []) + [previous]

    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight_of_t = torch.clamp(snr, max=args.min_snr_gamma) / snr  # Min-SNR-γ for ε-prediction

    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    start_step = 0
    if args.resume and state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema_unet.load_state_dict(state["ema_unet"])
        opt.load_state_dict(state["opt"])
        record.update(json.loads(state["record"]))
        start_step = state["step"]
        log(f"resumed at step {start_step}")
    embed = Embeddings(tokenizer, text_encoder)
    stream = edits.EditStream(seed=args.seed, drop_text=args.drop_text, drop_image=args.drop_image,
                              drop_both=args.drop_both)
    for _ in range(start_step):  # the same data order as an uninterrupted run
        stream.batch(args.batch_size)

    # a fixed held-out batch: training and held-out instructions, no dropout, fixed t and noise
    held = edits.eval_edits(HELD_PER_SPLIT, seed=99, split="train") + edits.eval_edits(HELD_PER_SPLIT, seed=99)
    held_lat, held_img = latents(vae, scenes.render_batch([e.source for e in held]),
                                 scenes.render_batch([e.target for e in held]), np.zeros(len(held), bool), device,
                                 scale, sample=False)
    held_emb = embed([e.text for e in held])
    g = torch.Generator().manual_seed(12345)
    held_t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(held),), generator=g).to(device)
    held_noise = torch.randn(held_lat.shape, generator=g).to(device)
    held_xt = noise_sched.add_noise(held_lat, held_noise, held_t)

    @torch.no_grad()
    def held_loss(u):
        """The unweighted ε-MSE on the fixed batch: training instructions, held-out, held-out without the image."""
        def per_sample(image):
            eps = u(torch.cat([held_xt, image], 1), held_t, encoder_hidden_states=held_emb).sample
            return (eps - held_noise).pow(2).flatten(1).mean(1)

        n = HELD_PER_SPLIT
        with_image, blind = per_sample(held_img), per_sample(torch.zeros_like(held_img))
        return with_image[:n].mean().item(), with_image[n:].mean().item(), blind[n:].mean().item()

    history = record.setdefault("unet_history", [])
    start = time.time() - record.get("unet_seconds", 0.0)
    unet.train()
    for step in range(start_step, args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_at(step, args.steps, args.warmup)
        texts, sources, targets, image_dropped = stream.batch(args.batch_size)
        lat, image = latents(vae, sources, targets, image_dropped, device, scale)
        noise = torch.randn_like(lat)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(lat),), device=device)
        xt = noise_sched.add_noise(lat, noise, t)
        eps = unet(torch.cat([xt, image], 1), t, encoder_hidden_states=embed(texts)).sample  # (B, 8, 8, 8)
        loss = (weight_of_t[t] * (eps - noise).pow(2).flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pl in zip(ema_unet.parameters(), unet.parameters()):
                pe.lerp_(pl, 1 - decay)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            train_l, held_l, blind_l = held_loss(ema_unet)
            secs = time.time() - start
            history.append(dict(step=done, loss=round(loss.item(), 5), ema_loss_train_instructions=round(train_l, 5),
                                ema_loss_heldout_instructions=round(held_l, 5),
                                ema_loss_heldout_no_image=round(blind_l, 5), lr=opt.param_groups[0]["lr"],
                                seconds=round(secs, 1)))
            log(f"step {done}/{args.steps}  loss {loss.item():.4f}  EMA fixed-batch loss: train instructions "
                f"{train_l:.4f}, held-out {held_l:.4f}, held-out without the image {blind_l:.4f}  {secs / 60:.1f} min")
        if done % args.save_every == 0 or done == args.steps:
            record["unet_seconds"] = round(time.time() - start, 1)
            record["steps_done"] = done
            save_pipeline(args.out, args.base, vae, text_encoder, tokenizer, ema_unet, record)
            tmp = state_file.with_suffix(".tmp")
            torch.save(dict(unet=unet.state_dict(), ema_unet=ema_unet.state_dict(), opt=opt.state_dict(), step=done,
                            record=json.dumps(record)), tmp)
            os.replace(tmp, state_file)
            log(f"saved {args.out} at step {done}")


if __name__ == "__main__":
    main()
