"""Hostile input: every case is refused up front with exit code 2 and one line, nothing written."""

import json
import os

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
