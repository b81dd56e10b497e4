"""The ``agsearch`` command line.

Exit codes: 0 success; 2 bad input (unreadable or invalid policy, unknown model or baseline, bad
option), with one line on stderr and no traceback; 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
from pathlib import Path

from agsearch.cli.common import MAX_SEED, MAX_SIZE, UserError, printable
from agsearch.io import atomic_write_text
from agsearch.policy import MAX_SCALE, MAX_STEPS, PolicyError, load_policies

MODEL_CONDITIONS = {"digits": (1, "the digits model"), "shapes": (1, "the shapes model"),
                    "shapes_edit": (2, "the shapes editor")}  # the built-in models and the conditions they guide on
MODELS = tuple(MODEL_CONDITIONS)  # shapes_edit: the built-in image editor


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too)
        raise UserError(f"{self.prog}: {message} (see --help)")

    def _get_values(self, action, arg_strings):
        # "--samples=--" hands argparse the lone string "--", which it takes for the end of the options and
        # drops, leaving samples=[]: read it as the value it is, so the option's type refuses it.
        if arg_strings == ["--"] and action.nargs not in (argparse.PARSER, argparse.REMAINDER):
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value if action.nargs in (None, argparse.OPTIONAL) else [value]
        return super()._get_values(action, arg_strings)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


MAX_SAMPLES = MAX_SIZE  # per evaluation: it streams, so this bounds the run's length, not its memory
MAX_IMAGE_SIDE = 4096


def _int_up_to(limit: int, what: str):
    """An argparse type: an integer in [1, limit], the limit named in the message."""
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"{text} is more {what} than the limit of {limit:,}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


def _seed(text: str) -> int:
    """A seed S in [0, MAX_SEED]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, {MAX_SEED:,}], got {text}")
    return value


def _image_side(text: str) -> int:
    value = _int_up_to(MAX_IMAGE_SIDE, "pixels")(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 (the VAE's downsampling), got {text}")
    return value


def _frames(text: str) -> int:
    value = _int_up_to(1024, "frames")(text)
    if value < 1 or (value - 1) % 4:
        raise argparse.ArgumentTypeError(f"expected 4k + 1 frames (the video VAE's 4× in time), got {text}")
    return value


def _scale(text: str) -> float:
    value = _nonneg_float(text)
    if value > MAX_SCALE:
        raise argparse.ArgumentTypeError(f"expected a guidance scale <= {MAX_SCALE:g}, got {text}")
    return value


def _device(text: str) -> str:
    """A device that exists here: cpu, cuda[:i] with a GPU, mps where available."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here (use --device cpu)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda, cuda:N or mps")
    return text


_steps = _int_up_to(MAX_STEPS, "steps")
_samples = _int_up_to(MAX_SAMPLES, "samples")


def _settings(model: str = "digits") -> dict:
    """The benchmark protocol's settings (scheduler, steps, best scale) of a built-in model."""
    _check_model(model)
    if model == "shapes_edit":
        from agsearch.models.shapes import edit_benchmark_settings as benchmark_settings
    elif model == "shapes":
        from agsearch.models.shapes import benchmark_settings
    else:
        from agsearch.models.digits import benchmark_settings

    return benchmark_settings()


def _check_model(name: str) -> None:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}")


def _check_out(path: Path) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory, or one under
    an existing file (its parent folders are made at write time)."""
    if path.is_dir():
        raise UserError(f"output path {path} is a directory; give a file name")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"output path {path}: {parent} is a file, not a folder")
            break


# -- subcommands ------------------------------------------------------------------------------------
def cmd_baseline(args) -> int:
    from agsearch.baselines import make_baseline

    settings = _settings(args.model)
    steps = args.steps or settings["num_inference_steps"]
    scale = settings["guidance_scale"] if args.scale is None else args.scale
    threshold = args.threshold
    if args.name == "ag" and threshold is None:
        threshold = settings.get("ag_threshold")
        if threshold is None:
            raise UserError(f"the {args.model} model has no calibrated AG threshold: give --threshold G")
    _check_out(args.out)
    affine = None
    if args.name in ("linear-ag", "affine-cutoff"):
        from agsearch.linear_ag import load_builtin, load_coefficients

        affine = load_coefficients(args.affine) if args.affine is not None else load_builtin(args.model)
    base = None
    if args.base is not None:
        from agsearch.policy import Policy

        if args.name != "linear-ag":
            raise UserError(f"--from is an option of linear-ag, not of {args.name}")
        base = Policy.load(args.base)
    image_scale = args.image_scale
    if args.model == "shapes_edit" and image_scale is None:
        image_scale = settings["image_guidance_scale"]  # the editor's baselines are two-condition ones
    policy = make_baseline(args.name, steps, scale, fraction=args.fraction, start=args.start,
                           stop=args.stop, threshold=threshold, space=args.space, affine=affine, base=base,
                           image_scale=image_scale)
    policy.provenance.setdefault("model", f"agsearch-{args.model}")
    policy.save(args.out)
    nfe = policy.nfe if policy.nfe is not None else f"adaptive, at most {policy.max_nfe}"
    print(f"wrote {args.out} ({policy.label()}, NFE {nfe} of {(policy.conditions + 1) * steps})")
    return 0


def cmd_fit_affine(args) -> int:
    from agsearch.baselines import make_baseline
    from agsearch.linear_ag_fit import fit_builtin, r2_table

    _check_model(args.model)
    for path in (args.out, args.policy, args.report):
        if path is not None:
            _check_out(path)
    document = fit_builtin(args.model, pairs=args.pairs, heldout=args.heldout, ridge=args.ridge, per_channel=args.per_channel,
                          seed=args.seed, heldout_seed=args.heldout_seed, device=args.device)
    document["command"] = " ".join(["agsearch", *sys.argv[1:]]) if sys.argv[1:2] == ["fit-affine"] else f"fit_builtin({args.model!r})"
    table = r2_table(document)
    s = document["seconds"]
    summary = (f"LinearAG fit on {args.pairs} teacher trajectories (seed {args.seed}), held-out R² on {args.heldout} "
               f"(seed {args.heldout_seed}); teacher sampling {s['teacher']:.2f} s, ridge fit {s['fit']:.3f} s")
    print(summary)
    print(table)
    atomic_write_text(args.out, json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.policy is not None:
        policy = make_baseline("linear-ag", document["num_inference_steps"], document["guidance_scale"], affine=document)
        policy.provenance.setdefault("model", document["model"])
        policy.save(args.policy)
        print(f"wrote {args.policy} ({policy.label()}, NFE {policy.nfe} of {2 * policy.num_inference_steps})")
    if args.report is not None:
        atomic_write_text(args.report, f"# LinearAG fit: held-out R² per step\n\nProduced by `{document['command']}`. "
                          f"{summary}.\n\n{table}\n")
        print(f"wrote {args.report}")
    return 0


def cmd_eval(args) -> int:
    from agsearch.eval import evaluator_for
    from agsearch.eval.records import format_table

    _check_model(args.model)
    steps = args.steps or _settings(args.model)["num_inference_steps"]
    if args.json is not None:
        _check_out(args.json)
    if args.captions is not None and args.model != "shapes":
        raise UserError(f"--captions is an option of --model shapes (the {args.model} model has no captions)")
    policies = load_policies(args.policy, steps, *MODEL_CONDITIONS[args.model], args.resample)  # checked before sampling
    evaluator = evaluator_for(args.model, samples=args.samples, seed=args.seed, scheduler=args.scheduler,
                              batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                              captions=args.captions)
    records = evaluator.records(policies)  # one pass over the samples: full CFG once per batch
    for path, record in zip(args.policy, records):
        record.update(policy_file=str(path), seed=args.seed, scheduler=args.scheduler)
    print(format_table(records, markdown=args.markdown))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    _check_model(args.model)
    args.out_dir = args.out_dir or Path({"shapes": "results/shapes", "shapes_edit": "results/shapes_edit"}.get(
        args.model, "results"))
    _check_out(args.out_dir / "benchmark.md")
    if args.model in ("shapes", "shapes_edit"):
        from agsearch.eval.shapes import max_batch

        if args.model == "shapes":
            from agsearch.eval.shapes_bench import run_shapes_benchmark as run
        else:
            from agsearch.eval.shapes_edit_bench import run_edit_benchmark as run
        if args.merge or args.records:
            raise UserError("--merge and --records are options of the digits benchmark; "
                            "pass the policies to add with --policy")
        run(out_dir=args.out_dir, samples=args.samples, seed=args.seed,
            batch_size=min(args.batch_size, max_batch(args.device)), device=args.device,
            progress=not args.no_progress, quick=args.quick, policies=args.policy,
            families=args.families, resume=args.resume)
        return 0
    if args.resume:
        raise UserError("--resume is an option of the shapes benchmarks (--model shapes or shapes_edit)")
    from agsearch.eval.bench import run_benchmark

    run_benchmark(out_dir=args.out_dir, samples=args.samples, seed=args.seed,
                  batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                  quick=args.quick, policies=args.policy, families=args.families, merge=args.merge,
                  records_files=args.records)
    return 0


def cmd_show(args) -> int:
    from agsearch.policy import Policy

    for path in args.policy:
        policy = Policy.load(path)
        if policy.kind == "static":
            ops = policy.ops_string()
            print(f"{path}: static, {policy.num_inference_steps} steps, w={policy.guidance_scale:g}, "
                  f"NFE {policy.nfe} of {2 * policy.num_inference_steps}  [{ops}]  (C=cfg c=cond u=uncond A=affine)")
        else:
            rule = ", ".join(f"{k}={v}" for k, v in policy.rule.items())
            print(f"{path}: adaptive, {policy.num_inference_steps} steps, w={policy.guidance_scale:g}, {rule}")
    return 0


def cmd_export(args) -> int:
    from agsearch.cli.search import export_main

    _check_out(args.out)
    return export_main(args)


def cmd_sweep(args) -> int:
    from agsearch.eval.records import format_table
    from agsearch.search.space import SearchSpace
    from agsearch.search.sweep import run_sweep

    for space in args.spaces:  # fail before the first search, not after it
        if not space.strip():
            raise UserError("--spaces: an empty space name")
        try:
            SearchSpace.load(space)
        except ValueError as e:
            raise UserError(f"--spaces {space}: {e}") from None
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        raise UserError(f"--out-dir {args.out_dir} is a file")
    overrides = list(args.overrides)
    values = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in overrides if "=" in a}
    values.update({a: b for a, b in zip(overrides, overrides[1:]) if a.startswith("--") and "=" not in a})
    if values.get("--model.pipeline", "builtin:shapes") != "builtin:shapes" or values.get("--model.model") == "pipeline":
        raise UserError("agsearch sweep evaluates on a built-in model (shapes, the default, or digits with "
                        "-- --model.model=digits); on a pipeline folder run agsearch search per budget "
                        "and compare the policies with agsearch eval")
    out_dir = args.out_dir or Path("results/search" if values.get("--model.model") == "digits" else "results/shapes/sweep")
    rows = run_sweep(args.budgets, args.spaces, out_dir, args.samples, args.seed, args.batch_size,
                     args.overrides, progress=not args.no_progress, ag=not args.no_ag, captions=args.captions,
                     resume=args.resume)
    print(format_table(rows, markdown=False))
    print(f"wrote {out_dir / 'sweep.md'}, {out_dir / 'sweep.json'}, {out_dir / 'sweep_front.png'}")
    return 0


def _budget(text: str) -> float:
    """Passes per token in [1, 2]."""
    value = _finite_float(text)
    if not 1.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"expected passes per token in [1, 2], got {text}")
    return value


def _load_token_policies(paths) -> list:
    from agsearch.policy import Policy
    from agsearch.tokens import check_token_policy

    policies = []
    for path in paths:
        policy = Policy.load(path)
        try:
            check_token_policy(policy)
        except PolicyError as e:
            raise PolicyError(e.reason, e.pointer, str(path)) from None
        policies.append(policy)
    return policies


def cmd_ar_search(args) -> int:
    from agsearch.search.tokens import search_token_policy

    if args.out.exists() and args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder")
    if not 1.0 < args.scale <= 8.0:
        raise UserError(f"--scale must be in (1, 8] (the teacher's CFG scale), got {args.scale:g}")
    policy, seconds, _ = search_token_policy(args.budget, args.scale, steps=args.steps, seed=args.seed,
                                             progress=not args.no_progress)
    policy.save(args.out)
    print(f"{policy.ops_string()}: {policy.nfe / 64:.3f} passes per token, searched in {seconds:.0f}s; wrote {args.out}")
    return 0


def cmd_ar_front(args) -> int:
    from agsearch.eval.tokens_front import run_front

    extra = _load_token_policies(args.policy)  # refused before any work
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise UserError(f"--out-dir {args.out_dir} is a file")
    if not 1.0 < args.scale <= 8.0:
        raise UserError(f"--scale must be in (1, 8] (the teacher's CFG scale), got {args.scale:g}")
    import shlex

    argv = sys.argv[2:] if sys.argv[1:2] == ["ar-front"] else []  # as the shapes benchmark records its command
    command = " ".join(["agsearch", "ar-front", *map(shlex.quote, argv)])
    run_front(args.out_dir, args.samples, args.seed, args.scale, tuple(args.budgets), search_steps=args.search_steps,
              cca_lam=args.cca_lam, cca_steps=args.cca_steps, device=args.device, command=command,
              extra=extra)
    print(f"wrote {args.out_dir / 'front.md'}, front.json, front.png and policies/")
    return 0


def cmd_generate(args) -> int:
    from agsearch.diffusers.generate import (
        EDITING,
        VIDEO,
        Prompt,
        generate,
        load_pipeline,
        output_paths,
        pipeline_class,
        read_image,
        read_prompts,
        write_images,
    )
    from agsearch.policy import Policy

    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("give exactly one of --prompt and --prompt-file")
    name = pipeline_class(args.pipeline)
    video = name in VIDEO
    if (name in EDITING) != (args.image is not None):
        raise UserError(f"--image is {'required' if name in EDITING else 'only for editing pipelines'}: "
                        f"{name} {'edits an input image' if name in EDITING else 'takes no input image'}")
    if args.image_scale is not None and name not in EDITING:
        raise UserError("--image-scale is for editing pipelines (InstructPix2Pix)")
    if name in EDITING and (args.height is not None or args.width is not None):
        raise UserError("--height and --width do not apply to an editing pipeline: the edit has the input image's size")
    suffix = ".gif" if video else ".png"
    if args.out.suffix.lower() != suffix:
        raise UserError(f"--out must be a {suffix} file for this {'video' if video else 'image'} pipeline, got {args.out}")
    if args.frames is not None and not video:
        raise UserError("--frames is for video pipelines (Wan)")
    if video and args.clip_weights is not None:
        raise UserError("--clip-weights scores images; this is a video pipeline")
    _check_out(args.out)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        prompts = [Prompt(args.prompt, args.negative_prompt)]
    else:
        prompts = read_prompts(args.prompt_file)
        if args.negative_prompt is not None:
            prompts = [Prompt(p.prompt, p.negative_prompt or args.negative_prompt) for p in prompts]
    for path in output_paths(args.out, len(prompts)) + ([args.json] if args.json else []):
        _check_out(path)
    policy = Policy.load(args.policy)
    if args.scale is not None:  # the scale of full CFG and of cfg steps without their own
        policy = Policy.from_dict({**policy.to_dict(), "guidance_scale": args.scale}, str(args.policy))
    if args.image_scale is not None:
        policy = Policy.from_dict({**policy.to_dict(), "image_guidance_scale": args.image_scale}, str(args.policy))
    policy.require_conditions(2 if name in EDITING else 1, name)
    image = read_image(args.image) if args.image is not None else None
    policy.for_steps(args.steps or policy.num_inference_steps, args.resample)  # before loading the model
    if args.clip_weights is not None:
        from agsearch.eval.clip import check_clip_files

        check_clip_files(args.clip_model, args.clip_weights)  # a ValueError: one line, exit 2
    pipe = load_pipeline(args.pipeline, device=args.device, dtype=args.dtype)
    result = generate(pipe, policy, prompts, seed=args.seed, steps=args.steps, resample=args.resample,
                      reference=not args.no_reference, height=args.height, width=args.width, frames=args.frames,
                      image=image)
    r = result["report"]
    if args.clip_weights is not None:
        from agsearch.eval.clip import ClipScorer

        scorer = ClipScorer.load(args.clip_model, args.clip_weights, device=args.device)
        texts = [p.prompt for p in prompts]
        r["clip_score"] = scorer.score(result["images"], texts).tolist()
        if result["full_cfg_images"] is not None:
            r["full_cfg_clip_score"] = scorer.score(result["full_cfg_images"], texts).tolist()
    paths = write_images(result["images"], args.out)
    nfe = sum(r["nfe_per_image"]) / len(r["nfe_per_image"])
    line = (f"{r['policy']}: NFE {nfe:g} per image of {r['full_cfg_nfe']} for full "
            f"{'two-condition guidance' if name in EDITING else 'CFG'} "
            f"({nfe / r['full_cfg_nfe']:.0%}), {r['seconds']:.2f}s")
    if "speedup" in r:
        mean_psnr = sum(r["psnr_vs_full_cfg"]) / len(r["psnr_vs_full_cfg"])
        line += (f"; full CFG {r['full_cfg_seconds']:.2f}s, speedup {r['speedup']:.2f}x; "
                 f"vs full CFG: MSE {sum(r['mse_vs_full_cfg']) / len(prompts):.3g}, PSNR {mean_psnr:.1f} dB")
    if "clip_score" in r:
        line += f"; CLIP score {sum(r['clip_score']) / len(prompts):.2f}"
        if "full_cfg_clip_score" in r:
            line += f" (full CFG {sum(r['full_cfg_clip_score']) / len(prompts):.2f})"
    print(line)
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(r, indent=2) + "\n")
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agsearch", description="Search, export, apply and evaluate cheap CFG policies.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("baseline", help="write a named training-free baseline policy",
                       description="Write a training-free baseline policy file. --steps and --scale "
                                   "default to the built-in model's benchmark settings.")
    p.add_argument("name", metavar="NAME", help="cfg | cond | cutoff | interval | alternating | ag | linear-ag | "
                                               "affine-cutoff | image-cutoff (editing)")
    p.add_argument("--image-scale", type=_scale, help="an image editor's image guidance scale s_I: writes the "
                                                       "two-condition (InstructPix2Pix) baseline, cfg steps as full "
                                                       "two-condition guidance")
    p.add_argument("--steps", type=_steps, help="sampling steps T")
    p.add_argument("--scale", type=_scale, help="guidance scale w")
    p.add_argument("--fraction", type=_finite_float, help="cutoff, affine-cutoff: CFG for the first round(F*T) steps; "
                   "linear-ag: CFG/affine alternate over the first round(F*T) steps (default 0.5)")
    p.add_argument("--start", type=_finite_float, help="interval: CFG where i/T is in [start, stop)")
    p.add_argument("--stop", type=_finite_float, help="interval: end of the window (exclusive)")
    p.add_argument("--threshold", type=_finite_float,
                   help="ag: cosine threshold (default: the built-in model's calibrated one)")
    p.add_argument("--space", choices=("x0", "eps"), default="x0", help="ag: where the cosine is taken")
    p.add_argument("--affine", type=Path, metavar="COEFFS",
                   help="linear-ag, affine-cutoff: coefficients JSON from fit-affine (default: the built-in model's shipped fit)")
    p.add_argument("--from", dest="base", type=Path, metavar="POLICY",
                   help="linear-ag: start from this static policy and make its cond steps affine (same NFE)")
    p.add_argument("--model", default="digits", help="built-in model whose benchmark settings (steps, scale, "
                   "AG threshold; the image scale for shapes_edit) are the defaults: digits, shapes or shapes_edit")
    p.add_argument("--out", type=Path, required=True, help="policy JSON to write")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("eval", help="evaluate policies side by side on a built-in model",
                       description="Sample each policy from the same noise and report NFE, class accuracy "
                                   "(digits), prompt adherence overall and per caption category (shapes) or "
                                   "edit success and preservation on held-out instructions (shapes_edit), "
                                   "MSE/PSNR against full guidance, Fréchet distance, wall time.")
    p.add_argument("--policy", action="append", type=Path, required=True, help="policy JSON (repeatable)")
    p.add_argument("--model", default="digits", help="built-in model: digits, shapes or shapes_edit (the image editor)")
    p.add_argument("--captions", metavar="SET|FILE",
                   help="shapes: 'heldout' (default: captions with combinations never in training), 'train', "
                        "or a file of captions, one per line, used in order")
    p.add_argument("--samples", type=_samples, default=1000,
                   help="samples per policy (digits: balanced classes; shapes: categories in turn)")
    p.add_argument("--seed", type=_seed, default=1,
                   help="noise seed: sample i uses seed*10^6+i (search seeds use 0, so 1+ are held out)")
    p.add_argument("--steps", type=_steps, help="sampling steps (default: benchmark's)")
    p.add_argument("--resample", action="store_true", help="map a policy with another step count by position")
    p.add_argument("--scheduler", choices=("ddim", "euler", "dpm++"), default="ddim")
    p.add_argument("--batch-size", type=_samples, default=1000)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--json", type=Path, help="write the records as JSON here")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="benchmark every baseline into a markdown table and plots",
                       description="Evaluate full CFG, cond, cutoff and interval sweeps, alternating "
                                   "and AG at several thresholds; write benchmark.md/.json and PNG fronts "
                                   "(shapes: on training and on held-out captions, with a sample grid; "
                                   "shapes_edit: two-condition baselines on held-out instructions).")
    p.add_argument("--model", default="digits",
                   help="built-in model: digits (one table), shapes (training and held-out captions) or "
                        "shapes_edit (the image editor, held-out instructions)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="default results/ (digits), results/shapes/ (shapes), results/shapes_edit/ (shapes_edit)")
    p.add_argument("--samples", type=_samples, default=1000)
    p.add_argument("--seed", type=_seed, default=1)
    p.add_argument("--batch-size", type=_samples, default=1000)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--quick", action="store_true", help="a few policies only (smoke test)")
    p.add_argument("--policy", action="append", type=Path, default=[],
                   help="also evaluate this policy file (repeatable; e.g. searched policies)")
    p.add_argument("--families", nargs="+", metavar="FAMILY",
                   help="evaluate only these families (e.g. linear-ag affine-cutoff); policy files always run")
    p.add_argument("--merge", action="store_true",
                   help="replace those families' rows in the existing OUT_DIR/benchmark.json instead of a new table")
    p.add_argument("--records", action="append", type=Path, default=[],
                   help="with --merge: add the records of an 'agsearch eval --json' run (same samples, seed, scheduler)")
    p.add_argument("--resume", action="store_true",
                   help="shapes, shapes_edit: go on from the checkpoint an interrupted run of the same protocol left "
                        "(OUT_DIR/benchmark.SET.partial.json, written every 8 policies) instead of starting over")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("fit-affine", help="fit LinearAG coefficients (ε_u from past estimates) on teacher trajectories",
                       description="Run full-CFG teacher trajectories on (seed, condition) pairs of a built-in model "
                                   "(digits: balanced classes; shapes: training captions), fit "
                                   "per-step ridge coefficients predicting the unconditional prediction from eps_c(t), "
                                   "eps_c(t-1), eps_u(t-1), x_t and a bias, and report the held-out R² per step.")
    p.add_argument("--model", default="digits", help="built-in model: digits or shapes (at its benchmark settings)")
    p.add_argument("--pairs", type=_samples, default=200, help="teacher trajectories to fit on")
    p.add_argument("--heldout", type=_samples, default=100, help="trajectories for the held-out R²")
    p.add_argument("--seed", type=_seed, default=0, help="noise seed S of the fit pairs (the search's: 0; 1 is the evaluation's)")
    p.add_argument("--heldout-seed", type=_seed, default=3, help="noise seed of the held-out pairs (search validation: 3)")
    p.add_argument("--ridge", type=_nonneg_float, default=1e-4, help="ridge λ relative to the mean diagonal of XᵀX")
    p.add_argument("--per-channel", action="store_true", help="one coefficient per channel instead of scalars")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--out", type=Path, required=True, help="coefficients JSON to write")
    p.add_argument("--policy", type=Path, help="also write the linear-ag baseline policy with these coefficients")
    p.add_argument("--report", type=Path, help="also write the per-step R² table as markdown")
    p.set_defaults(func=cmd_fit_affine)

    sub.add_parser("search", add_help=False, help="search a guidance policy (LightningCLI; see 'agsearch search --help')")
    sub.add_parser("cca", add_help=False, help="CCA fine-tune of the AR digits model (LightningCLI; see 'agsearch cca --help')")

    p = sub.add_parser("export", help="export a search checkpoint as a policy JSON at a budget",
                       description="Discretise the gates of a search checkpoint into a policy file.")
    p.add_argument("checkpoint", type=Path, help="a search checkpoint (e.g. <run>/checkpoints/last.ckpt)")
    p.add_argument("--budget", type=int, help="NFE per sample to meet exactly (default: the search's budget)")
    p.add_argument("--mode", choices=("exact", "argmax"), default="exact",
                   help="exact: meet the budget exactly; argmax: the most probable op per step")
    p.add_argument("--out", type=Path, required=True, help="policy JSON to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="search several budgets; one table and front plot against the baselines",
                       description="Run one search per space and budget, then evaluate them beside full CFG, "
                                   "cond, the cutoff, the best of all guidance intervals and AG at the same NFE. "
                                   "Arguments after '--' go to every search (e.g. -- --trainer.max_steps=96).")
    p.add_argument("--budgets", type=_int_up_to(2 * MAX_STEPS, "NFE"), nargs="+", default=[30, 35, 40, 45], help="NFE budgets")
    p.add_argument("--spaces", nargs="+", default=["minimal"], help="search spaces (names or YAML files)")
    p.add_argument("--samples", type=_samples, default=1000, help="held-out samples per policy")
    p.add_argument("--seed", type=_seed, default=1, help="held-out noise seed")
    p.add_argument("--batch-size", type=_samples, default=1000)
    p.add_argument("--out-dir", type=Path, default=None,
                   help="default: results/shapes/sweep (results/search with -- --model.model=digits)")
    p.add_argument("--captions", choices=("heldout", "train"), default="heldout",
                   help="shapes (the default model): the caption set to evaluate on")
    p.add_argument("--resume", action="store_true",
                   help="take the policy an earlier sweep wrote in OUT_DIR/policies for a space and budget "
                        "instead of searching it again")
    p.add_argument("--no-ag", action="store_true", help="skip matching the AG rule to each budget")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("generate", help="sample a local diffusers pipeline under a policy; NFE/time vs full CFG",
                       description="Load a pipeline folder (save_pretrained layout, nothing downloaded: SD 1.x/2.x, "
                                   "SDXL, SD3, PixArt, Sana, Wan (a GIF per prompt), Flux, Qwen-Image), sample "
                                   "under the policy with apply_policy, then under full CFG from the same noise, "
                                   "and report NFE, time and PSNR.")
    p.add_argument("--pipeline", required=True,
                   help="diffusers pipeline folder, or builtin:shapes (the built-in text-to-image model)")
    p.add_argument("--policy", type=Path, required=True, help="policy JSON")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--prompt-file", type=Path, help="prompts: one per line, or JSONL with prompt/negative_prompt")
    p.add_argument("--negative-prompt", help="negative prompt (used on CFG steps only)")
    p.add_argument("--image", type=Path, help="editing pipelines (InstructPix2Pix): the input image to edit "
                                               "by each prompt (an instruction)")
    p.add_argument("--image-scale", type=_scale, help="editing pipelines: the image guidance scale s_I "
                                                       "(default: the policy's)")
    p.add_argument("--seed", type=_seed, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=_steps, help="sampling steps (default: the policy's)")
    p.add_argument("--scale", type=_scale, help="guidance scale (default: the policy's)")
    p.add_argument("--resample", action="store_true", help="map a policy with another step count by position")
    p.add_argument("--height", type=_image_side, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=_image_side, help="image width (default: the pipeline's)")
    p.add_argument("--frames", type=_frames, help="video pipelines: frames, 4k + 1 (default: the pipeline's)")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--no-reference", action="store_true", help="skip the full-CFG reference call")
    p.add_argument("--clip-weights", type=Path, help="open-clip weights file: also report CLIP scores")
    p.add_argument("--clip-model", default="ViT-B-32", help="open-clip model name of --clip-weights")
    p.add_argument("--json", type=Path, help="write the NFE/time report as JSON here")
    p.add_argument("--out", type=Path, required=True,
                   help="PNG to write (a GIF for a video pipeline; <stem>-<i>.png for several prompts)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ar-search", help="search a token policy (per-token gates and scales) for the AR digits model",
                       description="Train per-token gates and scales against full CFG under a budget of passes "
                                   "per token (straight-through Gumbel rollouts, sequence-level KL), and write the "
                                   "policy file (axis tokens).")
    p.add_argument("--budget", type=_budget, default=1.25, help="passes per token, in [1, 2]")
    p.add_argument("--scale", type=_finite_float, default=3.0, help="the teacher's CFG scale")
    p.add_argument("--steps", type=_int_up_to(100_000, "steps"), default=100, help="training steps")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", type=Path, required=True, help="the policy file to write")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ar_search)

    p = sub.add_parser("ar-front", help="AR model: guidance policies and CCA on one front of quality vs passes per token",
                       description="Evaluate full CFG, token cutoffs, the per-sample divergence rule, searched "
                                   "token policies, CCA without guidance and CCA with the same policies, on the "
                                   "same held-out classes and seeds; write front.md, front.json, front.png.")
    p.add_argument("--samples", type=_int_up_to(MAX_SAMPLES, "samples"), default=1000)
    p.add_argument("--seed", type=_seed, default=1, help="held-out sampling seed")
    p.add_argument("--scale", type=_finite_float, default=3.0, help="CFG scale of the teacher and the policies")
    p.add_argument("--budgets", type=_budget, nargs="+", default=[1.25, 1.5],
                   help="passes per token: one searched policy each, and a 'best at' row each")
    p.add_argument("--search-steps", type=_int_up_to(100_000, "steps"), default=100)
    p.add_argument("--cca-lam", type=_nonneg_float, default=1.0)
    p.add_argument("--cca-steps", type=_int_up_to(100_000, "steps"), default=80)
    p.add_argument("--policy", type=Path, action="append", default=[], help="a token policy file to add (repeatable)")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--out-dir", type=Path, default=Path("results/ar_front"))
    p.set_defaults(func=cmd_ar_front)

    p = sub.add_parser("show", help="validate policy files and print a one-line summary of each")
    p.add_argument("policy", nargs="+", type=Path)
    p.set_defaults(func=cmd_show)
    return parser


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (``kill``, a job scheduler's stop) ends a command as Ctrl-C does: exit 130, one line
    saying what was kept. (Lightning only logs a SIGTERM and trains on; it calls this handler too.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    with terminate_as_interrupt():
        return _main(argv)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["search"]:  # LightningCLI parses its own arguments
        from agsearch.cli.search import search_main

        return search_main(argv[1:])
    if argv[:1] == ["cca"]:  # LightningCLI too
        from agsearch.cli.cca import cca_main

        return cca_main(argv[1:])
    overrides: list[str] = []
    if argv[:1] == ["sweep"] and "--" in argv:  # the rest goes to every search
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.overrides = overrides
        if args.command is None:
            parser.print_help()
            return 0
        return args.func(args)
    except ValueError as e:  # UserError, PolicyError, SpaceError, CaptionError, ...
        print(f"agsearch: error: {printable(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"agsearch: error: {printable(e.strerror or e)}{printable(where)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
