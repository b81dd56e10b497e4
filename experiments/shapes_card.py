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
    benchmark_settings,
    scenes,
)

CALIBRATION = Path("results/shapes_calibration/calibration.json")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def training_lines(train: dict) -> list[str]:
    """The training section: the VAE, then each UNet stage (a later one starts from the earlier's
    weights with ``--init-from``), and the held-out losses along all of them."""
    stages = [*train.get("previous_stages", []), train]
    first = stages[0]
    args, vae_hist = first["args"], first["vae"]["history"]
    lines = [
        f"1. VAE: `{first['command'].strip()}` (seed {args['seed']}): {args['vae_steps']} steps of batch "
        f"{args['vae_batch']}, L1 + MSE + {args['kl_weight']:g}·KL, {first['vae']['seconds'] / 60:.1f} min; held-out "
        f"reconstruction PSNR {vae_hist[-1]['heldout_psnr']:.2f} dB (256 renders, images in [-1, 1]).",
    ]
    for i, stage in enumerate(stages, 1):
        a = stage["args"]
        start = "from scratch on the VAE's latents" if i == 1 else f"from stage {i - 1}'s weights (`--init-from`)"
        lines.append(
            f"{i + 1}. UNet + text encoder together, stage {i}, {start}: `{stage['command'].strip()}` (seed {a['seed']}, torch "
            f"{stage['torch']}, {stage['device']}): {stage.get('steps_done', a['steps'])} steps of batch "
            f"{a['batch_size']}, AdamW lr {a['lr']:g} (warm-up {a['warmup']}, cosine to 10%), Min-SNR-γ "
            f"{a['min_snr_gamma']:g}, caption dropped to the empty prompt with probability {a['cond_dropout']:g}, EMA "
            f"{a['ema']:g}; {stage['unet_seconds'] / 60:.1f} min.")
    if len(stages) > 1:
        lines.append(f"   Its output folder (`{train['args']['out']}`) replaced this one.")
    lines.append("")
    if all(stage["device"] == "cpu" for stage in stages):
        lines += ["Times are wall times on a 2-core CPU (shared with other jobs at times). The same script runs on "
                  "a GPU with `--device cuda`; no GPU run has been timed yet.", ""]
    lines += ["Loss of the EMA weights on a fixed held-out batch (256 training and 256 held-out captions, fixed "
              "images, t and noise; unweighted ε-MSE); steps and minutes count from the start of stage 1:", "",
              "| stage | step | minutes | training captions | held-out captions |", "|---:|---:|---:|---:|---:|"]
    steps0 = minutes0 = 0.0
    for i, stage in enumerate(stages, 1):
        hist = stage["unet_history"]
        shown = hist[:: max(1, len(hist) // 8)]
        if shown[-1] is not hist[-1]:
            shown.append(hist[-1])
        lines += [f"| {i} | {steps0 + h['step']:.0f} | {minutes0 + h['seconds'] / 60:.1f} | "
                  f"{h['ema_loss_train_captions']:.4f} | {h['ema_loss_heldout_captions']:.4f} |" for h in shown]
        steps0 += hist[-1]["step"]
        minutes0 += stage["unet_seconds"] / 60
    return lines


def main():
    train = json.loads((PIPELINE_DIR / "training.json").read_text("utf-8"))
    scorer = json.loads(SCORER_FILE.with_suffix(".json").read_text("utf-8"))
    params = train["parameters"]
    stages = [*train.get("previous_stages", []), train]
    best_scale = benchmark_settings()["guidance_scale"]
    best_held = min(h["ema_loss_heldout_captions"] for stage in stages for h in stage["unet_history"])
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
        f'image = pipe("a red circle to the left of a blue square", guidance_scale={best_scale:g}).images[0]',
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
        *training_lines(train),
    ]
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
