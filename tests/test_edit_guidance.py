"""Two-condition guidance (image editing, InstructPix2Pix): the ops, the policy file, the sampler and
``apply_policy`` on diffusers' ``StableDiffusionInstructPix2PixPipeline``, on a tiny pipeline built in code."""

from __future__ import annotations

import json

import copy

import pytest
import torch

from agsearch.denoisers.edit import EditCondition, UNetEditDenoiser
from agsearch.diffusers.hook import apply_policy
from agsearch.guidance.ops import edit_output
from agsearch.guidance.sampler import Resume, sample, sample_edit
from agsearch.policy import Policy, PolicyError
from agsearch.testing import tiny_instruct_pix2pix

S_T, S_I = 7.5, 1.5
PROMPTS = ["make the circle blue", "remove the cross", "add a red square"]


def edit_policy(ops, **kwargs) -> Policy:
    return Policy.static(ops, S_T, image_guidance_scale=S_I, conditions=2, **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return tiny_instruct_pix2pix()


@pytest.fixture(scope="module")
def images():
    return torch.rand(len(PROMPTS), 3, 64, 64, generator=torch.Generator().manual_seed(3))


def call(pipe, images, steps=4, **kwargs):
    kwargs = {"guidance_scale": S_T, "image_guidance_scale": S_I, **kwargs}
    return pipe(PROMPTS, image=images, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="latent", **kwargs).images


class RowCounter:
    """Rows the UNet's first layer sees, per call."""

    def __init__(self, unet):
        self.rows = []
        self.handle = unet.conv_in.register_forward_hook(lambda m, args, out: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- the ops and the policy file ------------------------------------------------------------------
def test_text_and_joint_are_edit_at_tied_scales():
    g = torch.Generator().manual_seed(0)
    full, image, none = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    edit = lambda s_t, s_i: edit_output({"op": "edit"}, full, image, none, s_t, s_i)  # noqa: E731
    assert torch.allclose(edit_output({"op": "text"}, full, image, none, S_T, S_I), edit(S_T, 1.0), atol=1e-5)
    assert torch.allclose(edit_output({"op": "joint"}, full, image, none, S_T, S_I), edit(S_I, S_I), atol=1e-5)
    assert torch.allclose(edit_output({"op": "joint", "scale": 3.0}, full, image, none, S_T, S_I), edit(3.0, 3.0),
                          atol=1e-5)
    assert torch.equal(edit_output({"op": "cond"}, full, image, none, S_T, S_I), full)
    assert torch.allclose(edit_output({"op": "edit", "scale": 2.0, "image_scale": 1.0}, full, image, none, S_T, S_I),
                          edit(2.0, 1.0))


def test_an_edit_policy_file_round_trips_and_counts_three_passes(tmp_path):
    policy = edit_policy(["edit", {"op": "edit", "scale": 5.0, "image_scale": 1.2}, "text", "joint", "cond"])
    assert policy.nfe == 3 + 3 + 2 + 2 + 1 and policy.ops_string() == "EETJc" and policy.max_nfe == 11
    path = policy.save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert doc["conditions"] == 2 and doc["image_guidance_scale"] == S_I and doc["nfe"] == 11
    again = Policy.load(path)
    assert again.to_dict() == policy.to_dict() and again.image_scale_at(1) == 1.2 and again.image_scale_at(0) == S_I
    assert Policy.adaptive(5, S_T, 0.99, image_guidance_scale=S_I, conditions=2).max_nfe == 15
    assert edit_policy(["edit", "cond"]).resample(4).ops_string() == "EEcc"


@pytest.mark.parametrize("change, pointer, words", [
    (lambda d: d.update(conditions=1, image_guidance_scale=None) or d.pop("image_guidance_scale"),
     "/steps/0/op", "two-condition (image editing) op"),
    (lambda d: d["steps"].__setitem__(0, {"op": "cfg"}), "/steps/0/op", "one-condition op"),
    (lambda d: d.pop("image_guidance_scale"), "", "image_guidance_scale"),
    (lambda d: d["steps"].__setitem__(1, {"op": "text", "image_scale": 2.0}), "/steps/1", "only allowed on 'edit'"),
    (lambda d: d.update(nfe=4), "/nfe", "cost 5"),
])
def test_bad_edit_policies_are_refused_with_their_field(change, pointer, words):
    doc = edit_policy(["edit", "text"]).to_dict()
    change(doc)
    with pytest.raises(PolicyError) as e:
        Policy.from_dict(doc)
    assert e.value.pointer == pointer and words in str(e.value)


def test_one_condition_policies_refuse_the_image_scale_and_edit_rules_refuse_scales():
    with pytest.raises(PolicyError, match="conditions"):
        Policy.static(["cfg"], 3.0, image_guidance_scale=1.5)
    with pytest.raises(PolicyError, match="not supported on a two-condition rule"):
        Policy.adaptive(4, S_T, 0.9, scales=[2.0] * 4, image_guidance_scale=S_I, conditions=2)


# -- apply_policy on the InstructPix2Pix pipeline --------------------------------------------------------
def test_full_guidance_reproduces_the_plain_pipeline_call_and_counts_every_row(pipe, images):
    plain = call(pipe, images)
    for call_scales in ({}, {"guidance_scale": 2.0, "image_guidance_scale": 1.2}):  # own forward / the hook's sum
        with RowCounter(pipe.unet) as rows, apply_policy(pipe, edit_policy(["edit"] * 4)) as runner:
            out = call(pipe, images, **call_scales)
        assert torch.equal(out, plain)
        assert rows.rows == [9] * 4 and runner.forward_rows == 36 and runner.nfe.tolist() == [12.0] * 3


def test_cheaper_steps_shrink_the_three_way_batch_to_the_policy_nfe(pipe, images):
    policy = edit_policy(["edit", "text", "joint", "cond", "cond"])
    with RowCounter(pipe.unet) as rows, apply_policy(pipe, policy) as runner:
        call(pipe, images, steps=5)
    assert rows.rows == [9, 6, 6, 3, 3] and sum(rows.rows) == policy.nfe * len(PROMPTS)
    assert runner.nfe.tolist() == [policy.nfe] * 3 and runner.ops[1] == ["text"] * 3


def test_a_cond_policy_is_the_unguided_call_and_the_pipeline_is_restored(pipe, images):
    before = (dict(pipe.unet.__dict__), dict(pipe.scheduler.__dict__))
    with apply_policy(pipe, edit_policy(["cond"] * 4)):
        out = call(pipe, images)
    assert torch.equal(out, call(pipe, images, guidance_scale=1.0))
    assert "forward" not in pipe.unet.__dict__ and "step" not in pipe.scheduler.__dict__
    assert set(pipe.unet.__dict__) == set(before[0]) and set(pipe.scheduler.__dict__) == set(before[1])


def test_the_adaptive_rule_stops_per_sample_and_counts_what_ran(pipe, images):
    with RowCounter(pipe.unet) as rows, apply_policy(pipe, Policy.adaptive(4, S_T, 0.0, image_guidance_scale=S_I,
                                                                           conditions=2)) as runner:
        call(pipe, images)
    assert rows.rows[0] == 9 and sum(rows.rows) == runner.nfe.sum()
    assert runner.nfe.tolist() == [3 + 3 * 1] * 3  # γ ≥ 0 at step 0: cond from step 1 on
    with apply_policy(pipe, Policy.adaptive(4, S_T, 1.0, image_guidance_scale=S_I, conditions=2)) as runner:
        out = call(pipe, images)
    assert torch.equal(out, call(pipe, images)) and runner.nfe.tolist() == [12.0] * 3  # θ = 1 never stops
    assert all(torch.isfinite(g).all() for g in runner.gammas)


def test_wrong_conditions_and_missing_batches_are_errors(pipe, images):
    from agsearch.testing import tiny_sd

    with pytest.raises(PolicyError, match="one-condition policy cannot run on StableDiffusionInstructPix2PixPipeline"):
        with apply_policy(pipe, Policy.static(["cfg"] * 4, S_T)):
            pass
    with pytest.raises(PolicyError, match="two-condition"):
        with apply_policy(tiny_sd(), edit_policy(["edit"] * 4)):
            pass
    with pytest.raises(ValueError, match="three-way batch"), apply_policy(pipe, edit_policy(["edit"] * 4)):
        call(pipe, images, guidance_scale=1.0)


# -- the sampler -------------------------------------------------------------------------------------
def test_sample_edit_matches_the_pipeline_under_the_same_policy(images):
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_instruct_pix2pix()
    pipe.scheduler = scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # no added noise
    noise = torch.randn(len(PROMPTS), 4, 32, 32, generator=torch.Generator().manual_seed(1))
    cond = EditCondition.from_pipeline(pipe, PROMPTS, pipe.image_processor.preprocess(images))
    denoiser = UNetEditDenoiser(pipe.unet)
    for policy in (edit_policy(["edit", "text", "joint", "cond"]),
                   Policy.adaptive(4, S_T, 0.5, image_guidance_scale=S_I, conditions=2)):
        with apply_policy(pipe, policy) as runner:
            expected = pipe(PROMPTS, image=images, num_inference_steps=4, latents=noise, guidance_scale=S_T,
                            image_guidance_scale=S_I, output_type="latent").images
        denoiser.evaluations = 0
        out = sample_edit(denoiser, scheduler, policy, noise, cond)
        assert torch.allclose(out.samples, expected, atol=1e-5)
        assert out.nfe.tolist() == runner.nfe.tolist() and denoiser.evaluations == runner.forward_rows
    policy = edit_policy(["edit", "cond", "joint", "text"])
    assert torch.equal(sample(denoiser, scheduler, policy, noise, cond).samples,  # the one entry point
                       sample_edit(denoiser, scheduler, policy, noise, cond).samples)
    paused = {}
    whole = sample_edit(denoiser, scheduler, policy, noise, cond, callback=lambda stats: paused.setdefault(
        stats.i, Resume(stats.i, stats.x, copy.deepcopy(stats.scheduler))))
    resumed = sample(denoiser, scheduler, policy, noise, cond, resume=paused[2])  # the search's polish resumes
    assert torch.allclose(resumed.samples, whole.samples, atol=1e-6) and resumed.nfe.tolist() == [4.0] * len(PROMPTS)
    with pytest.raises(PolicyError, match="one-condition policy cannot run on an image editor"):
        sample(denoiser, scheduler, Policy.static(["cfg"] * 4, S_T), noise, cond)
    from agsearch.denoisers.text import UNetTextDenoiser

    with pytest.raises(PolicyError, match="two-condition .* cannot run on a one-condition denoiser"):
        sample(UNetTextDenoiser(pipe.unet), scheduler, policy, noise, cond)


# -- agsearch generate on an editing pipeline ------------------------------------------------------------
@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("edit")
    tiny_instruct_pix2pix().save_pretrained(root / "ip2p")
    edit_policy(["edit", "edit", "text", "cond"]).save(root / "policy.json")
    Policy.static(["cfg"] * 4, S_T).save(root / "t2i.json")
    Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()).save(root / "input.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def run_cli(capsys, *argv):
    from agsearch.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_edits_an_input_image_and_reports_nfe(edit_folder, tmp_path, capsys):
    out, report = tmp_path / "edit.png", tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "generate", "--pipeline", edit_folder / "ip2p", "--policy",
                                edit_folder / "policy.json", "--image", edit_folder / "input.png",
                                "--prompt", "make the circle blue", "--json", report, "--out", out)
    assert code == 0, err
    assert "EETc: NFE 9 per image of 12 for full two-condition guidance (75%)" in stdout and "PSNR" in stdout
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    r = json.loads(report.read_text())
    assert r["nfe_per_image"] == [9.0] and r["image_guidance_scale"] == S_I and r["mse_vs_full_cfg"][0] > 0


@pytest.mark.parametrize("case, fragment", [
    ("no-image", "--image is required"),
    ("unreadable", "broken.png: not a readable image"),
    ("missing-image", "no such image file"),
    ("one-condition", "a one-condition policy cannot run on StableDiffusionInstructPix2PixPipeline"),
    ("height", "--height and --width do not apply"),
])
def test_generate_bad_edit_input_is_one_line_and_writes_nothing(edit_folder, tmp_path, capsys, case, fragment):
    extra = {"no-image": [], "unreadable": ["--image", edit_folder / "broken.png"],
             "missing-image": ["--image", tmp_path / "nope.png"]}.get(case, ["--image", edit_folder / "input.png"])
    policy = edit_folder / ("t2i.json" if case == "one-condition" else "policy.json")
    if case == "height":
        extra += ["--height", 32]
    out = tmp_path / "edit.png"
    code, _, err = run_cli(capsys, "generate", "--pipeline", edit_folder / "ip2p", "--policy", policy, *extra,
                           "--prompt", "remove the cross", "--out", out)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_editing_baselines_guide_with_edit_and_count_three_passes(tmp_path, capsys):
    from agsearch.baselines import make_baseline

    assert make_baseline("cutoff", 10, S_T, fraction=0.4, image_scale=S_I).ops_string() == "EEEEcccccc"
    assert make_baseline("image-cutoff", 10, S_T, fraction=0.4, image_scale=S_I).nfe == 4 * 3 + 6 * 2
    ag = make_baseline("ag", 10, S_T, threshold=0.99, image_scale=S_I)
    assert ag.conditions == 2 and ag.max_nfe == 30
    code, stdout, _ = run_cli(capsys, "baseline", "interval", "--image-scale", S_I, "--scale", S_T, "--steps", 10,
                              "--start", 0.2, "--stop", 0.6, "--out", tmp_path / "i.json")
    assert code == 0 and "NFE 18 of 30" in stdout and Policy.load(tmp_path / "i.json").ops_string() == "ccEEEEcccc"
    for argv in (["linear-ag", "--image-scale", S_I], ["image-cutoff", "--fraction", 0.5]):
        code, _, err = run_cli(capsys, "baseline", *argv, "--out", tmp_path / "bad.json")
        assert code == 2 and "two-condition" in err and not (tmp_path / "bad.json").exists()
