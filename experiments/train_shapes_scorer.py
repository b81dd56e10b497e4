"""Train the shapes test bed's exact scorer on rendered scenes (never on generated samples).

    python experiments/train_shapes_scorer.py --threads 2   # ~6 min on 2 CPU cores

A ``ShapesScorer`` (``agsearch/models/shapes/__init__.py``) learns to read every cell of the 3×3 grid back
(shape or empty, colour, size) from endless seeded renders: random scenes of 0–4 objects with
every attribute random, half of them slightly blurred, with a little pixel noise and a colour shift so that the
reading does not hinge on the renderer's exact pixels. Held-out renders (another seed) give the
per-attribute accuracies in ``agsearch/models/shapes/weights/shapes_scorer.json`` (and, once the shapes
pipeline exists, the same accuracies on its VAE's reconstructions of those renders: how much the
decoder alone costs); the weights go to ``shapes_scorer.safetensors`` beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from agsearch.models.shapes import (
    PIPELINE_DIR,
    SCORER_FILE,
    ShapesScorer,
    scene_targets,
    scenes,
)


def batch(rng, n, augment=True):
    scene_list = [scenes.random_scene(rng) for _ in range(n)]
    x = scenes.to_tensor(scenes.render_batch(scene_list))
    if augment:
        k = n // 2
        x[:k] = blur(x[:k], rng.uniform(0.3, 0.8, k))
        x[:k] += torch.from_numpy(rng.uniform(0, 0.06, (k, 1, 1, 1)) * rng.standard_normal((k, 3, 32, 32))).float()
        x[:k] += torch.from_numpy(rng.uniform(-0.08, 0.08, (k, 3, 1, 1))).float()
    return x.clamp(-1, 1), scene_targets(scene_list), scene_list


def blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """A 3×3 Gaussian blur of each image (B, 3, H, W) with its own σ (px)."""
    d = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-d[None] ** 2 / (2 * torch.from_numpy(sigma).float()[:, None] ** 2))  # (B, 3)
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :])  # (B, 3, 3)
    b = len(x)
    weight = k2[:, None].repeat_interleave(3, 0)  # (3B, 1, 3, 3): one kernel per image and channel
    out = F.conv2d(F.pad(x.reshape(1, 3 * b, 32, 32), (1, 1, 1, 1), mode="replicate"), weight, groups=3 * b)
    return out.view_as(x)


def accuracies(model, x, targets, scene_list) -> dict:
    shape_t, colour_t, size_t = targets
    with torch.no_grad():
        s, c, z = model(x)
    occupied = shape_t > 0
    read = ShapesScorer.decode(s, c, z)
    exact = [tuple(sorted((o.cell, o.shape, o.colour, o.size) for o in r)) ==
             tuple(sorted((o.cell, o.shape, o.colour, o.size) for o in t)) for r, t in zip(read, scene_list)]
    return dict(
        shape=(s.argmax(-1) == shape_t).float().mean().item(),  # per cell, "empty" included
        colour=(c.argmax(-1) == colour_t)[occupied].float().mean().item(),  # per object
        size=(z.argmax(-1) == size_t)[occupied].float().mean().item(),  # per object
        scene=float(np.mean(exact)),  # every cell right
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)  # held-out renders read 100% from step ~1250 on
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heldout", type=int, default=5000)
    p.add_argument("--out", type=Path, default=SCORER_FILE)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = ShapesScorer()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    held = batch(np.random.default_rng(10**6 + 2), args.heldout, augment=False)
    start, history = time.time(), []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        x, (shape_t, colour_t, size_t), _ = batch(rng, args.batch_size)
        model.train()
        s, c, z = model(x)
        loss = (F.cross_entropy(s.flatten(0, 1), shape_t.flatten()) + F.cross_entropy(c.flatten(0, 1), colour_t.flatten())
                + F.cross_entropy(z.flatten(0, 1), size_t.flatten()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            model.eval()
            acc = accuracies(model, *held)
            history.append(dict(step=step + 1, loss=round(loss.item(), 5), **acc, seconds=round(time.time() - start, 1)))
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} held-out " +
                  " ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()) + f" {time.time() - start:.0f}s", flush=True)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    command = " ".join(["python experiments/train_shapes_scorer.py", *(sys.argv[1:] if argv is None else argv)])
    record = dict(command=command, args={k: str(v) for k, v in vars(args).items()},
                  heldout_renders=args.heldout, heldout_accuracy=history[-1], history=history,
                  parameters=sum(p.numel() for p in model.parameters()), seconds=round(time.time() - start, 1))
    vae_dir = PIPELINE_DIR / "vae"
    if (vae_dir / "config.json").is_file():  # how well it reads the shipped VAE's reconstructions
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()
        x, targets, scene_list = held
        with torch.no_grad():
            recon = torch.cat([vae.decode(vae.encode(x[i:i + 500]).latent_dist.mode()).sample
                               for i in range(0, len(x), 500)]).clamp(-1, 1)
        record["vae_reconstructions"] = dict(renders=len(x), **accuracies(model, recon, targets, scene_list))
        print("on VAE reconstructions: " + " ".join(f"{k} {100 * v:.2f}%" for k, v in
                                                     record["vae_reconstructions"].items() if k != "renders"))
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", "utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
