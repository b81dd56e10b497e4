"""``agsearch search`` on local diffusers pipeline folders: tiny SD and SD3 pipelines built offline
(``agsearch.testing``) and saved with ``save_pretrained``, prompt files, the teacher
against the pipeline's own full-CFG call, and bad input."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from agsearch.cli import main  # noqa: E402
from agsearch.policy import Policy  # noqa: E402

T, W = 4, 5.0
WAN_SIZE = ["--model.height=32", "--model.width=32", "--model.num_frames=5"]  # 2 latent frames of 4×4
PROMPTS = [{"prompt": "a red cube", "negative_prompt": "blurry"}, {"prompt": "a dog"}, {"prompt": "a cat on a mat"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is as fast, and far faster when other jobs load the cores
    (two threads on two busy cores took 60× longer for the teacher here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from agsearch.testing import tiny_pixart_sigma, tiny_sd, tiny_sd3, tiny_sdxl, tiny_wan

    root = tmp_path_factory.mktemp("search-text")
    for name, pipe in (("sd", tiny_sd()), ("sdxl", tiny_sdxl()), ("sd3", tiny_sd3()), ("pixart", tiny_pixart_sigma()),
                       ("wan", tiny_wan())):
        # 16×16 latents by default (the search's latent shape is the pipeline's default), to keep it fast
        if name in ("sd", "sdxl", "sd3"):  # PixArt's tiny transformer: 8×8 latents already; Wan: WAN_SIZE
            (pipe.transformer if name == "sd3" else pipe.unet).register_to_config(sample_size=16)
        pipe.save_pretrained(root / name)
    (root / "prompts.txt").write_text("a red cube\na dog\n\na cat on a mat\n", "utf-8")
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), "utf-8")
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_search(tmp_path, pipeline, prompts, *extra):
    return ["search", f"--model.pipeline={pipeline}", f"--model.prompts={prompts}", "--model.space=minimal",
            f"--model.num_inference_steps={T}", "--model.budget=6", "--data.num_pairs=4", "--data.batch_size=2",
            "--data.num_val=2", "--trainer.max_steps=2", "--eval.samples=3", "--wandb.mode=disabled",
            "--progress=false", f"--trainer.default_root_dir={tmp_path / 'runs'}", *extra]


@pytest.mark.parametrize("name, prompts, cls, scheduler", [
    ("sd", "prompts.jsonl", "StableDiffusionPipeline", "DDIMScheduler"),
    ("sdxl", "prompts.jsonl", "StableDiffusionXLPipeline", "EulerDiscreteScheduler"),
    ("sd3", "prompts.txt", "StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler"),
    ("pixart", "prompts.jsonl", "PixArtSigmaPipeline", "DPMSolverMultistepScheduler"),
    ("wan", "prompts.jsonl", "WanPipeline", "UniPCMultistepScheduler"),
])
def test_search_on_a_pipeline_folder_writes_the_policy(files, tmp_path, capsys, name, prompts, cls, scheduler):
    out = tmp_path / "policy.json"
    size = WAN_SIZE if name == "wan" else []
    code, stdout, err = run(capsys, *tiny_search(tmp_path, files / name, files / prompts, f"--out={out}", *size))
    assert code == 0, err
    policy = Policy.load(out)
    assert policy.nfe == 6 and policy.num_inference_steps == T
    assert policy.guidance_scale == {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "pixart": 4.5, "wan": 5.0}[name]  # its own
    provenance = policy.provenance
    assert provenance["model"] == str((files / name).resolve()) and provenance["scheduler"] == scheduler
    sizes = {"sd": [32, 32], "sdxl": [32, 32], "sd3": [16, 16], "pixart": [16, 16], "wan": [32, 32, 5]}
    assert provenance["pipeline"] == {"folder": str((files / name).resolve()), "class": cls,
                                      "prompts": str((files / prompts).resolve()), "num_prompts": 3,
                                      "negative_prompts": 1 if prompts.endswith("jsonl") else 0, "size": sizes[name]}
    assert {"nfe", "mse", "samples", "seed"} == set(policy.metrics["eval"]) and policy.metrics["eval"]["nfe"] == 6
    # The comparison: full CFG, the searched policy and the cutoff at its NFE, by MSE to full CFG.
    assert "MSE of the final latents to full CFG" in stdout and "cutoff-2/4" in stdout and "accuracy" not in stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "gates.json").is_file()
    # The checkpoint re-discretises at another budget; the pipeline's provenance comes with it.
    code, _, err = run(capsys, "export", run_dir / "checkpoints" / "last.ckpt", "--budget", 5, "--out", tmp_path / "p5.json")
    assert code == 0, err
    exported = Policy.load(tmp_path / "p5.json")
    assert exported.nfe == 5 and exported.provenance["pipeline"] == provenance["pipeline"]


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "pixart", "wan"])
def test_teacher_is_the_pipelines_full_cfg_with_negative_prompts(files, name):
    """The module's cached teacher for (seed, prompt i) equals the plain pipeline call with
    ``generator=torch.Generator().manual_seed(seed)`` at the same steps and scale, negative prompt
    included, and the negative prompt really is the unconditional pass."""
    from agsearch.diffusers.generate import load_pipeline
    from agsearch.search.data import PairDataset
    from agsearch.search.gates import PolicySearchModule

    size = dict(height=32, width=32, num_frames=5) if name == "wan" else {}
    module = PolicySearchModule(space="minimal", budget=6, pipeline=str(files / name),
                                prompts=str(files / "prompts.jsonl"), num_inference_steps=T, guidance_scale=W, **size)
    assert module.hparams.model == "pipeline" and module.backend.num_conditions == 3
    batch = PairDataset(0, 5, module.backend.num_conditions).batch()
    assert batch["label"].tolist() == [0, 1, 2, 0, 1]  # prompt i mod N
    seeds, labels = batch["seed"][:2], batch["label"][:2]
    noise = module.backend.noise(seeds, "cpu")
    ours, _ = module.teacher(seeds, noise, module.backend.condition(labels))

    pipe = load_pipeline(files / name)

    def pipeline_latents(seed, prompt, negative):
        extra = {"use_resolution_binning": False} if name == "pixart" else dict(size)  # PixArt: no tiny size bins
        if name == "pixart":
            negative = negative or ""  # PixArt's default (None is not accepted)
        out = pipe(prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(int(seed)),
                   num_inference_steps=T, guidance_scale=W, output_type="latent", **extra)
        return (out.frames if name == "wan" else out.images)[0]

    for j in range(2):
        record = PROMPTS[int(labels[j])]
        theirs = pipeline_latents(seeds[j], record["prompt"], record.get("negative_prompt"))
        # Batch-size rounding (PixArt's random tiny transformer drives its latents to |x| ~ 10: relative).
        torch.testing.assert_close(ours[j], theirs, rtol=1e-4 if name == "pixart" else 0,
                                   atol=5e-4 if name == "pixart" else 5e-5)
    without_negative = pipeline_latents(seeds[0], "a red cube", None)
    assert (ours[0] - without_negative).abs().max() > 1e-3


@pytest.mark.parametrize("case, fragment", [
    ("missing folder", "does not exist"),
    ("sana", "not supported by the search"),
    ("unknown class", "'KandinskyPipeline'"),
    ("empty prompts", "the prompt file is empty"),
    ("missing prompts", "cannot read prompt file"),
    ("bad jsonl", "invalid JSON"),
    ("jsonl without prompt", "non-empty string 'prompt'"),
    ("no prompts", "needs model.prompts"),
    ("prompts without pipeline", "needs model.pipeline"),
    ("sd3 scheduler", "runs its own scheduler"),
    ("frames of an image pipeline", "model.num_frames is for video pipelines"),
    ("bad height", "multiple of 8"),
    ("size of a built-in model", "sets a pipeline folder's size"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, case, fragment):
    pipeline, prompts = files / "sd", files / "prompts.txt"
    extra = []
    if case == "missing folder":
        pipeline = tmp_path / "nope"
    elif case in ("sana", "unknown class"):
        pipeline = tmp_path / "other"
        pipeline.mkdir()
        name = "SanaPipeline" if case == "sana" else "KandinskyPipeline"
        (pipeline / "model_index.json").write_text(json.dumps({"_class_name": name}))
    elif case == "empty prompts":
        prompts = tmp_path / "empty.txt"
        prompts.write_text("\n  \n")
    elif case == "missing prompts":
        prompts = tmp_path / "nope.txt"
    elif case == "bad jsonl":
        prompts = tmp_path / "bad.jsonl"
        prompts.write_text('{"prompt": "a dog"}\n{"prompt": "a cat"\n')
    elif case == "jsonl without prompt":
        prompts = tmp_path / "bad.jsonl"
        prompts.write_text('{"negative_prompt": "blurry"}\n')
    elif case == "sd3 scheduler":
        pipeline, extra = files / "sd3", ["--model.scheduler=ddim"]
    elif case == "frames of an image pipeline":
        extra = ["--model.num_frames=5"]
    elif case == "bad height":
        extra = ["--model.height=30"]
    argv = tiny_search(tmp_path, pipeline, prompts, f"--out={tmp_path / 'p.json'}", *extra)
    if case == "no prompts":
        argv = [a for a in argv if not a.startswith("--model.prompts")]
    if case == "prompts without pipeline":  # on digits (the default model, shapes, reads them as captions)
        argv = [a for a in argv if not a.startswith("--model.pipeline")] + ["--model.model=digits"]
    if case == "size of a built-in model":
        argv = [a for a in argv if not a.startswith(("--model.pipeline", "--model.prompts"))] + ["--model.width=64"]
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("agsearch search: error:") and "Traceback" not in err
    assert fragment in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "p.json").exists()


def test_adaptive_thresholds_search_on_a_pipeline(files, tmp_path, capsys):
    """The adaptive space on a text-to-image pipeline: thresholds calibrated on the pipeline's
    prompts, provenance naming the folder, and AG at the same calibration in the comparison."""
    out = tmp_path / "adaptive.json"
    argv = tiny_search(tmp_path, files / "sd", files / "prompts.jsonl", "--model.space=adaptive_cosine",
                       "--data.num_calibration=6", f"--out={out}")
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    policy = Policy.load(out)
    assert policy.kind == "adaptive" and len(policy.rule["thresholds"]) == T
    assert policy.provenance["pipeline"]["folder"] == str((files / "sd").resolve())
    assert "AG γ̄=" in stdout and "θ_t =" in stdout


def test_a_pipeline_search_reports_clip_scores_with_clip_weights(files, tmp_path, capsys):
    pytest.importorskip("open_clip")
    from agsearch.testing import TINY_CLIP_NAME, tiny_clip_weights

    weights = tiny_clip_weights(tmp_path / "clip")
    out = tmp_path / "policy.json"
    code, stdout, err = run(capsys, *tiny_search(tmp_path, files / "sd", files / "prompts.txt", f"--out={out}",
                                                 f"--eval.clip_weights={weights}", f"--eval.clip_model={TINY_CLIP_NAME}"))
    assert code == 0, err
    assert "CLIP score" in stdout and "CLIP FD" in stdout
    metrics = Policy.load(out).metrics["eval"]
    assert 0 <= metrics["clip_score"] <= 100 and metrics["clip_fd"] >= 0


def test_clip_weights_that_are_not_safetensors_are_refused_before_the_search(files, tmp_path, capsys):
    import pickle

    bad = tmp_path / "clip.bin"
    bad.write_bytes(pickle.dumps({"state_dict": {}}))
    code, _, err = run(capsys, *tiny_search(tmp_path, files / "sd", files / "prompts.txt",
                                            f"--eval.clip_weights={bad}"))
    assert code == 2 and "not a safetensors file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    code, _, err = run(capsys, *tiny_search(tmp_path, files / "sd", files / "prompts.txt",
                                            f"--eval.clip_weights={bad}", "--eval.clip_model=hf-hub:x/y"))
    assert code == 2 and "nothing is downloaded" in err
