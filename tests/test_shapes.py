"""The shapes test bed: renderer, caption grammar and split, the shipped pipeline and scorer, and
``agsearch eval/baseline/generate`` on it."""

import itertools
import json

import numpy as np
import pytest
import torch

from agsearch.cli import main
from agsearch.models.shapes import scenes
from agsearch.models.shapes.scenes import (
    Caption,
    CaptionError,
    Obj,
    parse_caption,
    render,
    sample_scene,
    satisfies,
)
from agsearch.policy import Policy


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- renderer -----------------------------------------------------------------------------------


def test_render_is_deterministic_and_seeded():
    a_texts, a_images = scenes.SceneStream(seed=5).batch(16)
    b_texts, b_images = scenes.SceneStream(seed=5).batch(16)
    assert a_texts == b_texts and np.array_equal(a_images, b_images)
    c_texts, c_images = scenes.SceneStream(seed=6).batch(16)
    assert c_texts != a_texts and not np.array_equal(c_images, a_images)
    assert a_images.shape == (16, 32, 32, 3) and a_images.dtype == np.uint8


def test_render_places_the_colour_in_the_cell():
    for shape in scenes.SHAPES:
        image = render((Obj(shape, "red", "large", (0, 2)),)).astype(int)
        cy, cx = (int(v) for v in scenes.cell_centre((0, 2)))
        assert tuple(image[cy, cx]) == scenes.COLOURS["red"], shape  # the centre is inside every shape
        assert tuple(image[28, 4]) == scenes.BACKGROUND  # another cell is empty
    small = (render((Obj("square", "blue", "small"),)) != scenes.BACKGROUND).any(-1).sum()
    large = (render((Obj("square", "blue", "large"),)) != scenes.BACKGROUND).any(-1).sum()
    assert large > 1.5 * small


def test_every_shape_renders_differently():
    images = [render((Obj(s, "green"),)) for s in scenes.SHAPES]
    for a, b in itertools.combinations(images, 2):
        assert np.abs(a.astype(int) - b.astype(int)).sum() > 1000


# --- captions ---------------------------------------------------------------------------------


def test_caption_round_trip_both_ways():
    for caption in scenes.captions():
        assert parse_caption(caption.text) == caption
        assert parse_caption(caption.text).text == caption.text


def test_examples_parse_to_their_attributes():
    assert parse_caption("a red circle") == Caption("single", (("red", "circle"),))
    assert parse_caption("a circle and a square") == Caption("two_objects", ((None, "circle"), (None, "square")))
    assert parse_caption("a red circle and a blue square").category == "colour_attr"
    p = parse_caption("a green triangle to the left of a yellow cross")
    assert p == Caption("position", (("green", "triangle"), ("yellow", "cross")), "to the left of")
    assert parse_caption("two blue squares") == Caption("counting", (("blue", "square"),) * 2)
    assert parse_caption("  Three RED crosses ").text == "three red crosses"


@pytest.mark.parametrize("text, word", [
    ("a red dog", "dog"), ("a red circle next to a blue square", "next"), ("four red circles", "four"),
    ("two red circle", "circle"), ("a red circle and", "<end>"), ("red circle", "red"),
])
def test_unparsable_caption_names_the_word(text, word):
    with pytest.raises(CaptionError, match=f"{text!r}.*'{word}'" if word != "<end>" else "<end>"):
        parse_caption(text)


@pytest.mark.parametrize("text", ["a red circle and a blue circle", "a red circle and a red square",
                                  "a circle and a blue square", "a circle above a square", "a circle", ""])
def test_ambiguous_captions_are_refused(text):
    with pytest.raises(CaptionError):
        parse_caption(text)


def test_sampled_scenes_satisfy_their_caption_and_no_other():
    rng = np.random.default_rng(0)
    all_caps = scenes.captions()
    for caption in all_caps[:: 7]:
        scene = sample_scene(caption, rng)
        assert satisfies(scene, caption)
    swapped = Caption("colour_attr", (("blue", "circle"), ("red", "square")))
    scene = sample_scene(Caption("colour_attr", (("red", "circle"), ("blue", "square"))), rng)
    assert not satisfies(scene, swapped)  # binding matters
    left = Caption("position", (("red", "circle"), ("blue", "square")), "to the left of")
    right = Caption("position", (("red", "circle"), ("blue", "square")), "to the right of")
    scene = sample_scene(left, rng)
    assert satisfies(scene, left) and not satisfies(scene, right)
    two = Caption("counting", (("blue", "square"),) * 2)
    assert not satisfies(sample_scene(Caption("counting", (("blue", "square"),) * 3), rng), two)


def test_split_holds_out_combinations():
    train, held = set(scenes.captions("train")), set(scenes.captions("heldout"))
    assert train and held and not train & held and train | held == set(scenes.captions())
    for cat in scenes.CATEGORIES:
        assert scenes.captions("train", cat) and scenes.captions("heldout", cat), cat
    for caption in train:
        assert not any(pair in scenes.HELD_OUT_PAIRS for pair in caption.objects)
    texts, _ = scenes.SceneStream(seed=0).batch(2000)
    assert all(t == "" or not parse_caption(t).held_out() for t in texts)
    assert 0.05 < texts.count("") / len(texts) < 0.15  # condition dropout


def test_eval_captions_cycle_categories_and_are_seeded():
    caps = scenes.eval_captions(50, seed=1)
    assert [c.category for c in caps[:5]] == list(scenes.CATEGORIES)
    assert all(c.held_out() for c in caps)
    assert caps == scenes.eval_captions(50, seed=1) and caps != scenes.eval_captions(50, seed=2)


# --- the shipped model and scorer ---------------------------------------------------------------


def test_scorer_reads_heldout_renders():
    from agsearch.models.shapes import ShapesScorer, load_scorer, scene_targets

    scorer = load_scorer()
    rng = np.random.default_rng(4242)
    scene_list = [scenes.random_scene(rng) for _ in range(400)]
    x = scenes.to_tensor(scenes.render_batch(scene_list))
    shape_t, colour_t, size_t = scene_targets(scene_list)
    with torch.no_grad():
        s, c, z = scorer(x)
    occupied = shape_t > 0
    assert (s.argmax(-1) == shape_t).float().mean() >= 0.98
    assert (c.argmax(-1) == colour_t)[occupied].float().mean() >= 0.98
    assert (z.argmax(-1) == size_t)[occupied].float().mean() >= 0.98
    assert isinstance(ShapesScorer.decode(s, c, z)[0], tuple)


def test_shipped_pipeline_loads_offline_and_samples():
    from diffusers import StableDiffusionPipeline

    from agsearch.models.shapes import PIPELINE_DIR, load_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(PIPELINE_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert load_pipeline().unet.config.sample_size == 8
    size = sum(p.stat().st_size for p in PIPELINE_DIR.rglob("*") if p.is_file())
    assert size <= 40 * 2**20


# --- the CLI on the shapes model ------------------------------------------------------------------


def test_baseline_uses_the_shapes_settings(tmp_path, capsys):
    from agsearch.models.shapes import benchmark_settings

    code, _, _ = run(capsys, "baseline", "cutoff", "--fraction", "0.5", "--model", "shapes", "--out", tmp_path / "c.json")
    assert code == 0
    policy = Policy.load(tmp_path / "c.json")
    assert policy.guidance_scale == benchmark_settings()["guidance_scale"]
    assert policy.provenance["model"] == "agsearch-shapes"


def test_eval_records_on_a_few_samples(tmp_path, capsys):
    for name in ("cfg", "cond"):
        assert run(capsys, "baseline", name, "--model", "shapes", "--steps", 4, "--out", tmp_path / f"{name}.json")[0] == 0
    out = tmp_path / "records.json"
    code, stdout, _ = run(capsys, "eval", "--model", "shapes", "--policy", tmp_path / "cfg.json", "--policy",
                          tmp_path / "cond.json", "--steps", 4, "--samples", 10, "--seed", 1, "--json", out,
                          "--no-progress")
    assert code == 0 and "adherence" in stdout
    records = json.loads(out.read_text())
    assert [r["nfe"] for r in records] == [8, 4]
    for r in records:
        assert {"name", "nfe", "adherence", "fd", "mse", "psnr", "seconds"} <= set(r)
        assert 0 <= r["adherence"] <= 1 and r["captions"] == "heldout"
        assert all(f"adherence_{c}" in r for c in scenes.CATEGORIES)
    assert records[0]["mse"] == 0 and records[0]["psnr"] is None  # full CFG is its own reference


def test_streamed_shapes_scores_do_not_depend_on_the_batch_size():
    from agsearch.eval.shapes import ShapesEvaluator
    from agsearch.models.shapes import load_pipeline, load_scorer

    pipe, scorer = load_pipeline(), load_scorer()
    policies = [Policy.static(["cfg"] * 4, 4.0), Policy.static(["cfg", "cond", "cond", "cond"], 4.0)]
    whole, batched = (ShapesEvaluator(samples=10, seed=1, batch_size=b, progress=False, pipe=pipe, scorer=scorer)
                      .records(policies) for b in (10, 3))
    for a, b in zip(whole, batched):
        assert a["adherence"] == b["adherence"] and a["nfe"] == b["nfe"]
        assert all(a[f"adherence_{c}"] == b[f"adherence_{c}"] for c in scenes.CATEGORIES)
        assert a["fd"] == pytest.approx(b["fd"], rel=1e-3) and a["mse"] == pytest.approx(b["mse"], rel=1e-3, abs=1e-9)


def test_shapes_benchmark_writes_both_caption_tables_and_the_grid(tmp_path, capsys):
    policy = tmp_path / "searched.json"
    assert run(capsys, "baseline", "interval", "--model", "shapes", "--start", 0.04, "--stop", 0.44,
               "--out", policy)[0] == 0  # a 35-NFE static policy standing in for a searched one
    out = tmp_path / "bench"
    code, stdout, _ = run(capsys, "bench", "--model", "shapes", "--quick", "--samples", 2, "--policy", policy,
                          "--out-dir", out, "--no-progress")
    assert code == 0 and "held-out captions" in stdout
    assert {p.name for p in out.iterdir()} == {"benchmark.md", "benchmark.json", "fronts.png", "cosine.png", "grid.png"}
    data = json.loads((out / "benchmark.json").read_text())
    assert set(data["records"]) == {"train", "heldout"} and data["settings"]["num_inference_steps"] == 25
    for split, records in data["records"].items():
        assert {r["family"] for r in records} >= {"cfg", "cond", "cutoff", "ag-x0", "policy file"}
        assert all(r["captions"] == split and r["samples"] == 2 for r in records)
        assert next(r for r in records if r["family"] == "cfg")["mse"] == 0
    md = (out / "benchmark.md").read_text()
    assert "## Training captions" in md and "## Held-out captions" in md and "(35 NFE)" in md
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_shapes_benchmark_resumes_from_its_last_checkpoint(tmp_path, capsys, monkeypatch):
    import agsearch.eval.shapes_bench as shapes_bench

    calls, stop_at = [], [None]  # the suite_records call (groups of policies) at which Ctrl-C comes
    original = shapes_bench.suite_records

    def suite_records(evaluator, suite):
        calls.append((evaluator.caption_set, len(suite)))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return original(evaluator, suite)

    monkeypatch.setattr(shapes_bench, "suite_records", suite_records)
    monkeypatch.setattr(shapes_bench, "CHECKPOINT_POLICIES", 2)
    monkeypatch.setattr(shapes_bench, "sample_grid", lambda *a, **k: None)  # drawn in the test above

    def bench(out, *extra, samples=2, stop=None):
        calls.clear()
        stop_at[0] = stop
        return main([str(a) for a in ["bench", "--model", "shapes", "--quick", "--families", "cfg", "cond", "cutoff",
                                      "--samples", samples, "--out-dir", out, "--no-progress", *extra]])

    assert bench(tmp_path / "fresh") == 0
    groups = list(calls)
    assert groups[0][0] == "heldout" and groups[-1][0] == "train" and all(n <= 2 for _, n in groups)
    assert len(groups) == 4  # two groups of two policies per caption set
    per_set = sum(n for name, n in groups if name == "heldout")
    assert bench(tmp_path / "cut", stop=2) == 130  # Ctrl-C in the held-out set's second group
    partial = json.loads((tmp_path / "cut" / "benchmark.heldout.partial.json").read_text())
    assert len(partial["records"]) == 2 and partial["cosines"] is not None  # full CFG ran in the first group
    assert bench(tmp_path / "cut", "--resume", samples=3) == 0 and sum(n for _, n in calls) == 2 * per_set  # another protocol
    assert bench(tmp_path / "cut", stop=len(groups)) == 130  # Ctrl-C in the training set's last group
    assert bench(tmp_path / "cut", "--resume") == 0 and calls == groups[-1:]  # only that group runs again
    capsys.readouterr()
    resumed = json.loads((tmp_path / "cut" / "benchmark.json").read_text())["records"]
    fresh = json.loads((tmp_path / "fresh" / "benchmark.json").read_text())["records"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(resumed["train"]) == drop(fresh["train"]) and drop(resumed["heldout"]) == drop(fresh["heldout"])
    assert not any(p.name.endswith(".partial.json") for p in (tmp_path / "cut").iterdir())
    # a resumed run may add policies: the records of the policies both suites start with are kept
    assert bench(tmp_path / "grow", "--families", "cfg", "cond", stop=2) == 130  # held-out set done, Ctrl-C in train
    assert bench(tmp_path / "grow", "--resume") == 0 and calls[0] == ("heldout", per_set - 2)
    # a finished run's benchmark.json keeps its protocols: --resume evaluates only what was added
    assert bench(tmp_path / "grow", "--resume") == 0 and calls == []
    assert bench(tmp_path / "grow", "--resume", "--families", "cfg", "cond", "cutoff", "ag-x0") == 0
    assert calls and all(n <= 2 for _, n in calls) and sum(n for _, n in calls) == 2  # one AG policy per set
    assert bench(tmp_path / "grow", "--resume", samples=3) == 0 and sum(n for _, n in calls) == 2 * per_set


def test_eval_with_a_bad_caption_file_exits_2_and_writes_nothing(tmp_path, capsys):
    run(capsys, "baseline", "cfg", "--model", "shapes", "--out", tmp_path / "cfg.json")
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na red circle beside a blue square\n")
    out = tmp_path / "records.json"
    code, _, err = run(capsys, "eval", "--model", "shapes", "--policy", tmp_path / "cfg.json", "--captions",
                       captions, "--samples", 4, "--json", out)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "a red circle beside a blue square" in err and "'beside'" in err and ":2:" in err
    assert not out.exists()


def test_generate_on_the_builtin_pipeline(tmp_path, capsys):
    run(capsys, "baseline", "cutoff", "--fraction", "0.5", "--model", "shapes", "--steps", 4,
        "--out", tmp_path / "p.json")
    out = tmp_path / "img.png"
    code, stdout, _ = run(capsys, "generate", "--pipeline", "builtin:shapes", "--policy", tmp_path / "p.json",
                          "--prompt", "a yellow circle below a red cross", "--out", out)
    assert code == 0 and out.is_file() and "NFE 6 per image of 8" in stdout
    code, _, err = run(capsys, "generate", "--pipeline", "builtin:nope", "--policy", tmp_path / "p.json",
                       "--prompt", "x", "--out", tmp_path / "x.png")
    assert code == 2 and "builtin:shapes" in err


def test_table_of_records_without_a_comparison():
    from agsearch.eval.records import format_table

    rows = [dict(name="cond-only", nfe=25, adherence=0.4, adherence_single=0.7, mse=None, psnr=None, fd=3.0, seconds=1),
            dict(name="cfg", nfe=50, adherence=0.5, adherence_single=0.9, mse=0.0, psnr=None, fd=2.0, seconds=2)]
    lines = format_table(rows).splitlines()
    assert lines[0].split(" | ")[1:4] == ["NFE", "adherence %", "single %"]
    assert "| - | - |" in lines[2] and "| 0.00000 | inf |" in lines[3]


def tiny_shapes_search(tmp_path, *extra):
    return ["search", "--model.space=minimal", "--model.num_inference_steps=4", "--model.budget=6",
            "--data.num_pairs=4", "--data.batch_size=2", "--data.num_val=2", "--trainer.max_steps=2",
            "--eval.samples=4", "--wandb.mode=disabled", "--progress=false",
            f"--trainer.default_root_dir={tmp_path / 'runs'}", *extra]


def test_search_on_the_builtin_pipeline_scores_adherence_on_training_captions(tmp_path, capsys):
    out = tmp_path / "policy.json"
    code, stdout, err = run(capsys, *tiny_shapes_search(tmp_path, "--model.pipeline=builtin:shapes", f"--out={out}"))
    assert code == 0, err
    policy = Policy.load(out)
    assert policy.nfe == 6 and policy.guidance_scale == 4.0  # the model's calibrated best scale
    assert policy.provenance["model"] == "agsearch-shapes"
    assert policy.provenance["pipeline"]["prompts"] == "1000 training captions drawn by seed 0"
    assert policy.metrics["eval"]["captions"] == "train" and 0 <= policy.metrics["eval"]["adherence"] <= 1
    assert "of the train captions" in stdout and "adherence %" in stdout and "cutoff-2/4" in stdout


@pytest.mark.parametrize("extra, needle", [
    (["--model.pipeline=builtin:shapes", "--model.prompts={captions}"], "captions.txt:2: caption 'a purple dragon'"),
    (["--model.model=shapes", "--model.pipeline={tmp}"], "model.model=shapes is the built-in pipeline"),
])
def test_a_refused_shapes_search_is_one_line_and_leaves_no_run(tmp_path, capsys, extra, needle):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na purple dragon\n")
    argv = [a.format(captions=captions, tmp=tmp_path) for a in tiny_shapes_search(tmp_path, *extra)]
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "runs").exists()


def test_linear_ag_on_shapes_uses_the_shapes_fit(tmp_path, capsys):
    from agsearch.linear_ag import load_builtin

    fit = load_builtin("shapes")
    assert fit["model"] == "agsearch-shapes" and fit["num_inference_steps"] == 25 and fit["guidance_scale"] == 4.0
    assert min(fit["r2"]["delta"][1:]) > 0.8  # the guidance direction is predictable after the first step
    out = tmp_path / "lag.json"
    assert run(capsys, "baseline", "linear-ag", "--model", "shapes", "--out", out)[0] == 0
    steps = Policy.load(out).steps
    assert {"op": "affine", "coef": fit["coefficients"][1], "fallback": "cond"} in steps


def test_sweep_of_shapes_searches_scores_adherence_on_held_out_captions(tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, err = run(capsys, "sweep", "--budgets", 6, "--spaces", "minimal", "--samples", 4, "--out-dir", out,
                            "--no-progress", "--no-ag", "--", "--model.pipeline=builtin:shapes",
                            "--model.num_inference_steps=4", "--data.num_pairs=4", "--data.batch_size=2",
                            "--data.num_val=2", "--trainer.max_steps=2", "--wandb.mode=disabled",
                            f"--trainer.default_root_dir={tmp_path / 'runs'}")
    assert code == 0, err
    data = json.loads((out / "sweep.json").read_text())
    assert data["meta"]["model"] == "shapes" and data["meta"]["captions"] == "heldout"
    assert {r["role"] for r in data["records"]} >= {"full CFG", "cond", "cutoff", "searched (minimal)"}
    assert all(r["captions"] == "heldout" and 0 <= r["adherence"] <= 1 for r in data["records"])
    assert "| adherence % |" in (out / "sweep.md").read_text() and "on the shapes model, heldout captions" in stdout + (out / "sweep.md").read_text()


def test_the_benchmark_has_baselines_at_every_budget_and_matches_policy_files_to_them():
    from agsearch.eval.bench import benchmark_suite
    from agsearch.eval.shapes_bench import BUDGETS, budget_baselines, matched_rows

    suite = benchmark_suite(25, 4.0, None, model="shapes")
    suite += budget_baselines(suite, 25, 4.0)
    labels = [p.label() for _, p in suite]
    assert len(labels) == len(set(labels))  # nothing twice
    for budget in BUDGETS:
        assert any(f == "cutoff" and p.nfe == budget for f, p in suite)
        assert sum(f == "interval" and p.nfe == budget for f, p in suite) >= 3

    def record(name, family, nfe, adherence, mse):
        return {"name": name, "family": family, "nfe": nfe, "adherence": adherence, "mse": mse}

    rows = [record("cutoff-10/25", "cutoff", 35.0, 0.70, 0.0030), record("interval-2:12/25", "interval", 35.0, 0.71, 0.0035),
            record("interval-1:11/25", "interval", 35.0, 0.69, 0.0020), record("ag-x0-0.99", "ag-x0", 32.0, 0.70, 0.0020),
            record("ag-x0-0.995", "ag-x0", 36.0, 0.74, 0.0010), record("searched", "policy file", 35.0, 0.72, 0.0025),
            record("worse", "policy file", 35.0, 0.705, 0.0010)]
    searched, worse = matched_rows(rows)  # by NFE, then name
    assert searched["policy"] == "searched" and worse["policy"] == "worse"
    assert searched["interval"]["name"] == "interval-2:12/25"  # the best interval: the highest adherence
    assert searched["beats"] is True and worse["beats"] is False  # 70.5% < the interval's 71%
    assert searched["ag"]["adherence"] == pytest.approx(0.73) and searched["ag"]["mse"] == pytest.approx(0.00125)
