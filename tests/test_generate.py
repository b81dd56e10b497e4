"""``agsearch generate`` on a tiny SD pipeline saved to a folder, and prompt files."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from agsearch.cli import main  # noqa: E402
from agsearch.diffusers.generate import Prompt, read_prompts  # noqa: E402
from agsearch.policy import Policy  # noqa: E402


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from agsearch.testing import tiny_sd

    root = tmp_path_factory.mktemp("generate")
    tiny_sd().save_pretrained(root / "sd")
    Policy.static(["cfg", "cfg", "cond", "cond"], 5.0).save(root / "policy.json")
    return root


def test_generate_writes_the_image_and_reports_nfe(folder, tmp_path, capsys):
    out, report = tmp_path / "img.png", tmp_path / "r.json"
    code, stdout, err = run(capsys, "generate", "--pipeline", folder / "sd", "--policy", folder / "policy.json",
                            "--prompt", "a red cube", "--negative-prompt", "blurry", "--seed", 3,
                            "--height", 32, "--width", 32, "--json", report, "--out", out)
    assert code == 0, err
    assert "CCcc: NFE 6 per image of 8 for full CFG (75%)" in stdout and "PSNR" in stdout
    from PIL import Image

    assert Image.open(out).size == (32, 32)
    r = json.loads(report.read_text())
    assert r["nfe_per_image"] == [6.0] and r["full_cfg_nfe"] == 8 and r["mse_vs_full_cfg"][0] > 0


def test_generate_prompt_file_gives_one_image_per_prompt(folder, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "negative_prompt": "a dog"}\n\n{"prompt": "a dog"}\n')
    code, stdout, err = run(capsys, "generate", "--pipeline", folder / "sd", "--policy", folder / "policy.json",
                            "--prompt-file", prompts, "--steps", 2, "--resample", "--no-reference",
                            "--height", 32, "--width", 32, "--out", tmp_path / "img.png")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("img-*.png")) == ["img-000.png", "img-001.png"]
    assert "NFE 3 per image of 4" in stdout


@pytest.mark.parametrize("case,fragment", [
    ("missing", "pipeline folder"),
    ("unsupported", "'StableDiffusionImg2ImgPipeline'"),
    ("steps", "policy has 4 steps but the sampler runs 5"),
    ("empty", "the prompt file is empty"),
    ("malformed", "invalid JSON"),
    ("no-prompt", "--prompt is empty"),
    ("not-png", "must be a .png file"),
])
def test_generate_bad_input(folder, tmp_path, capsys, case, fragment):
    pipeline, extra = folder / "sd", ["--prompt", "a red cube"]
    if case == "missing":
        pipeline = tmp_path / "nope"
    elif case == "unsupported":
        pipeline = tmp_path / "i2i"
        pipeline.mkdir()
        (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionImg2ImgPipeline"}')
    elif case == "steps":
        extra += ["--steps", "5"]
    elif case in ("empty", "malformed"):
        path = tmp_path / "prompts.jsonl"
        path.write_text("" if case == "empty" else '{"prompt": "a cat"}\n{"prompt": \n')
        extra = ["--prompt-file", path]
    elif case == "no-prompt":
        extra = ["--prompt", "  "]
    out = tmp_path / ("img.jpg" if case == "not-png" else "img.png")
    code, _, err = run(capsys, "generate", "--pipeline", pipeline, "--policy", folder / "policy.json", *extra,
                       "--out", out)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_read_prompts(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("a cat\n\n  a dog on a beach  \n")
    assert read_prompts(plain) == [Prompt("a cat"), Prompt("a dog on a beach")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "negative_prompt": "blurry"}\n{"prompt": "x", "seed": 1}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: unknown field\(s\) \['seed'\]"):
        read_prompts(jsonl)


def test_generate_reports_clip_scores(folder, tmp_path, capsys):
    pytest.importorskip("open_clip")
    from agsearch.testing import TINY_CLIP_NAME, tiny_clip_weights

    weights = tiny_clip_weights(tmp_path / "clip")
    report = tmp_path / "r.json"
    code, stdout, err = run(capsys, "generate", "--pipeline", folder / "sd", "--policy", folder / "policy.json",
                            "--prompt", "a red cube", "--height", 32, "--width", 32, "--clip-model",
                            TINY_CLIP_NAME, "--clip-weights", weights,
                            "--json", report, "--out", tmp_path / "img.png")
    assert code == 0, err
    assert "CLIP score" in stdout and "(full CFG" in stdout
    r = json.loads(report.read_text())
    assert 0 <= r["clip_score"][0] <= 100 and 0 <= r["full_cfg_clip_score"][0] <= 100


SIZES = {"pixart_sigma": 16, "sana": 32, "wan": 32, "flux": 16, "qwen_image": 32}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_generate_on_the_transformer_pipelines(name, tmp_path, capsys):
    """generate drives each family its own way (true CFG with a negative prompt, video frames to a
    GIF, no resolution binning at a size given), from a saved folder, under a policy."""
    from PIL import Image

    from agsearch import testing

    getattr(testing, f"tiny_{name}")().save_pretrained(tmp_path / name)
    Policy.static(["cfg", "cond"], 4.0).save(tmp_path / "policy.json")
    video = name == "wan"
    out = tmp_path / ("clip.gif" if video else "img.png")
    size = SIZES[name]
    code, stdout, err = run(capsys, "generate", "--pipeline", tmp_path / name, "--policy", tmp_path / "policy.json",
                            "--prompt", "a red circle", "--height", size, "--width", size, "--out", out,
                            *(["--frames", 5] if video else []))
    assert code == 0, err
    assert "Cc: NFE 3 per image of 4 for full CFG (75%)" in stdout and "PSNR" in stdout
    image = Image.open(out)
    assert image.size == (size, size) and getattr(image, "n_frames", 1) == (5 if video else 1)
    code, _, err = run(capsys, "generate", "--pipeline", tmp_path / name, "--policy", tmp_path / "policy.json",
                       "--prompt", "a red circle", "--out", tmp_path / ("x.png" if video else "x.gif"))
    assert code == 2 and ("a .gif file" if video else "a .png file") in err and err.count("\n") == 1


def test_generate_refuses_an_op_the_pipeline_cannot_run(tmp_path, capsys):
    from agsearch import testing

    testing.tiny_flux().save_pretrained(tmp_path / "flux")
    Policy.static(["cfg", "uncond"], 4.0).save(tmp_path / "policy.json")
    out = tmp_path / "img.png"
    capsys.readouterr()  # save_pretrained's progress bar
    code, _, err = run(capsys, "generate", "--pipeline", tmp_path / "flux", "--policy", tmp_path / "policy.json",
                       "--prompt", "a red circle", "--height", 16, "--width", 16, "--out", out)
    assert code == 2 and err.count("\n") == 1 and "uncond steps cannot run in FluxPipeline" in err
    assert not out.exists()
