"""Procedural edits of the shapes scenes: the data and the metrics of the shapes image-editing test bed.

An edit is a triple (source scene, instruction, target scene), the training and evaluation unit of
an InstructPix2Pix-style editor (Brooks et al., CVPR 2023, arXiv 2211.09800). A source is a scene of
:mod:`agsearch.models.shapes.scenes` with one to three objects, every attribute random. An
instruction comes from a small grammar with an exact parser, so that
``format_instruction(parse_instruction(text)) == text`` for every instruction of the grammar:

    recolour  "make the circle blue"          "make the red circle blue"
    move      "move the square to the left"   "... to the right", "... up", "... down"  (one cell)
    add       "add a red triangle"
    remove    "remove the cross"              "remove the green cross"

The object an instruction names must be the only one of its shape in the source; when it is not,
the instruction names its colour too ("the red circle"), which must then pick out one object.
Sampled instructions name the colour only then; the parser takes it always. The target is the
source with one change, every other object the same ``Obj``:

- recolour: the object's colour replaced by another one;
- move: its cell replaced by the neighbouring cell in that direction, which must be inside the
  grid and empty (its sub-cell jitter moves with it);
- add: an object of the named shape and colour appended in an empty cell, cell, size and jitter
  drawn (the instruction names neither cell nor size);
- remove: the object deleted.

**Split.** As for captions, held-out combinations never appear in a training instruction, while
the objects they name can still be drawn in a training scene. An instruction is held out when

- a colour–shape pair it names or asks for is in ``scenes.HELD_OUT_PAIRS`` (yellow circle, purple
  square, blue triangle, green cross): "make the circle yellow", "add a yellow circle", and the
  rarer "remove the yellow circle" or "make the yellow circle red" where the colour picks one
  circle out of two;
- it moves a shape in its held-out direction, ``HELD_OUT_MOVES``: the circle to the left, the
  square up, the triangle to the right, the cross down (each shape and each direction once);
- it removes a shape of ``HELD_OUT_REMOVALS``: the triangle.

``instructions("train")`` lists the 210 training instructions, ``instructions("heldout")`` the 98
held out (most of them name a colour to pick one object out of two); of the edits ``sample_edit``
draws with ``split="all"``, 17% of adds, 21% of recolours, 26% of removals and 27% of moves are
held out.

**Metrics** compare scenes cell by cell: a scene's content at a cell is its object's (shape,
colour, size), or nothing; the jitter is ignored (the scorer does not read it). An edit's *region*
is the cells it may change: the named object's cell (recolour, remove), its old and new cells
(move), every cell empty in the source (add). For a scene read back from an edited image:

- ``edit_success``: the scene agrees with the target on the region. Recolour: the object's cell
  holds its shape and size in the new colour; move: the new cell holds the object's shape, colour
  and size, and the old cell is empty; remove: the object's cell is empty; add: a cell empty in the
  source holds an object of the named shape and colour (of any size);
- ``preservation``: the scene agrees with the source outside the region (every untouched object is
  there with its shape, colour, size and cell, and no object appeared in another cell); for add,
  also at most one object in the source's empty cells.

Both hold exactly when the scene is the target (for add: up to the added object's cell and size).
On the source itself, ``edit_success`` is false for every edit.

Everything is seeded by a ``numpy.random.Generator``: ``sample_edit``, ``eval_edits`` and
:class:`EditStream` give the same triples for the same seed.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from agsearch.models.shapes.scenes import (
    COLOURS,
    GRID,
    HELD_OUT_PAIRS,
    JITTER,
    SHAPES,
    SIZES,
    Obj,
    random_scene,
    render_batch,
)

KINDS = ("recolour", "move", "add", "remove")
VERBS = {"make": "recolour", "move": "move", "add": "add", "remove": "remove"}
DIRECTIONS = {"to the left": (0, -1), "to the right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (d row, d col)
MAX_SOURCE_OBJECTS = 3  # so that a target holds at most 4, as the scorer's training scenes do
CELLS = tuple(itertools.product(range(GRID), range(GRID)))  # (row, col), row-major like the scorer's

HELD_OUT_MOVES = frozenset({("circle", "to the left"), ("square", "up"), ("triangle", "to the right"),
                            ("cross", "down")})
HELD_OUT_REMOVALS = frozenset({"triangle"})
SPLITS = ("train", "heldout", "all")


class InstructionError(ValueError):
    """An instruction the grammar cannot parse; names the instruction and the first word that fails."""


class EditError(ValueError):
    """An instruction that does not apply to a scene (no such object, several, a blocked move, ...)."""


@dataclass(frozen=True)
class Instruction:
    """An instruction's meaning.

    ``shape`` and ``colour``: for add, the object added (a colour is required); otherwise the
    object named, ``colour`` None unless the instruction names it. ``new_colour``: recolour's new
    colour. ``direction``: move's, a key of ``DIRECTIONS``.
    """

    kind: str
    shape: str
    colour: str | None = None
    new_colour: str | None = None
    direction: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}: expected one of {list(KINDS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}: expected one of {list(SHAPES)}")
        for name in ("colour", "new_colour"):
            value = getattr(self, name)
            if value is not None and value not in COLOURS:
                raise ValueError(f"unknown {name} {value!r}: expected one of {list(COLOURS)}")
        if self.kind == "add" and self.colour is None:
            raise ValueError("an add instruction needs the colour of the object added")
        if (self.kind == "recolour") != (self.new_colour is not None):
            raise ValueError(f"a recolour needs a new_colour, and only a recolour has one; got kind {self.kind!r} "
                             f"with new_colour {self.new_colour!r}")
        if self.kind == "recolour" and self.new_colour == self.colour:
            raise ValueError(f"recolour to {self.new_colour!r}: the object is already {self.colour!r}")
        if (self.kind == "move") != (self.direction is not None) or self.direction not in (None, *DIRECTIONS):
            raise ValueError(f"a move needs a direction of {list(DIRECTIONS)}, and only a move has one; got kind "
                             f"{self.kind!r} with direction {self.direction!r}")

    @property
    def text(self) -> str:
        return format_instruction(self)

    def named_pairs(self) -> tuple[tuple[str, str], ...]:
        """The (colour, shape) pairs the instruction names or asks for: the object's, the recoloured one's."""
        pairs = [(self.colour, self.shape)] if self.colour else []
        if self.new_colour:
            pairs.append((self.new_colour, self.shape))
        return tuple(pairs)

    def held_out(self) -> bool:
        """True when the instruction holds a combination that no training instruction holds."""
        if any(p in HELD_OUT_PAIRS for p in self.named_pairs()):
            return True
        if self.kind == "move":
            return (self.shape, self.direction) in HELD_OUT_MOVES
        return self.kind == "remove" and self.shape in HELD_OUT_REMOVALS


def format_instruction(instruction: Instruction) -> str:
    """The instruction's text (the inverse of :func:`parse_instruction`)."""
    ins = instruction
    if ins.kind == "add":
        return f"add a {ins.colour} {ins.shape}"
    named = f"the {ins.colour} {ins.shape}" if ins.colour else f"the {ins.shape}"
    if ins.kind == "recolour":
        return f"make {named} {ins.new_colour}"
    if ins.kind == "move":
        return f"move {named} {ins.direction}"
    return f"remove {named}"


def parse_instruction(text: str) -> Instruction:
    """The meaning of an instruction of the grammar; :class:`InstructionError` names the word that fails."""
    words = text.strip().lower().split()
    if not words:
        raise InstructionError(f"instruction {text!r}: empty")
    pos = 0

    def fail(expected: str):
        word = words[pos] if pos < len(words) else "<end>"
        raise InstructionError(f"instruction {text!r}: unexpected word {word!r} at word {pos + 1} "
                               f"(expected {expected})")

    def take(options, expected):
        nonlocal pos
        if pos < len(words) and words[pos] in options:
            pos += 1
            return words[pos - 1]
        fail(expected)

    def end():
        if pos < len(words):
            fail("the end of the instruction")

    kind = VERBS[take(VERBS, "'make', 'move', 'add' or 'remove'")]
    take(("a",) if kind == "add" else ("the",), "'a'" if kind == "add" else "'the'")
    colour = None
    if kind == "add" or (pos < len(words) and words[pos] in COLOURS):
        colour = take(COLOURS, "a colour")
    shape = take(SHAPES, "a shape" if colour else "a colour or a shape")
    new_colour = direction = None
    if kind == "recolour":
        new_colour = take(COLOURS, "the new colour")
        if new_colour == colour:
            raise InstructionError(f"instruction {text!r}: the new colour {new_colour!r} is the object's colour")
    elif kind == "move":
        for phrase in DIRECTIONS:
            n = len(phrase.split())
            if words[pos:pos + n] == phrase.split():
                direction, pos = phrase, pos + n
                break
        else:
            fail("'to the left', 'to the right', 'up' or 'down'")
    end()
    return Instruction(kind, shape, colour, new_colour, direction)


@cache
def _all_instructions() -> tuple[Instruction, ...]:
    named = [(None, s) for s in SHAPES] + [(c, s) for s in SHAPES for c in COLOURS]
    out = [Instruction("recolour", s, c, new) for c, s in named for new in COLOURS if new != c]
    out += [Instruction("move", s, c, direction=d) for c, s in named for d in DIRECTIONS]
    out += [Instruction("add", s, c) for s in SHAPES for c in COLOURS]
    out += [Instruction("remove", s, c) for c, s in named]
    return tuple(out)


def _check_split(split: str):
    if split not in SPLITS:
        raise ValueError(f"instruction split must be 'train', 'heldout' or 'all', got {split!r}")


def _check_kind(kind: str | None):
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r}: expected one of {list(KINDS)}")


def _in_split(instruction: Instruction, split: str) -> bool:
    return split == "all" or instruction.held_out() == (split == "heldout")


@cache
def instructions(split: str = "all", kind: str | None = None) -> tuple[Instruction, ...]:
    """Every instruction of the grammar in a fixed order: ``split`` is "train", "heldout" or "all"."""
    _check_split(split)
    _check_kind(kind)
    return tuple(i for i in _all_instructions() if _in_split(i, split) and kind in (None, i.kind))


# --- edits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """A triple: the source scene, the instruction, and the target scene it asks for."""

    source: tuple[Obj, ...]
    instruction: Instruction
    target: tuple[Obj, ...]

    @property
    def text(self) -> str:
        return self.instruction.text


def find_object(scene, instruction: Instruction) -> int:
    """The index in ``scene`` of the one object the instruction names; :class:`EditError` if none or several."""
    if instruction.kind == "add":
        raise ValueError(f"instruction {instruction.text!r} names no object of the scene: it adds one")
    found = [i for i, o in enumerate(scene) if o.shape == instruction.shape and instruction.colour in (None, o.colour)]
    if len(found) != 1:
        named = f"{instruction.colour} {instruction.shape}" if instruction.colour else instruction.shape
        raise EditError(f"instruction {instruction.text!r}: the scene holds {len(found) or 'no'} "
                        f"{named}{'s' if len(found) > 1 else ''}; the object named must be the only one")
    return found[0]


def empty_cells(scene) -> list[tuple[int, int]]:
    taken = {o.cell for o in scene}
    return [c for c in CELLS if c not in taken]


def apply_edit(source, instruction: Instruction, rng: np.random.Generator | None = None) -> tuple[Obj, ...]:
    """The target scene: ``source`` with the one change the instruction asks for, every other object kept.

    Add draws the new object's empty cell, size and jitter from ``rng`` (required for add only);
    :class:`EditError` when the instruction does not apply to ``source``.
    """
    source = tuple(source)
    if instruction.kind == "add":
        free = empty_cells(source)
        if not free:
            raise EditError(f"instruction {instruction.text!r}: no empty cell to add to")
        if rng is None:
            raise ValueError(f"instruction {instruction.text!r}: add draws the new object's cell, size and "
                             "jitter; pass rng")
        cell = free[rng.integers(len(free))]
        size = SIZES[rng.integers(len(SIZES))]
        offset = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
        return source + (Obj(instruction.shape, instruction.colour, size, cell, offset),)
    i = find_object(source, instruction)
    obj = source[i]
    if instruction.kind == "remove":
        return source[:i] + source[i + 1:]
    if instruction.kind == "recolour":
        if obj.colour == instruction.new_colour:
            raise EditError(f"instruction {instruction.text!r}: the {obj.shape} is {obj.colour} already")
        changed = dataclasses.replace(obj, colour=instruction.new_colour)
    else:
        dr, dc = DIRECTIONS[instruction.direction]
        cell = (obj.cell[0] + dr, obj.cell[1] + dc)
        if cell not in CELLS or cell not in empty_cells(source):
            why = "off the grid" if cell not in CELLS else "a taken cell"
            raise EditError(f"instruction {instruction.text!r}: the {obj.shape} at {obj.cell} would move to {why}")
        changed = dataclasses.replace(obj, cell=cell)
    return source[:i] + (changed,) + source[i + 1:]


def candidates(source, kind: str) -> list[Instruction]:
    """Every instruction of ``kind`` that applies to ``source``, in the canonical form sampling uses
    (the object's colour named only when its shape is not enough)."""
    _check_kind(kind)
    if kind == "add":
        return [Instruction("add", s, c) for s in SHAPES for c in COLOURS] if empty_cells(source) else []
    out = []
    free = empty_cells(source)
    for obj in source:
        alike = [o for o in source if o.shape == obj.shape]
        if sum(o.colour == obj.colour for o in alike) > 1:
            continue  # another object has its shape and colour: no instruction picks it out
        colour = obj.colour if len(alike) > 1 else None
        if kind == "recolour":
            out += [Instruction("recolour", obj.shape, colour, new) for new in COLOURS if new != obj.colour]
        elif kind == "remove":
            out.append(Instruction("remove", obj.shape, colour))
        else:
            out += [Instruction("move", obj.shape, colour, direction=d) for d, (dr, dc) in DIRECTIONS.items()
                    if (obj.cell[0] + dr, obj.cell[1] + dc) in free]
    return out


def sample_edit(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> Edit:
    """A random edit whose instruction is in ``split``: a source of 1–3 random objects, then an
    instruction drawn uniformly from the ``split`` candidates of ``kind`` (drawn uniformly when
    None) that apply to it, then the target (a source with none is drawn again)."""
    _check_split(split)
    _check_kind(kind)
    kind = kind or KINDS[rng.integers(len(KINDS))]
    while True:
        source = random_scene(rng, MAX_SOURCE_OBJECTS)
        pool = [i for i in candidates(source, kind) if _in_split(i, split)] if source else []
        if pool:
            instruction = pool[rng.integers(len(pool))]
            return Edit(source, instruction, apply_edit(source, instruction, rng))


def eval_edits(n: int, seed: int, split: str = "heldout") -> list[Edit]:
    """``n`` edits for an evaluation: kinds in turn (edit i is ``KINDS[i % 4]``), each drawn by
    :func:`sample_edit` from one generator seeded ``seed``."""
    rng = np.random.default_rng([seed, 11])
    return [sample_edit(rng, split, KINDS[i % len(KINDS)]) for i in range(n)]


# --- metrics -------------------------------------------------------------------------------------


def _contents(scene) -> dict[tuple[int, int], tuple[str, str, str]]:
    return {tuple(o.cell): (o.shape, o.colour, o.size) for o in scene}


def edit_region(edit: Edit) -> frozenset[tuple[int, int]]:
    """The cells the edit may change: the object's cell, a move's new cell too, or add's empty cells."""
    if edit.instruction.kind == "add":
        return frozenset(empty_cells(edit.source))
    cell = edit.source[find_object(edit.source, edit.instruction)].cell
    if edit.instruction.kind != "move":
        return frozenset({cell})
    dr, dc = DIRECTIONS[edit.instruction.direction]
    return frozenset({cell, (cell[0] + dr, cell[1] + dc)})


def edit_success(edit: Edit, scene) -> bool:
    """True when ``scene`` (objects read back from the edited image) agrees with the edit's target on
    the edit's region; for add, when a cell empty in the source holds the named shape and colour."""
    got = _contents(scene)
    if edit.instruction.kind == "add":
        want = (edit.instruction.shape, edit.instruction.colour)
        return any(got[c][:2] == want for c in edit_region(edit) if c in got)
    target = _contents(edit.target)
    return all(got.get(c) == target.get(c) for c in edit_region(edit))


def preservation(edit: Edit, scene) -> bool:
    """True when ``scene`` agrees with the edit's source on every cell outside the edit's region
    (and, for add, holds at most one object in the source's empty cells)."""
    got, source, region = _contents(scene), _contents(edit.source), edit_region(edit)
    if any(got.get(c) != source.get(c) for c in CELLS if c not in region):
        return False
    return edit.instruction.kind != "add" or sum(c in got for c in region) <= 1


# --- training data -------------------------------------------------------------------------------


@dataclass
class EditStream:
    """An endless seeded stream of (instruction, source image, target image) training triples.

    Each sample draws an edit kind uniformly, then an edit of it (:func:`sample_edit`) from the
    ``split`` instructions. InstructPix2Pix's condition dropout (Brooks et al. 2023, §3.2.1; 5%
    each there): with probability ``drop_text`` only the instruction is dropped (replaced by the
    empty prompt), with ``drop_image`` only the source image, with ``drop_both`` both, so one network
    gives the three passes of two-condition guidance. The source image is dropped in latent space
    (the pipeline's unconditional image latent is zeros), so ``batch`` returns the source pixels
    with a mask ``image_dropped`` for the trainer to zero those samples' latents.
    """

    seed: int = 0
    split: str = "train"
    drop_text: float = 0.05
    drop_image: float = 0.05
    drop_both: float = 0.05
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        _check_split(self.split)
        for name in ("drop_text", "drop_image", "drop_both"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Expected {name} to be between 0.0 and 1.0, but got {value}")
        if self.drop_text + self.drop_image + self.drop_both > 1.0:
            raise ValueError(f"drop_text + drop_image + drop_both must be at most 1, got "
                             f"{self.drop_text + self.drop_image + self.drop_both:g}")
        self.rng = np.random.default_rng(self.seed)

    def batch(self, n: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(texts, sources (n, 32, 32, 3) uint8, targets (n, 32, 32, 3) uint8, image_dropped (n,) bool)."""
        texts, sources, targets = [], [], []
        image_dropped = np.zeros(n, bool)
        for k in range(n):
            edit = sample_edit(self.rng, self.split)
            u = self.rng.random()
            text_only, image_only = u < self.drop_text, self.drop_text <= u < self.drop_text + self.drop_image
            both = self.drop_text + self.drop_image <= u < self.drop_text + self.drop_image + self.drop_both
            texts.append("" if text_only or both else edit.text)
            image_dropped[k] = image_only or both
            sources.append(edit.source)
            targets.append(edit.target)
        return texts, render_batch(sources), render_batch(targets), image_dropped

