"""The CLI's contract: exit 0 on success; exit 2 with one line on stderr, no traceback and no
output file on bad input."""

import json
import subprocess
import sys

import pytest

from agsearch.cli import main
from agsearch.policy import Policy


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(code, err):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("agsearch")
    assert "Traceback" not in err


def valid_doc(**over):
    d = {"format": "agsearch.policy", "version": 1, "kind": "static", "num_inference_steps": 25,
         "guidance_scale": 1.5, "steps": [{"op": "cfg"}] * 10 + [{"op": "cond"}] * 15}
    d.update(over)
    return d


@pytest.mark.parametrize("name, options, nfe", [
    ("cfg", [], 50), ("cond", [], 25), ("cutoff", ["--fraction", "0.4"], 35),
    ("interval", ["--start", "0.1", "--stop", "0.5"], 35), ("alternating", [], 38),
])
def test_baseline_writes_policy(tmp_path, capsys, name, options, nfe):
    out = tmp_path / "p.json"
    code, stdout, _ = run(capsys, "baseline", name, *options, "--steps", 25, "--scale", 1.5, "--out", out)
    assert code == 0 and str(out) in stdout
    assert Policy.load(out).nfe == nfe


def test_baseline_defaults_to_benchmark_settings(tmp_path, capsys):
    from agsearch.models.digits import benchmark_settings

    settings = benchmark_settings()
    code, _, _ = run(capsys, "baseline", "ag", "--out", tmp_path / "ag.json")
    assert code == 0
    p = Policy.load(tmp_path / "ag.json")
    assert p.num_inference_steps == settings["num_inference_steps"]
    assert p.guidance_scale == settings["guidance_scale"]
    assert p.rule["threshold"] == settings["ag_threshold"]


BAD_FILES = {
    "invalid_json": "{\"format\": ",
    "unknown_op": json.dumps(valid_doc(steps=[{"op": "maybe"}] * 25)),
    "wrong_type": json.dumps(valid_doc(num_inference_steps="25")),
    "negative_scale": json.dumps(valid_doc(guidance_scale=-1)),
    "nan_scale": json.dumps(valid_doc()).replace("1.5", "NaN"),
    "wrong_steps": json.dumps(valid_doc(num_inference_steps=10, steps=[{"op": "cfg"}] * 10)),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_eval_bad_policy_file(tmp_path, capsys, case):
    path = tmp_path / f"{case}.json"
    path.write_text(BAD_FILES[case])
    out = tmp_path / "records.json"
    code, _, err = run(capsys, "eval", "--policy", path, "--samples", 10, "--json", out)
    assert_bad_input(code, err)
    assert str(path) in err
    assert not out.exists()


def test_eval_unreadable_file(tmp_path, capsys):
    code, _, err = run(capsys, "eval", "--policy", tmp_path / "nope.json", "--samples", 10)
    assert_bad_input(code, err)
    assert "cannot read" in err


@pytest.mark.parametrize("argv, fragment", [
    (["baseline", "sometimes", "--out", "{tmp}/p.json"], "unknown baseline 'sometimes'"),
    (["baseline", "cfg", "--scale", "-1", "--out", "{tmp}/p.json"], "expected a number >= 0"),
    (["baseline", "cfg", "--scale", "nan", "--out", "{tmp}/p.json"], "expected a finite number"),
    (["baseline", "cutoff", "--fraction", "2", "--out", "{tmp}/p.json"], "between 0.0 and 1.0, but got 2.0"),
    (["baseline", "cfg", "--out", "{tmp}"], "is a directory"),
    (["eval", "--policy", "{tmp}/p.json", "--model", "sd99"], "unknown model 'sd99'"),
    (["bench", "--model", "sd99"], "unknown model 'sd99'"),
    (["eval", "--policy", "{tmp}/p.json", "--samples", "0"], "expected a positive integer"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_options(tmp_path, capsys, argv, fragment):
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert_bad_input(code, err)
    assert fragment in err
    assert not (tmp_path / "p.json").exists()


def test_step_mismatch_needs_resample(tmp_path, capsys):
    path = tmp_path / "p10.json"
    path.write_text(json.dumps(valid_doc(num_inference_steps=10, steps=[{"op": "cfg"}] * 10)))
    code, _, err = run(capsys, "eval", "--policy", path, "--samples", 10)
    assert_bad_input(code, err)
    assert "--resample" in err
    code, out, _ = run(capsys, "eval", "--policy", path, "--samples", 10, "--resample", "--no-progress")
    assert code == 0 and "50.00" in out  # resampled to 25 steps of CFG


def test_eval_table_and_json(tmp_path, capsys):
    for name, extra in (("cfg", []), ("cond", []), ("ag", ["--threshold", "0.99"])):
        run(capsys, "baseline", name, *extra, "--out", tmp_path / f"{name}.json")
    out = tmp_path / "records.json"
    code, stdout, _ = run(capsys, "eval", "--policy", tmp_path / "cfg.json", "--policy", tmp_path / "cond.json",
                          "--policy", tmp_path / "ag.json", "--samples", 20, "--json", out, "--no-progress")
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["name"] for r in records] == ["cfg", "cond", "ag-x0-0.99"]
    for key in ("name", "nfe", "accuracy", "mse", "psnr", "fd", "seconds"):
        assert all(key in r for r in records)
    cfg, cond, ag = records
    assert cfg["nfe"] == 50 and cfg["mse"] == 0 and cfg["psnr"] is None
    assert cond["nfe"] == 25 and cond["mse"] > 0 and cond["psnr"] > 0
    assert 25 < ag["nfe"] <= 50
    assert "cond" in stdout and "accuracy" in stdout


def test_show(tmp_path, capsys):
    run(capsys, "baseline", "cutoff", "--fraction", "0.2", "--steps", 10, "--out", tmp_path / "c.json")
    code, out, _ = run(capsys, "show", tmp_path / "c.json")
    assert code == 0 and "CCcccccccc" in out and "NFE 12 of 20" in out


def test_console_script_exit_code_and_single_line():
    """The installed entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "agsearch.cli", "eval", "--policy", "/nonexistent/p.json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
