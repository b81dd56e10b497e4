"""Wall time of a guidance policy vs full CFG through ``apply_policy`` on a diffusers pipeline.

    python experiments/pipeline_speed.py                    # tiny SD pipeline (random weights), CPU
    python experiments/pipeline_speed.py --sd15 --device cuda --dtype fp16 --batch 1 8
                                                            # SD-1.5-sized pipeline, 512×512, 50 steps
    python experiments/pipeline_speed.py --family wan       # a tiny two-call pipeline (wan, wan22, flux,
                                                            # qwen_image) or another batched one (pixart_sigma, sana)
    python experiments/pipeline_speed.py --sdxl --device cuda --dtype bf16 --latent
                                                            # SDXL's UNet (2.6B), 1024×1024, 30 steps
    python experiments/pipeline_speed.py --wan-1.3b --device cuda --dtype bf16 --latent
                                                            # Wan 2.1 1.3B's transformer, 832×480, 33 frames

The pipeline is a StableDiffusionPipeline built in code with random weights
(``agsearch.testing``: the tiny test pipeline, or SD 1.5's UNet/VAE/CLIP-text
architectures), called with ``prompt_embeds`` (no tokenizer, nothing downloaded; text encoding is
outside the timed call). Three configurations are timed on the same noise, interleaved so that
a busy machine slows them alike: ``plain`` (the pipeline's own full CFG), ``full`` (a full-CFG
policy under ``apply_policy``: the hook overhead) and ``policy`` (CFG for the first
``--cutoff`` fraction of the steps, then the conditional pass only). After ``--warmup`` calls,
each is run ``--repeats`` times; the median counts. Reported: speedup = t_plain / t_policy, the
NFE ratio = NFE_full / NFE_policy, and their ratio (1.0 = the saved evaluations are saved in
full; the VAE decode and the pipeline's own per-step work are not reduced, so it is < 1).
Writes ``--out``.md and ``--out``.json (default results/pipeline_speed_{tiny,sd15}_{device}).
Needs torch, diffusers, transformers, jsonschema; not open_clip or wandb.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agsearch import testing as tiny_pipelines
from agsearch.diffusers.hook import apply_policy  # noqa: E402
from agsearch.io import atomic_write_text  # noqa: E402
from agsearch.policy import Policy

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The tiny transformer pipelines: the call's arguments besides prompts, steps, scale and size.
FAMILY_CALLS = {
    "pixart_sigma": dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=16),
    "sana": dict(use_resolution_binning=False, complex_human_instruction=None, max_sequence_length=16),
    "wan": dict(max_sequence_length=16),  # num_frames: --frames
    "wan22": dict(max_sequence_length=16),
    "sdxl": dict(),
    "flux": dict(max_sequence_length=16),
    "qwen_image": dict(max_sequence_length=16),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="the tiny test pipeline (default)")
    size.add_argument("--sd15", action="store_true", help="SD 1.5's architecture with random weights")
    size.add_argument("--sdxl", action="store_true", help="SDXL-base's UNet and VAE with random weights (batched CFG)")
    size.add_argument("--wan-1.3b", dest="wan13b", action="store_true",
                      help="Wan 2.1 T2V-1.3B's transformer and VAE with random weights (two calls per step)")
    p.add_argument("--family", default="sd", choices=sorted(FAMILY_CALLS) + ["sd"],
                   help="tiny pipeline of agsearch.testing (default sd; the others are called with prompts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="prompts per call (each a separate row)")
    p.add_argument("--steps", type=int, default=None, help="default: 50 (--sd15), 30 (--sdxl, --wan-1.3b), 20 (--tiny)")
    p.add_argument("--size", type=int, default=None,
                   help="image height in pixels; default 512 (--sd15), 1024 (--sdxl), 480 (--wan-1.3b), 64 (--tiny)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels; default 832 (--wan-1.3b), else --size")
    p.add_argument("--frames", type=int, default=None, help="video frames (4k+1) for Wan; default 33 (--wan-1.3b), 9")
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("--cutoff", type=float, default=0.6, help="fraction of the steps that run CFG")
    p.add_argument("--latent", action="store_true", help="return latents: time the denoising loop without the VAE decode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="output path without suffix")
    args = p.parse_args(argv)
    if not 0 <= args.cutoff <= 1:
        p.error(f"--cutoff must be in [0, 1], got {args.cutoff}")
    if min(args.batch) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch and --repeats must be >= 1, --warmup >= 0")
    if args.sdxl or args.wan13b:
        if args.family != "sd":
            p.error("--family picks a tiny pipeline; --sdxl and --wan-1.3b pick their own")
        args.family = "sdxl" if args.sdxl else "wan"
    if args.sd15:
        name = "sd15"
    elif args.sdxl or args.wan13b:
        name = "sdxl" if args.sdxl else "wan_1_3b"
    else:
        name = "tiny" if args.family == "sd" else f"tiny_{args.family}"
    args.name = name
    big = args.sdxl or args.wan13b
    args.steps = args.steps or (50 if args.sd15 else 30 if big else 20)
    args.size = args.size or (512 if args.sd15 else 1024 if args.sdxl else 480 if args.wan13b else 64)
    args.width = args.width or (832 if args.wan13b and args.size == 480 else args.size)
    args.frames = args.frames or (33 if args.wan13b else 9)
    if args.family in ("wan", "wan22") and (args.frames - 1) % 4:
        p.error(f"--frames must be 4k+1 for Wan, got {args.frames}")
    args.out = Path(args.out) if args.out else ROOT / "results" / f"pipeline_speed_{name}_{args.device.split(':')[0]}"
    return args


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.sd15:
        pipe = tiny_pipelines.sd15(device=device, dtype=dtype)
    elif args.sdxl:
        pipe = tiny_pipelines.sdxl_sized(device=device, dtype=dtype)
    elif args.wan13b:
        pipe = tiny_pipelines.wan_1_3b_sized(device=device, dtype=dtype)
    elif args.family != "sd":
        pipe = getattr(tiny_pipelines, f"tiny_{args.family}")().to(device, dtype)
    else:
        pipe = tiny_pipelines.tiny_sd(tokenizer=False).to(device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    build_s = time.perf_counter() - t0
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    denoiser_parameters = sum(p.numel() for p in denoiser.parameters())
    k = round(args.cutoff * args.steps)
    policy = Policy.static(["cfg"] * k + ["cond"] * (args.steps - k), args.scale, name=f"cutoff-{args.cutoff:g}")
    full = Policy.static(["cfg"] * args.steps, args.scale, name="full")
    print(f"{args.name} pipeline on {device} ({args.dtype}) built in {build_s:.1f}s, denoiser "
          f"{denoiser_parameters / 1e9:.3f}B parameters; T={args.steps}, "
          f"policy {policy.ops_string()} NFE {policy.nfe} vs {full.nfe}", flush=True)

    rows = []
    for batch in args.batch:
        if args.family == "sd":
            embeds = tiny_pipelines.random_prompt_embeds(pipe, batch, seed=0).to(dtype)
            negative = tiny_pipelines.random_prompt_embeds(pipe, batch, seed=1).to(dtype)
            latent = args.size // pipe.vae_scale_factor
            latents = torch.randn(batch, pipe.unet.config.in_channels, latent, latent,
                                  generator=torch.Generator().manual_seed(0)).to(device, dtype)
            inputs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents)
        else:  # prompts: the tiny text encoders are cheap; the same noise from per-sample seeds
            scale_arg = "true_cfg_scale" if args.family in ("flux", "qwen_image") else "guidance_scale"
            inputs = dict(prompt=["a red circle"] * batch, negative_prompt=["blurry"] * batch,
                          **FAMILY_CALLS[args.family], **{scale_arg: args.scale})
            if args.family in ("wan", "wan22"):
                inputs["num_frames"] = args.frames

        def call(which):
            extra = {} if args.family == "sd" else dict(generator=[torch.Generator().manual_seed(j)
                                                                 for j in range(batch)])
            kwargs = dict(**inputs, **extra, num_inference_steps=args.steps, height=args.size, width=args.width,
                          output_type="latent" if args.latent else "pt")
            if args.family in ("sd", "sdxl", "pixart_sigma", "sana", "wan", "wan22"):
                kwargs["guidance_scale"] = args.scale
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                if which == "plain":
                    pipe(**kwargs)
                else:
                    with apply_policy(pipe, policy if which == "policy" else full) as runner:
                        pipe(**kwargs)
                    expected = (policy if which == "policy" else full).nfe
                    assert runner.nfe.tolist() == [float(expected)] * batch, runner.nfe
            _sync(device)
            return time.perf_counter() - start, time.process_time() - cpu_start

        configs = ("plain", "full", "policy")
        for _ in range(args.warmup):
            for which in configs:
                call(which)
        times = {which: [] for which in configs}
        cpu_times = {which: [] for which in configs}
        for _ in range(args.repeats):
            for which in configs:  # interleaved: background load hits all three alike
                wall, cpu = call(which)
                times[which].append(wall)
                cpu_times[which].append(cpu)
        med = {which: statistics.median(ts) for which, ts in times.items()}
        cpu_med = {which: statistics.median(ts) for which, ts in cpu_times.items()}
        cpu_speedup = cpu_med["plain"] / cpu_med["policy"]
        speedup = med["plain"] / med["policy"]
        nfe_ratio = full.nfe / policy.nfe
        row = dict(batch=batch, t_plain_s=med["plain"], t_full_policy_s=med["full"], t_policy_s=med["policy"],
                   hook_overhead=med["full"] / med["plain"] - 1, speedup=speedup, nfe_ratio=nfe_ratio,
                   speedup_over_nfe_ratio=speedup / nfe_ratio, times_s=times,
                   # process CPU time (all threads): robust to other processes on a shared CPU
                   cpu_plain_s=cpu_med["plain"], cpu_policy_s=cpu_med["policy"], cpu_speedup=cpu_speedup,
                   cpu_speedup_over_nfe_ratio=cpu_speedup / nfe_ratio, cpu_times_s=cpu_times)
        rows.append(row)
        print(f"batch {batch}: plain {med['plain']:.3f}s, full-CFG policy {med['full']:.3f}s, "
              f"policy {med['policy']:.3f}s; speedup {speedup:.3f}x vs NFE ratio {nfe_ratio:.3f} "
              f"-> {speedup / nfe_ratio:.3f}; process CPU time speedup {cpu_speedup:.3f}x "
              f"-> {cpu_speedup / nfe_ratio:.3f}", flush=True)

    meta = dict(latent=args.latent, pipeline=args.name, pattern=("two calls" if args.family in ("wan", "wan22", "flux", "qwen_image")
                                             else "batched"), device=str(device), dtype=args.dtype, steps=args.steps, size=args.size,
                width=args.width, frames=args.frames if args.family in ("wan", "wan22") else None,
                denoiser_parameters=denoiser_parameters,
                guidance_scale=args.scale, policy=policy.ops_string(), policy_nfe=policy.nfe, full_nfe=full.nfe,
                warmup=args.warmup, repeats=args.repeats, build_s=build_s,
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                or platform.machine(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__,
                load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
                diffusers=__import__("diffusers").__version__,
                command="python experiments/pipeline_speed.py " + " ".join(sys.argv[1:] if argv is None else argv))
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [
        f"# apply_policy speed: {args.name} pipeline ({meta['pattern']} CFG), {meta['device_name']} "
        f"({args.device}, {args.dtype})",
        "",
        f"`{meta['command']}`",
        "",
        f"{args.width}×{args.size}{f' × {args.frames} frames' if meta['frames'] else ''}, "
        f"denoiser {denoiser_parameters / 1e9:.2f}B parameters, T = {args.steps}, w = {args.scale:g}; policy = CFG on the first {k} steps, "
        f"then cond ({policy.nfe} vs {full.nfe} NFE per image). Median of {args.repeats} timed calls after "
        f"{args.warmup} warm-up; times {'exclude' if args.latent else 'include'} the VAE decode; torch {torch.__version__}, "
        f"diffusers {meta['diffusers']}, {meta['torch_threads']} CPU threads; load average at the end "
        f"{meta['load_average']}.",
        "",
        "Wall time (the figure that matters on a dedicated machine); process CPU time (all threads of this",
        "process) as well, which other processes on a shared CPU do not inflate.",
        "",
        "| batch | plain CFG (s) | full-CFG policy (s) | hook overhead | policy (s) | speedup | NFE ratio "
        "| speedup / NFE ratio | CPU-time speedup | CPU-time speedup / NFE ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['t_plain_s']:.3f} | {r['t_full_policy_s']:.3f} | {100 * r['hook_overhead']:+.1f}% "
                     f"| {r['t_policy_s']:.3f} | {r['speedup']:.3f} | {r['nfe_ratio']:.3f} "
                     f"| {r['speedup_over_nfe_ratio']:.3f} | {r['cpu_speedup']:.3f} "
                     f"| {r['cpu_speedup_over_nfe_ratio']:.3f} |")
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
