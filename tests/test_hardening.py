"""Hostile input: every case is refused up front with exit code 2 and one line, nothing written."""

import json
import os
from pathlib import Path

import pytest

from agsearch.cli import main

POLICY = {"format": "agsearch.policy", "version": 1, "kind": "static", "num_inference_steps": 2,
          "guidance_scale": 1.5, "steps": [{"op": "cfg"}, {"op": "cond"}]}


def refused(capsys, argv, *needles, tmp_path=None):
    """Run the CLI; assert exit 2, one line on stderr containing every needle, no traceback, and
    (with ``tmp_path``) that it left the folder as it was."""
    before = sorted(os.listdir(tmp_path)) if tmp_path is not None else None
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    if tmp_path is not None:
        assert sorted(os.listdir(tmp_path)) == before
    return err


def write_policy(tmp_path, text: str, name: str = "p.json"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- policy files: bounded reads, numbers the sampler can run -------------------------------------------
def test_an_endless_file_is_refused_without_reading_it(capsys):
    refused(capsys, ["show", "/dev/zero"], "/dev/zero", "larger than the limit of 16 MiB")


@pytest.mark.parametrize("field, value, needle", [
    ("num_inference_steps", "25.0", "expected an integer step count"),
    ("num_inference_steps", "1000000000", "<= 1000"),
    ("guidance_scale", "9" * 401, "<= 100"),
    ("guidance_scale", "1e308", "<= 100"),
    ("guidance_scale", "9" * 5000, "more than 4300 digits"),  # beyond the digits Python converts
], ids=["float-steps", "huge-steps", "401-digit-scale", "1e308-scale", "5000-digit-scale"])
def test_numbers_the_sampler_cannot_run_are_refused_by_the_loader(tmp_path, capsys, field, value, needle):
    text = json.dumps(POLICY).replace(f'"{field}": {json.dumps(POLICY[field])}', f'"{field}": {value}')
    assert value in text
    path = write_policy(tmp_path, text)
    err = refused(capsys, ["show", path], path, needle)
    assert len(err) < 300


@pytest.mark.parametrize("step", [{"op": "cfg", "scale": 1e6}, {"op": "cfg", "scale": 101}])
def test_a_step_scale_out_of_range_is_refused(tmp_path, capsys, step):
    path = write_policy(tmp_path, json.dumps({**POLICY, "steps": [step, {"op": "cond"}]}))
    refused(capsys, ["show", path], "/steps/0/scale", "<= 100")


def test_stop_scales_out_of_range_are_refused(tmp_path, capsys):
    adaptive = {"format": "agsearch.policy", "version": 1, "kind": "adaptive", "num_inference_steps": 2,
                "guidance_scale": 1.5, "rule": {"rule": "ag_cosine", "threshold": 0.99, "stop_scales": [1.5, 1e9]}}
    path = write_policy(tmp_path, json.dumps(adaptive))
    refused(capsys, ["show", path], "/rule/stop_scales/1", "<= 100")


# -- options: bounded sizes, devices that exist -----------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["baseline", "cutoff", "--steps", "1000000000", "--fraction", "0.5"], "limit of 1,000"),
    (["baseline", "cfg", "--scale", "1e308"], "guidance scale <= 100"),
    (["baseline", "cfg", "--scale", "nan"], "finite"),
])
def test_baseline_options_out_of_range(tmp_path, capsys, argv, needle):
    refused(capsys, [*argv, "--out", str(tmp_path / "p.json")], needle, tmp_path=tmp_path)


@pytest.mark.parametrize("extra, needle", [
    (["--samples", "1000000000000"], "limit of 100,000"),
    (["--batch-size", "0"], "positive integer"),
    (["--device", "foo"], "'foo' is not a device"),
    (["--device", "meta"], "expected cpu, cuda"),
    (["--steps", "0"], "positive integer"),
    (["--samples=--"], "got '--'"),  # argparse alone would read it as the end of the options: samples=[]
])
def test_eval_options_out_of_range(tmp_path, capsys, extra, needle):
    policy = write_policy(tmp_path, json.dumps(POLICY))
    refused(capsys, ["eval", "--policy", policy, "--json", str(tmp_path / "out.json"), *extra], needle,
            tmp_path=tmp_path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    policy = write_policy(tmp_path, json.dumps(POLICY))
    refused(capsys, ["eval", "--policy", policy, "--device", "cuda"], "no CUDA GPU")


@pytest.mark.parametrize("extra, needle", [
    (["--height", "100000", "--width", "100000"], "limit of 4,096"),
    (["--height", "100"], "multiple of 8"),
    (["--scale", "1e308"], "guidance scale <= 100"),
])
def test_generate_options_out_of_range(tmp_path, capsys, extra, needle):
    policy = write_policy(tmp_path, json.dumps(POLICY))
    refused(capsys, ["generate", "--pipeline", "builtin:shapes", "--policy", policy, "--prompt", "a red circle",
                     "--out", str(tmp_path / "x.png"), *extra], needle, tmp_path=tmp_path)


def test_search_refuses_zero_steps_instead_of_running_the_default(tmp_path, capsys):
    refused(capsys, ["search", "--model.num_inference_steps=0", f"--trainer.default_root_dir={tmp_path}"],
            "model.num_inference_steps", "but got 0", tmp_path=tmp_path)


# -- nothing left behind ------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--eval.samples=1"], "eval.samples"),
    (["--eval.batch_size=0"], "eval.batch_size"),
    (["--model.budget=1000"], "model.budget"),
])
def test_a_refused_search_leaves_no_run_directory(tmp_path, capsys, extra, needle):
    refused(capsys, ["search", f"--trainer.default_root_dir={tmp_path}", *extra], needle, tmp_path=tmp_path)


@pytest.mark.parametrize("option, needle", [
    ("--model.beta=-1", "beta > 0"), ("--model.lam=-1", "lam"), ("--model.null_ratio=1.5", "null_ratio"),
    ("--data.batch_size=1", "data.batch_size"), ("--eval.samples=1", "eval.samples"),
])
def test_a_refused_cca_run_leaves_no_output_directory(tmp_path, capsys, option, needle):
    refused(capsys, ["cca", option, f"--out={tmp_path / 'cca'}"], needle, tmp_path=tmp_path)


def test_a_pickle_as_checkpoint_is_refused_before_the_run_directory_is_touched(tmp_path, capsys):
    import pickle

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ckpt.write_bytes(pickle.dumps(Payload()))
    refused(capsys, ["search", f"--ckpt_path={ckpt}"], "not a readable search checkpoint", tmp_path=tmp_path)
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "last.ckpt"]  # no config.yaml, no wandb/
    refused(capsys, ["export", str(ckpt), "--out", str(tmp_path / "p.json")], "not a readable search checkpoint")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "p.json").exists()


def test_exporting_gates_of_another_shape_is_refused(tmp_path, capsys):
    import torch

    ckpt = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"gate_logits": torch.zeros(3, 2)},
                "hyper_parameters": {"space": "minimal", "num_inference_steps": 5, "budget": 7}}, ckpt)
    refused(capsys, ["export", str(ckpt), "--out", str(tmp_path / "p.json")], "does not fit its settings")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_pipeline_folder_with_broken_unet_weights_is_refused_by_search(tmp_path, capsys, damage):
    from agsearch.testing import tiny_sd

    tiny_sd().save_pretrained(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red cube\n")
    weights = tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    capsys.readouterr()  # save_pretrained's progress bar
    refused(capsys, ["search", f"--model.pipeline={tmp_path / 'sd'}", f"--model.prompts={tmp_path / 'prompts.txt'}",
                     f"--trainer.default_root_dir={tmp_path / 'runs'}"], "unet", tmp_path=tmp_path)


@pytest.mark.parametrize("command", ["eval", "baseline"])
def test_an_output_path_under_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    (tmp_path / "file.txt").write_text("x")
    policy = write_policy(tmp_path, json.dumps(POLICY))
    argv = (["eval", "--policy", policy, "--json", str(tmp_path / "file.txt" / "out.json")] if command == "eval"
            else ["baseline", "cfg", "--out", str(tmp_path / "file.txt" / "p.json")])
    refused(capsys, argv, "is a file, not a folder", tmp_path=tmp_path)


# -- resume equals one run ------------------------------------------------------------------------------------
def _stopped_at_step_2(tmp_path, capsys, monkeypatch, *argv):
    """A search (``argv``) that fails at step 2: its checkpoint of the end of epoch 0 (step 2)."""
    from agsearch.search.gates import PolicySearchModule

    real = PolicySearchModule._distance
    monkeypatch.setattr(PolicySearchModule, "_distance",
                        lambda self, a, b: real(self, a, b) * (float("nan") if self.training and self.global_step >= 2 else 1))
    assert main([*argv, f"--trainer.default_root_dir={tmp_path / 'broken'}"]) == 1
    monkeypatch.setattr(PolicySearchModule, "_distance", real)
    capsys.readouterr()
    (run,) = (tmp_path / "broken").iterdir()
    return run / "checkpoints" / "last.ckpt"


TINY_DEFAULT_SPACE = ["search", "--model.model=digits", "--model.num_inference_steps=5", "--model.budget=7", "--data.num_pairs=8",
                      "--data.batch_size=4", "--data.num_val=4", "--trainer.max_steps=4", "--progress=false",
                      "--wandb.mode=disabled", "--eval.samples=0"]  # the default space, cfg_scales


def test_resuming_the_default_space_gives_the_policy_of_one_run(tmp_path, capsys, monkeypatch):
    ckpt = _stopped_at_step_2(tmp_path, capsys, monkeypatch, *TINY_DEFAULT_SPACE)
    assert main([*TINY_DEFAULT_SPACE, f"--ckpt_path={ckpt}", f"--out={tmp_path / 'resumed.json'}"]) == 0
    assert main([*TINY_DEFAULT_SPACE, f"--trainer.default_root_dir={tmp_path / 'whole'}",
                 f"--out={tmp_path / 'whole.json'}"]) == 0
    resumed, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("resumed", "whole"))
    assert resumed["steps"] == whole["steps"] and resumed["metrics"]["search"] == whole["metrics"]["search"]


def test_resuming_with_another_length_is_refused(tmp_path, capsys, monkeypatch):
    ckpt = _stopped_at_step_2(tmp_path, capsys, monkeypatch, *TINY_DEFAULT_SPACE)
    before = sorted(p.name for p in ckpt.parent.parent.rglob("*"))
    refused(capsys, [*TINY_DEFAULT_SPACE, f"--ckpt_path={ckpt}", "--trainer.max_steps=6"],
            "spans 4 steps", "--trainer.max_steps=4")
    assert sorted(p.name for p in ckpt.parent.parent.rglob("*")) == before


# -- a space brings the schedule it needs -------------------------------------------------------------------
def test_an_adaptive_space_alone_runs_its_own_schedule_and_explicit_options_win(tmp_path):
    from agsearch.cli.search import build_cli

    base = ["--model.space=adaptive_cosine", "--wandb.mode=disabled", "--progress=false",
            f"--trainer.default_root_dir={tmp_path}"]
    cli = build_cli(base)
    assert cli.trainer.max_steps == 400 and cli.datamodule.hparams.batch_size == 512
    assert cli.datamodule.hparams.num_pairs == 512 and cli.model.hparams.lr == 0.05
    cli = build_cli([*base, "--trainer.max_steps", "24", "--data.batch_size=32", "--model.lr=0.1"])
    assert cli.trainer.max_steps == 24 and cli.datamodule.hparams.batch_size == 32 and cli.model.hparams.lr == 0.1
    assert cli.datamodule.hparams.num_pairs == 512
    # A gate space has no schedule: the command's defaults.
    cli = build_cli(["--wandb.mode=disabled", "--progress=false", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.max_steps == 12 and cli.datamodule.hparams.batch_size == 32
    assert cli.datamodule.hparams.num_pairs == 128 and cli.datamodule.hparams.num_val == 32


def test_a_bad_schedule_in_a_space_file_is_one_line(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text("name: s\nops: [{op: cfg}, {op: cond}]\nschedule: {max_steps: -3}\n")
    refused(capsys, ["search", f"--model.space={space}", f"--trainer.default_root_dir={tmp_path / 'runs'}"],
            "schedule.max_steps", "positive int")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, needle", [
    (b"", "the file is empty"),
    (b"\x7fELF\x02\x01\x01\x00\xd0\xff", "not a UTF-8 text file"),
    (b"- 1\n- 2\n", "expected a mapping"),
    (b"model: {budget: [1, 2\n", "invalid YAML at line"),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, content, needle):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    refused(capsys, ["search", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'runs'}"],
            str(config), needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command, stop", [("search", "SIGINT"), ("cca", "SIGINT"), ("search", "SIGTERM")])
def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing_or_a_checkpoint(tmp_path, command, stop):
    """A real SIGINT (or a scheduler's SIGTERM, which Lightning alone would only log) to a running
    training command: exit 130, one line saying what was kept."""
    import re
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / ("p.json" if command == "search" else "cca")
    argv = [sys.executable, "-m", "agsearch.cli.main", command, "--trainer.max_steps=100000", "--eval.samples=0",
            "--wandb.mode=disabled", "--progress=false", f"--out={out}", *(["--model.model=digits"] if command == "search" else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # A shell's background job inherits SIGINT ignored, and Python keeps it so: give the child the default back.
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = tmp_path / "runs" / "search" if command == "search" else out
    deadline = time.monotonic() + 120
    while not (runs.is_dir() and any(runs.rglob("*"))) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the fit
    proc.send_signal(getattr(signal, stop))
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()  # the run's own progress lines come first
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert lines[-1].startswith(f"agsearch {command}: interrupted; ") and not any("Interrupt" in ln for ln in lines)
    resume = re.search(r"resume with --ckpt_path (\S+)", lines[-1])
    if resume:
        assert Path(resume.group(1)).is_file()
    else:
        assert "removed" in lines[-1] and not runs.exists() if command == "cca" else not any(runs.glob("*"))


@pytest.mark.parametrize("argv, needle", [
    (["--model", "nosuch"], "nosuch"),
    (["--model", "shapes", "--merge"], "--merge and --records are options of the digits benchmark"),
])
def test_bench_refuses_what_it_cannot_run_before_any_work(tmp_path, capsys, argv, needle):
    refused(capsys, ["bench", *argv, "--out-dir", str(tmp_path / "b")], needle)
    assert not (tmp_path / "b").exists()


def test_bench_into_a_folder_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    refused(capsys, ["bench", "--model", "shapes", "--out-dir", str(tmp_path / "file" / "b")], "is a file, not a folder")


@pytest.mark.parametrize("overrides", [["--model.pipeline=sd15/"], ["--model.pipeline", "sd15/"], ["--model.model=pipeline"]])
def test_a_sweep_on_a_pipeline_folder_is_refused_before_any_search(tmp_path, capsys, overrides):
    refused(capsys, ["sweep", "--out-dir", str(tmp_path / "s"), "--", *overrides], "evaluates on a built-in model",
            tmp_path=tmp_path)


@pytest.mark.parametrize("space, needle", [("", "--spaces: an empty space name"), (".", "--spaces .:"),
                                           ("nope", "--spaces nope: unknown search space 'nope'")])
def test_a_sweep_names_the_bad_space(tmp_path, capsys, space, needle):
    """Found by a property run: an empty name read the current folder as a space file."""
    refused(capsys, ["sweep", "--spaces", space, "--out-dir", str(tmp_path / "out")], needle, tmp_path=tmp_path)
