"""Time and memory of one search step with and without gradient checkpointing.

    python experiments/search_memory.py                      # built-in digits UNet, CPU, T = 10, 25, 50
    python experiments/search_memory.py --sd15 --device cuda # an SD-1.5-sized UNet2DConditionModel
                                                             # (random weights), 64x64 latents, T = 20

Writes results/search_memory.md (or --out). One step = a differentiable trajectory of T steps with
soft gates over (cfg, cond), every op's passes run, then backward to the gate logits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_meter import measure_step  # noqa: E402  (experiments/memory_meter.py, beside this script)

from agsearch.io import atomic_write_text  # noqa: E402
from agsearch.models.digits.data import IMAGE_SHAPE
from agsearch.seeds import make_noise, sample_seeds  # noqa: E402

# The UNet of Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, unet/config.json), ~860M parameters.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                      timestep_spacing="leading")


class TextDenoiser:
    """UNet2DConditionModel behind the Denoiser contract: cond = (prompt embeddings, null embeddings)."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, x, t, cond, run_cond, run_uncond):
        emb_c, emb_u = cond
        x_in = torch.cat([x[run_cond], x[run_uncond]])
        ctx = torch.cat([emb_c[run_cond], emb_u[run_uncond]])
        out_c, out_u = torch.zeros_like(x), torch.zeros_like(x)
        if len(x_in) == 0:
            return out_c, out_u
        out = self.unet(x_in, t, encoder_hidden_states=ctx).sample.to(x.dtype)
        n = int(run_cond.sum())
        out_c = out_c.index_put((run_cond.nonzero(as_tuple=True)[0],), out[:n])
        out_u = out_u.index_put((run_uncond.nonzero(as_tuple=True)[0],), out[n:])
        return out_c, out_u


def digits_cases(device, batch):
    from agsearch.search.backends import DigitsBackend

    backend = DigitsBackend().to(device)
    noise = make_noise(sample_seeds(0, batch), IMAGE_SHAPE, device=device)
    cond = (torch.arange(batch) % 10).to(device)
    return backend.denoiser, backend.scheduler, noise, cond, 1.1


def sd15_case(device, batch, dtype):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device).requires_grad_(False).eval()
    noise = torch.randn(batch, 4, 64, 64, device=device)
    cond = (torch.randn(batch, 77, 768, device=device), torch.randn(batch, 77, 768, device=device))
    return TextDenoiser(unet), DDIMScheduler.from_config(SD15_SCHEDULER), noise, cond, 7.5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="SD-1.5-sized UNet2DConditionModel, 64x64 latents")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, nargs="+", help="T values (default 10 25 50; 20 with --sd15)")
    parser.add_argument("--batch", type=int, help="samples (default 32; 1 with --sd15)")
    parser.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--out", type=Path, default=Path("results/search_memory.md"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    batch = args.batch or (1 if args.sd15 else 32)
    steps = args.steps or ([20] if args.sd15 else [10, 25, 50])
    denoiser, scheduler, noise, cond, w = sd15_case(device, batch, dtype) if args.sd15 else digits_cases(device, batch)
    candidates = [{"op": "cfg"}, {"op": "cond"}]
    measure_step(denoiser, scheduler, noise, cond, candidates, w, 2, False, dtype)  # warm-up
    rows = []
    for T in steps:
        for checkpointing in (False, True):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                row = measure_step(denoiser, scheduler, noise, cond, candidates, w, T, checkpointing, dtype)
            except torch.OutOfMemoryError:
                row = {"num_inference_steps": T, "checkpointing": checkpointing, "batch": batch, "seconds": None,
                       "saved_mib": None, "cuda_peak_mib": "OOM"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    model = "SD-1.5-sized UNet2DConditionModel (random weights), 4x64x64 latents" if args.sd15 else "built-in digits UNet2DModel, 1x8x8"
    lines = ["# One search step: time and memory with and without gradient checkpointing", "",
             f"`python experiments/search_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace("  ", " "),
             f"— {model}, batch {batch}, device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
             f"autocast {args.autocast}, DDIM, gates over (cfg, cond) with both passes run at every step.", "",
             "| T | checkpointing | seconds | saved for backward (MiB) | CUDA peak (MiB) |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['num_inference_steps']} | {'on' if r['checkpointing'] else 'off'} | {r['seconds']} | "
                     f"{r['saved_mib']} | {r['cuda_peak_mib'] if r['cuda_peak_mib'] is not None else '–'} |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
