"""Write the shapes model's card, ``agsearch/models/shapes/weights/shapes/README.md``, from the records.

    python experiments/shapes_card.py

Every figure comes from a file a command wrote: ``shapes/training.json``
(``experiments/train_shapes.py``), ``shapes_scorer.json`` (``experiments/train_shapes_scorer.py``)
and, when present, ``results/shapes_calibration/calibration.json``
(``experiments/calibrate_shapes.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from agsearch.io import atomic_write_text
from agsearch.models.shapes import (
    PIPELINE_DIR,
    SCORER_FILE,
    TEXT_CONFIG,
    UNET_CONFIG,
    VAE_CONFIG,
    scenes,
)

CALIBRATION = Path("results/shapes_calibration/calibration.json")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main():
    train = json.loads((PIPELINE_DIR / "training.json").read_text("utf-8"))
    scorer = json.loads(SCORER_FILE.with_suffix(".json").read_text("utf-8"))
    params = train["parameters"]
    unet_hist, vae_hist = train["unet_history"], train["vae"]["history"]
    last = unet_hist[-1]
    best_held = min(h["ema_loss_heldout_captions"] for h in unet_hist)
    args = train["args"]
    lines = [
        "# agsearch shapes: a miniature Stable Diffusion on compositional shape scenes",
        "",
        "A diffusers `StableDiffusionPipeline` trained from scratch, with no download, on the procedural "
        "scenes of `agsearch/models/shapes/scenes.py`: 32×32 RGB images of one to three objects (4 shapes, 6 colours, "
        "2 sizes, a 3×3 grid of cells) with captions in five GenEval-style categories (single object, two objects, "
        "colour attribution, position, counting). Some combinations never appear in a training caption "
        "(`scenes.HELD_OUT_PAIRS`, `HELD_OUT_SHAPE_PAIR`, `HELD_OUT_TRIPLES`): "
        f"{len(scenes.captions('train'))} training captions, {len(scenes.captions('heldout'))} held out.",
        "",
        "```python",
        "from agsearch.models.shapes import load_pipeline",
        "pipe = load_pipeline()            # = StableDiffusionPipeline.from_pretrained(<this folder>)",
        'image = pipe("a red circle to the left of a blue square", guidance_scale=3).images[0]',
        "```",
        "",
        "On the command line the folder is `builtin:shapes` (`agsearch generate --pipeline builtin:shapes ...`).",
        "",
        "## Components",
        "",
        "| component | architecture | parameters |",
        "|---|---|---:|",
        f"| `vae` | `AutoencoderKL`, blocks {VAE_CONFIG['block_out_channels']}, 3×32×32 ↔ "
        f"{VAE_CONFIG['latent_channels']}×8×8, scaling factor {train['vae']['scaling_factor']:.4f} | {params['vae']:,} |",
        f"| `text_encoder` | `CLIPTextModel`, {TEXT_CONFIG['num_hidden_layers']} layers, width "
        f"{TEXT_CONFIG['hidden_size']}, {TEXT_CONFIG['max_position_embeddings']} positions (most of it the "
        f"49,408-token embedding) | {params['text_encoder']:,} |",
        "| `tokenizer` | the real CLIP BPE tokenizer (SD 1.5's), built offline from open-clip-torch's vocabulary | - |",
        f"| `unet` | `UNet2DConditionModel`, blocks {UNET_CONFIG['block_out_channels']}, cross-attention at every "
        f"level, ε-prediction | {params['unet']:,} |",
        "| `scheduler` | DDIM config with SD's β schedule (scaled linear 0.00085–0.012), trailing spacing; "
        "Euler and DPM-Solver++ take it too | - |",
        "",
        f"Folder size: {folder_size(PIPELINE_DIR) / 2**20:.1f} MiB.",
        "",
        "## Training",
        "",
        f"Command: `{train['command'].strip()}` (seed {args['seed']}, torch {train['torch']}, device "
        f"{train['device']}).",
        "",
        f"1. VAE: {args['vae_steps']} steps of batch {args['vae_batch']}, L1 + MSE + {args['kl_weight']:g}·KL, "
        f"{train['vae']['seconds'] / 60:.1f} min; held-out reconstruction PSNR "
        f"{vae_hist[-1]['heldout_psnr']:.2f} dB (256 renders, images in [-1, 1]).",
        f"2. UNet + text encoder together: {train.get('steps_done', args['steps'])} steps of batch "
        f"{args['batch_size']}, AdamW lr {args['lr']:g} (warm-up {args['warmup']}, cosine to 10%), Min-SNR-γ "
        f"{args['min_snr_gamma']:g}, caption dropped to the empty prompt with probability {args['cond_dropout']:g}, "
        f"EMA {args['ema']:g}; {train['unet_seconds'] / 60:.1f} min.",
        "",
        *(["The same script runs on a GPU with `--device cuda`; no GPU run has been timed yet.", ""]
          if train["device"] == "cpu" else []),
        "Loss of the EMA weights on a fixed held-out batch (256 training and 256 held-out captions, fixed images, "
        "t and noise; unweighted ε-MSE):",
        "",
        "| step | minutes | training captions | held-out captions |",
        "|---:|---:|---:|---:|",
    ]
    shown = unet_hist[:: max(1, len(unet_hist) // 12)]
    if shown[-1] is not last:
        shown.append(last)
    lines += [f"| {h['step']} | {h['seconds'] / 60:.1f} | {h['ema_loss_train_captions']:.4f} | "
              f"{h['ema_loss_heldout_captions']:.4f} |" for h in shown]
    lines += ["", f"Lowest held-out-caption loss: {best_held:.4f}.", ""]
    acc = scorer["heldout_accuracy"]
    lines += [
        "## The scorer",
        "",
        f"`shapes_scorer.safetensors` beside this folder: a CNN ({scorer['parameters']:,} parameters) trained by "
        f"`{scorer['command']}` ({scorer['args']['steps']} steps, {scorer['args']['threads']} threads) on renders "
        f"only ({scorer['seconds'] / 60:.1f} min). On {scorer['heldout_renders']} "
        f"held-out renders: shape (per cell, empty included) {100 * acc['shape']:.2f}%, colour "
        f"{100 * acc['colour']:.2f}%, size {100 * acc['size']:.2f}% (per object), whole scene {100 * acc['scene']:.2f}%.",
        "",
    ]
    if "vae_reconstructions" in scorer:
        v = scorer["vae_reconstructions"]
        lines += [f"On the VAE's reconstructions of {v['renders']} held-out renders: shape {100 * v['shape']:.2f}%, "
                  f"colour {100 * v['colour']:.2f}%, size {100 * v['size']:.2f}%, scene {100 * v['scene']:.2f}%.", ""]
    if CALIBRATION.is_file():
        cal = json.loads(CALIBRATION.read_text("utf-8"))
        lines += ["## Guidance", "",
                  f"From `python experiments/calibrate_shapes.py` ({cal['samples']} samples per row, DDIM "
                  f"{cal['steps']} steps, held-out noise seed {cal['seed']}); the best scale is w = {cal['best_scale']:g}.",
                  "", "| captions | policy | NFE | adherence % | FD |", "|---|---|---:|---:|---:|"]
        for split, rows in cal["rows"].items():
            lines += [f"| {split} | {r['name']} | {r['nfe']:g} | {100 * r['adherence']:.1f} | {r['fd']:.2f} |"
                      for r in rows]
        lines += ["", "Full table, plots and sample grids: `results/shapes_calibration/`.", ""]
    atomic_write_text(PIPELINE_DIR / "README.md", "\n".join(lines))
    print(f"wrote {PIPELINE_DIR / 'README.md'}")


if __name__ == "__main__":
    main()
