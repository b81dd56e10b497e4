"""The shapes editing test bed: the instruction grammar and split, edit triples, the metrics read back by
the scorer, the training stream, and the editor's UNet of ``experiments/train_shapes_edit.py``."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agsearch.models.shapes import EDIT_PIPELINE_DIR, edit_unet, load_edit_pipeline, load_scorer, pipeline_path, scenes
from agsearch.models.shapes.edits import (
    DIRECTIONS,
    KINDS,
    Edit,
    EditError,
    EditStream,
    Instruction,
    InstructionError,
    apply_edit,
    edit_success,
    eval_edits,
    format_instruction,
    instructions,
    parse_instruction,
    preservation,
    sample_edit,
)
from agsearch.models.shapes.scenes import Obj

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def train_script():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import train_shapes_edit  # experiments/train_shapes_edit.py: a script, not the package's
    finally:
        sys.path.remove(str(EXPERIMENTS))
    return train_shapes_edit


@pytest.fixture(scope="module")
def some_edits():
    return eval_edits(200, seed=0, split="all")


# --- instructions --------------------------------------------------------------------------------


def test_instruction_round_trip_both_ways():
    assert len(instructions()) == 308
    for ins in instructions():
        assert parse_instruction(ins.text) == ins
        assert format_instruction(parse_instruction(ins.text)) == ins.text


def test_examples_parse_to_their_attributes():
    assert parse_instruction("make the circle blue") == Instruction("recolour", "circle", new_colour="blue")
    assert parse_instruction("make the red circle blue") == Instruction("recolour", "circle", "red", "blue")
    assert parse_instruction("move the square to the left") == Instruction("move", "square", direction="to the left")
    assert parse_instruction("move the green square down").direction == "down"
    assert parse_instruction("add a red triangle") == Instruction("add", "triangle", "red")
    assert parse_instruction("remove the cross") == Instruction("remove", "cross")
    assert parse_instruction("  Remove the Cyan CROSS ").text == "remove the cyan cross"


@pytest.mark.parametrize("text, word", [
    ("paint the circle red", "paint"), ("make the dog blue", "dog"), ("make the circle", "<end>"),
    ("make a circle blue", "a"), ("move the square sideways", "sideways"), ("move the square to the top", "top"),
    ("add a triangle", "triangle"), ("add the red triangle", "the"), ("remove the cross now", "now"),
    ("make the red circle red", "red"), ("", "empty"),
])
def test_parse_errors_name_the_instruction_and_the_word(text, word):
    with pytest.raises(InstructionError) as info:
        parse_instruction(text)
    assert isinstance(info.value, ValueError) and repr(text) in str(info.value) and word in str(info.value)


def test_an_inconsistent_instruction_is_refused():
    for bad in [dict(kind="move", shape="circle"), dict(kind="add", shape="circle"),
                dict(kind="recolour", shape="circle", colour="red", new_colour="red"),
                dict(kind="remove", shape="circle", new_colour="red"), dict(kind="paint", shape="circle"),
                dict(kind="add", shape="dog", colour="red")]:
        with pytest.raises(ValueError):
            Instruction(**bad)


def test_the_split_is_a_partition_and_holds_out_the_listed_combinations():
    train, held = set(instructions("train")), set(instructions("heldout"))
    assert not train & held and train | held == set(instructions()) and (len(train), len(held)) == (210, 98)
    held_texts = {i.text for i in held}
    for text in ["make the circle yellow", "add a purple square", "move the circle to the left", "move the square up",
                 "move the triangle to the right", "move the cross down", "remove the triangle",
                 "remove the yellow circle", "make the yellow circle red"]:
        assert text in held_texts, text
    for kind in KINDS:
        assert instructions("train", kind) and instructions("heldout", kind)


def test_held_out_instructions_never_appear_in_training():
    train_texts = {i.text for i in instructions("train")}
    texts = EditStream(seed=3).batch(512)[0]
    assert {t for t in texts if t} <= train_texts
    assert all(not e.instruction.held_out() for e in eval_edits(200, seed=1, split="train"))
    assert all(e.instruction.held_out() for e in eval_edits(200, seed=1, split="heldout"))


# --- edits ---------------------------------------------------------------------------------------


def test_eval_edits_and_the_stream_are_deterministic():
    a, b = eval_edits(40, seed=5), eval_edits(40, seed=5)
    assert a == b and a != eval_edits(40, seed=6)
    assert [e.instruction.kind for e in a[:8]] == list(KINDS) * 2
    first, again = EditStream(seed=5).batch(16), EditStream(seed=5).batch(16)
    assert first[0] == again[0] and all(np.array_equal(x, y) for x, y in zip(first[1:], again[1:]))
    other = EditStream(seed=6).batch(16)
    assert other[0] != first[0]
    _, sources, targets, image_dropped = first
    assert sources.shape == targets.shape == (16, 32, 32, 3) and sources.dtype == targets.dtype == np.uint8
    assert image_dropped.shape == (16,) and image_dropped.dtype == bool


def test_a_triple_changes_only_what_its_instruction_says(some_edits):
    rng = np.random.default_rng(0)
    for edit in some_edits + [sample_edit(rng, "all") for _ in range(200)]:
        ins, source, target = edit.instruction, edit.source, edit.target
        assert 1 <= len(source) <= 3
        if ins.kind == "add":
            assert target[:-1] == source and target[-1].cell not in {o.cell for o in source}
            assert (target[-1].shape, target[-1].colour) == (ins.shape, ins.colour)
            continue
        named = [i for i, o in enumerate(source) if o.shape == ins.shape and ins.colour in (None, o.colour)]
        assert len(named) == 1, edit  # the instruction picks out one object
        i = named[0]
        assert ins.colour is None or any(o.shape == ins.shape for j, o in enumerate(source) if j != i)
        untouched = source[:i] + source[i + 1:]
        if ins.kind == "remove":
            assert target == untouched
            continue
        assert target[:i] + target[i + 1:] == untouched  # the same Obj, jitter included
        if ins.kind == "recolour":
            assert target[i] == dataclasses.replace(source[i], colour=ins.new_colour) != source[i]
        else:
            dr, dc = DIRECTIONS[ins.direction]
            cell = (source[i].cell[0] + dr, source[i].cell[1] + dc)
            assert target[i] == dataclasses.replace(source[i], cell=cell)
            assert all(0 <= v < scenes.GRID for v in cell) and cell not in {o.cell for o in source}


def test_an_instruction_that_does_not_apply_is_refused():
    two_circles = (Obj("circle", "red", cell=(0, 0)), Obj("circle", "blue", cell=(0, 1)))
    for text in ["make the circle green", "remove the square", "make the red circle red", "move the red circle up",
                 "move the red circle to the right"]:
        with pytest.raises(ValueError, match="instruction"):
            apply_edit(two_circles, parse_instruction(text))
    with pytest.raises(EditError, match="no empty cell"):
        apply_edit([Obj("circle", "red", cell=divmod(k, 3)) for k in range(9)], parse_instruction("add a red square"),
                   np.random.default_rng(0))
    assert apply_edit(two_circles, parse_instruction("move the blue circle down"))[1].cell == (1, 1)


# --- metrics -------------------------------------------------------------------------------------


def test_the_metrics_on_exact_scenes(some_edits):
    for edit in some_edits:
        assert edit_success(edit, edit.target) and preservation(edit, edit.target), edit
        assert not edit_success(edit, edit.source) and preservation(edit, edit.source), edit
    red, blue = Obj("circle", "red", "large", (0, 0)), Obj("square", "blue", "small", (2, 2))
    recolour = Edit((red, blue), parse_instruction("make the circle green"),
                    (dataclasses.replace(red, colour="green"), blue))
    assert not edit_success(recolour, (dataclasses.replace(red, colour="cyan"), blue))
    assert not edit_success(recolour, (Obj("square", "green", "large", (0, 0)), blue))  # the shape changed
    assert edit_success(recolour, (dataclasses.replace(red, colour="green", offset=(0.5, 0.5)), blue))  # no jitter
    assert edit_success(recolour, recolour.target[:1]) and not preservation(recolour, recolour.target[:1])
    assert not preservation(recolour, (*recolour.target, Obj("cross", "red", cell=(1, 1))))
    move = Edit((red, blue), parse_instruction("move the circle down"), (dataclasses.replace(red, cell=(1, 0)), blue))
    assert not edit_success(move, (*move.target, red))  # the old cell is not empty
    assert not preservation(move, (move.target[0], dataclasses.replace(blue, size="large")))
    add = Edit((red,), parse_instruction("add a blue square"), (red, blue))
    assert edit_success(add, (red, dataclasses.replace(blue, size="large", cell=(1, 2))))  # any size, any cell
    assert not edit_success(add, (red, dataclasses.replace(blue, colour="red")))
    assert edit_success(add, (red, blue, Obj("cross", "red", cell=(1, 1)))) and not preservation(
        add, (red, blue, Obj("cross", "red", cell=(1, 1))))  # one object more than asked for
    remove = Edit((red, blue), parse_instruction("remove the square"), (red,))
    assert edit_success(remove, ()) and not preservation(remove, ())


def test_the_scorer_reading_rendered_triples_agrees(some_edits):
    scorer = load_scorer()
    targets = scorer.read(scenes.to_tensor(scenes.render_batch([e.target for e in some_edits])))
    sources = scorer.read(scenes.to_tensor(scenes.render_batch([e.source for e in some_edits])))
    n = len(some_edits)
    assert sum(edit_success(e, r) and preservation(e, r) for e, r in zip(some_edits, targets)) >= 0.98 * n
    assert not any(edit_success(e, r) for e, r in zip(some_edits, sources))  # the source never shows the edit
    assert sum(preservation(e, r) for e, r in zip(some_edits, sources)) >= 0.98 * n


# --- the training stream -------------------------------------------------------------------------


def test_the_stream_drops_conditions_as_instruct_pix2pix_does():
    texts, _, _, image_dropped = EditStream(seed=0, drop_text=0.1, drop_image=0.2, drop_both=0.3).batch(1500)
    text_dropped = np.array([t == "" for t in texts])
    assert abs((text_dropped & ~image_dropped).mean() - 0.1) < 0.03
    assert abs((~text_dropped & image_dropped).mean() - 0.2) < 0.03
    assert abs((text_dropped & image_dropped).mean() - 0.3) < 0.03
    texts, _, _, image_dropped = EditStream(seed=0, drop_text=0, drop_image=0, drop_both=0).batch(64)
    assert all(texts) and not image_dropped.any()
    with pytest.raises(ValueError, match="drop_image to be between 0.0 and 1.0, but got 1.5"):
        EditStream(drop_image=1.5)
    with pytest.raises(ValueError, match="at most 1"):
        EditStream(drop_text=0.5, drop_image=0.5, drop_both=0.5)
    with pytest.raises(ValueError, match="'test'"):
        EditStream(split="test")


# --- the editor ----------------------------------------------------------------------------------


def test_the_editor_unet_starts_as_the_shapes_unet_blind_to_the_image():
    from diffusers import UNet2DConditionModel

    from agsearch.models.shapes import PIPELINE_DIR

    base = UNet2DConditionModel.from_pretrained(PIPELINE_DIR / "unet").eval()
    unet = edit_unet(base).eval()
    assert unet.config.in_channels == 16 and unet.config.out_channels == base.config.out_channels == 8
    assert not unet.conv_in.weight[:, 8:].any()
    g = torch.Generator().manual_seed(0)
    x, image, other = (torch.randn(4, 8, 8, 8, generator=g) for _ in range(3))
    t, emb = torch.tensor([10, 300, 600, 999]), torch.randn(4, 32, 64, generator=g)
    with torch.no_grad():
        want = base(x, t, encoder_hidden_states=emb).sample
        got = unet(torch.cat([x, image], 1), t, encoder_hidden_states=emb).sample
        blind = unet(torch.cat([x, other], 1), t, encoder_hidden_states=emb).sample
    assert torch.equal(got, blind)  # the image channels' weights are zero: the image is ignored exactly
    assert torch.allclose(got, want, atol=1e-5)


def test_builtin_shapes_edit_resolves_or_says_how_to_make_it():
    if (EDIT_PIPELINE_DIR / "model_index.json").is_file():
        assert pipeline_path("builtin:shapes_edit") == EDIT_PIPELINE_DIR
        assert type(load_edit_pipeline()).__name__ == "StableDiffusionInstructPix2PixPipeline"
        return
    for call in (lambda: pipeline_path("builtin:shapes_edit"), load_edit_pipeline):
        with pytest.raises(ValueError, match="train_shapes_edit.py"):
            call()
    with pytest.raises(ValueError, match="builtin:shapes_edit"):
        pipeline_path("builtin:nope")


@pytest.mark.slow
def test_the_training_script_writes_a_pipeline_that_edits(train_script, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    out = tmp_path / "shapes_edit"
    train_script.main(["--steps", "2", "--batch-size", "4", "--log-every", "1", "--save-every", "2",
                       "--threads", "1", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    assert (out / "README.md").is_file() and (out / "training.json").is_file()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 16
    edit_list = eval_edits(2, seed=0)
    sources = scenes.render_batch([e.source for e in edit_list])

    def run(prompt, image):
        return pipe(prompt, image=image, num_inference_steps=4, guidance_scale=4.0, image_guidance_scale=1.5,
                    output_type="np").images

    assert run(edit_list[0].text, Image.fromarray(sources[0])).shape == (1, 32, 32, 3)
    tensor = torch.from_numpy(sources).permute(0, 3, 1, 2).float() / 255
    assert run([e.text for e in edit_list], tensor).shape == (2, 32, 32, 3)
    train_script.main(["--steps", "3", "--batch-size", "4", "--log-every", "1", "--save-every", "3",
                       "--threads", "1", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--resume"])
    assert (tmp_path / "work" / "log.txt").read_text().count("resumed at step 2") == 1
    # a further stage from that folder: its UNet trained on, both stages in the record and the card
    stage2 = tmp_path / "stage2"
    train_script.main(["--steps", "2", "--batch-size", "4", "--log-every", "1", "--save-every", "2", "--seed", "1",
                       "--threads", "1", "--init-from", str(out), "--out", str(stage2),
                       "--work-dir", str(tmp_path / "work2")])
    record = __import__("json").loads((stage2 / "training.json").read_text())
    assert [s["steps_done"] for s in record["previous_stages"]] == [3] and record["steps_done"] == 2
    card = (stage2 / "README.md").read_text()
    assert "1. `python experiments/train_shapes_edit.py" in card and "2. `python" in card and "| 5 | 2 |" in card
