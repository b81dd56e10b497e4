"""Procedural scenes of coloured shapes with compositional captions: the shapes test bed's data.

A scene is a 32×32 RGB image on a dark background holding one to three objects, each with a
shape, a colour, a size and a cell of a 3×3 grid (with a sub-cell jitter). A caption comes from a
small grammar in the spirit of GenEval's categories (Ghosh et al., NeurIPS 2023, arXiv
2310.11513), with an exact parser, so captions and their attributes map to each other both ways:

    single        "a red circle"                                  one object
    two_objects   "a circle and a square"                         two objects, colours free
                                                                  (GenEval's two_object)
    colour_attr   "a red circle and a blue square"                two objects, colours bound
    position      "a green triangle to the left of a yellow cross" two objects and a relation
    counting      "two blue squares"                              two or three identical objects

A caption is *satisfied* by a scene (its list of objects, as rendered or as read back by the
scorer) when the scene holds exactly the objects the caption names and no other, with every
named attribute, and the relation holds between the cells (left of: a smaller column; above: a
smaller row). Attributes a caption does not name (size, cell, the colours of ``two_objects``) are
free.

Held-out combinations never appear in a training caption (a held-out pair such as a yellow circle
can still be drawn in a training image, where a ``two_objects`` caption leaves colours free): the
colour–shape pairs in ``HELD_OUT_PAIRS``, the shape pair of
``HELD_OUT_SHAPE_PAIR`` in ``two_objects`` captions, and the (shape, relation, shape) triples in
``HELD_OUT_TRIPLES``. ``captions("heldout")`` lists every caption with at least one of them,
``captions("train")`` the rest.

Everything is seeded: ``render(scene)`` is a pure function, ``sample_scene(caption, rng)`` draws
the free attributes from a ``numpy.random.Generator``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

IMAGE_SIZE = 32
GRID = 3  # cells per side
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = {  # RGB in [0, 255]; far apart in hue so that a 32×32 render leaves no doubt
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 220, 40),
    "purple": (170, 60, 220),
    "cyan": (40, 215, 215),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
RADIUS = {"small": 2.8, "large": 4.3}  # half the extent in pixels; a cell is 10.7 px wide
JITTER = 0.8  # px, uniform, each axis
BACKGROUND = (24, 24, 28)
RELATIONS = {  # caption phrase → (index into (row, col), the first object's coordinate is smaller?)
    "to the left of": (1, True),
    "to the right of": (1, False),
    "above": (0, True),
    "below": (0, False),
}
COUNT_WORDS = {2: "two", 3: "three"}
CATEGORIES = ("single", "two_objects", "colour_attr", "position", "counting")

HELD_OUT_PAIRS = frozenset({("yellow", "circle"), ("purple", "square"), ("blue", "triangle"), ("green", "cross")})
HELD_OUT_SHAPE_PAIR = frozenset({"triangle", "cross"})
HELD_OUT_TRIPLES = frozenset({
    ("circle", "to the left of", "square"), ("square", "to the right of", "triangle"),
    ("cross", "above", "circle"), ("triangle", "below", "square"),
})


class CaptionError(ValueError):
    """A caption the grammar cannot parse; names the caption and the first word that fails."""


@dataclass(frozen=True)
class Obj:
    """One object of a scene: attributes, plus the grid cell (row, col) and a jitter in pixels."""

    shape: str
    colour: str
    size: str = "large"
    cell: tuple[int, int] = (1, 1)
    offset: tuple[float, float] = (0.0, 0.0)  # (dy, dx), px


@dataclass(frozen=True)
class Caption:
    """A caption's meaning. ``objects`` are (colour or None, shape) in the order the text names them."""

    category: str
    objects: tuple[tuple[str | None, str], ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        return format_caption(self)

    def held_out(self) -> bool:
        """True when the caption holds a combination that no training caption holds."""
        if any((c, s) in HELD_OUT_PAIRS for c, s in self.objects):
            return True
        shapes = [s for _, s in self.objects]
        if self.category == "two_objects" and frozenset(shapes) == HELD_OUT_SHAPE_PAIR:
            return True
        return self.category == "position" and (shapes[0], self.relation, shapes[1]) in HELD_OUT_TRIPLES


def format_caption(caption: Caption) -> str:
    """The caption's text (the inverse of :func:`parse_caption`)."""
    objs = caption.objects
    noun = lambda c, s: f"a {c} {s}" if c else f"a {s}"
    if caption.category == "single":
        return noun(*objs[0])
    if caption.category in ("two_objects", "colour_attr"):
        return f"{noun(*objs[0])} and {noun(*objs[1])}"
    if caption.category == "position":
        return f"{noun(*objs[0])} {caption.relation} {noun(*objs[1])}"
    if caption.category == "counting":
        colour, shape = objs[0]
        return f"{COUNT_WORDS[len(objs)]} {colour} {PLURALS[shape]}"
    raise ValueError(f"unknown caption category {caption.category!r}")


def parse_caption(text: str) -> Caption:
    """The meaning of a caption of the grammar; :class:`CaptionError` names the word that fails."""
    words = text.strip().lower().split()
    if not words:
        raise CaptionError(f"caption {text!r}: empty")
    pos = 0

    def fail(expected: str):
        word = words[pos] if pos < len(words) else "<end>"
        raise CaptionError(f"caption {text!r}: unexpected word {word!r} at word {pos + 1} (expected {expected})")

    def take(options, expected):
        nonlocal pos
        if pos < len(words) and words[pos] in options:
            pos += 1
            return words[pos - 1]
        fail(expected)

    def noun_phrase():
        take(("a",), "'a'")
        colour = None
        if pos < len(words) and words[pos] in COLOURS:
            colour = take(COLOURS, "a colour")
        shape = take(SHAPES, "a shape" if colour else "a colour or a shape")
        return colour, shape

    if words[0] in COUNT_WORDS.values():
        n = {w: k for k, w in COUNT_WORDS.items()}[take(COUNT_WORDS.values(), "a number")]
        colour = take(COLOURS, "a colour")
        shape = {p: s for s, p in PLURALS.items()}.get(take(PLURALS.values(), "a plural shape"))
        if pos < len(words):
            fail("the end of the caption")
        return Caption("counting", ((colour, shape),) * n)

    first = noun_phrase()
    if pos == len(words):
        if first[0] is None:
            raise CaptionError(f"caption {text!r}: a single object needs a colour (e.g. 'a red {first[1]}')")
        return Caption("single", (first,))
    relation = None
    if words[pos] == "and":
        pos += 1
    else:
        for phrase in RELATIONS:
            n = len(phrase.split())
            if words[pos : pos + n] == phrase.split():
                relation, pos = phrase, pos + n
                break
        else:
            fail("'and', 'to the left of', 'to the right of', 'above', 'below' or the end of the caption")
    second = noun_phrase()
    if pos < len(words):
        fail("the end of the caption")
    if (first[0] is None) != (second[0] is None):
        raise CaptionError(f"caption {text!r}: give a colour to both objects or to neither")
    if relation and first[0] is None:
        raise CaptionError(f"caption {text!r}: objects in a relation need colours")
    if first[1] == second[1]:
        raise CaptionError(f"caption {text!r}: the two objects need different shapes (for two alike, say 'two ...')")
    if first[0] is not None and first[0] == second[0]:
        raise CaptionError(f"caption {text!r}: the two objects need different colours")
    category = "position" if relation else "colour_attr" if first[0] else "two_objects"
    return Caption(category, (first, second), relation)


@lru_cache(maxsize=None)
def _all_captions() -> tuple[Caption, ...]:
    out = [Caption("single", ((c, s),)) for s in SHAPES for c in COLOURS]
    out += [Caption("two_objects", ((None, a), (None, b))) for a, b in itertools.permutations(SHAPES, 2)]
    pairs = [((c1, s1), (c2, s2)) for s1, s2 in itertools.permutations(SHAPES, 2)
             for c1, c2 in itertools.permutations(COLOURS, 2)]
    out += [Caption("colour_attr", p) for p in pairs]
    out += [Caption("position", p, r) for p in pairs for r in RELATIONS]
    out += [Caption("counting", ((c, s),) * n) for n in COUNT_WORDS for s in SHAPES for c in COLOURS]
    return tuple(out)


@lru_cache(maxsize=None)
def captions(split: str = "all", category: str | None = None) -> tuple[Caption, ...]:
    """Every caption of the grammar in a fixed order: ``split`` is "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"caption split must be 'train', 'heldout' or 'all', got {split!r}")
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"unknown caption category {category!r}: expected one of {list(CATEGORIES)}")
    keep = lambda c: split == "all" or c.held_out() == (split == "heldout")
    return tuple(c for c in _all_captions() if keep(c) and category in (None, c.category))


def eval_captions(n: int, seed: int, split: str = "heldout") -> list[Caption]:
    """``n`` captions for an evaluation: categories in turn (sample i is category i mod 5), each
    caption drawn uniformly from its category's ``split`` captions by a generator seeded ``seed``."""
    rng = np.random.default_rng([seed, 7])
    pools = [captions(split, cat) for cat in CATEGORIES]
    return [pools[i % len(pools)][rng.integers(len(pools[i % len(pools)]))] for i in range(n)]


# --- scenes --------------------------------------------------------------------------------------


def sample_scene(caption: Caption, rng: np.random.Generator) -> tuple[Obj, ...]:
    """A scene that satisfies ``caption``: free colours, sizes, cells and jitters drawn from ``rng``."""
    n = len(caption.objects)
    while True:
        cells = [divmod(int(k), GRID) for k in rng.choice(GRID * GRID, size=n, replace=False)]
        if caption.relation is None or relation_holds(caption.relation, cells[0], cells[1]):
            break
    objs = []
    for (colour, shape), cell in zip(caption.objects, cells):
        colour = colour or COLOUR_NAMES[rng.integers(len(COLOURS))]
        size = SIZES[rng.integers(len(SIZES))]
        offset = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
        objs.append(Obj(shape, colour, size, cell, offset))
    return tuple(objs)


def random_scene(rng: np.random.Generator, max_objects: int = 4) -> tuple[Obj, ...]:
    """0 to ``max_objects`` objects with every attribute random (the scorer's training scenes)."""
    n = int(rng.integers(max_objects + 1))
    cells = [divmod(int(k), GRID) for k in rng.choice(GRID * GRID, size=n, replace=False)]
    return tuple(Obj(SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOURS))],
                     SIZES[rng.integers(len(SIZES))], cell,
                     tuple(float(v) for v in rng.uniform(-JITTER, JITTER, size=2))) for cell in cells)


def relation_holds(relation: str, cell_a: tuple[int, int], cell_b: tuple[int, int]) -> bool:
    axis, smaller = RELATIONS[relation]
    return cell_a[axis] < cell_b[axis] if smaller else cell_a[axis] > cell_b[axis]


def satisfies(scene, caption: Caption) -> bool:
    """True when ``scene`` (objects with shape, colour, cell) holds exactly what ``caption`` says."""
    if len(scene) != len(caption.objects):
        return False
    for perm in itertools.permutations(scene):
        if all(o.shape == s and (c is None or o.colour == c) for o, (c, s) in zip(perm, caption.objects)):
            if caption.relation is None or relation_holds(caption.relation, perm[0].cell, perm[1].cell):
                return True
    return False


def cell_centre(cell: tuple[int, int]) -> tuple[float, float]:
    """(y, x) of a cell's centre in pixel coordinates (pixel i spans [i, i + 1])."""
    step = IMAGE_SIZE / GRID
    return (cell[0] + 0.5) * step, (cell[1] + 0.5) * step


def _signed_distance(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (px, negative inside) to a shape of half-extent ``r`` centred at 0."""
    if shape == "circle":
        return np.hypot(dy, dx) - r
    if shape == "square":
        q = r * 0.86  # a square of the circle's area would look bigger; keep the extents alike
        return np.maximum(np.abs(dy), np.abs(dx)) - q
    if shape == "cross":
        arm = r * 0.36
        bar_h = np.maximum(np.abs(dy) - arm, np.abs(dx) - r)
        bar_v = np.maximum(np.abs(dx) - arm, np.abs(dy) - r)
        return np.minimum(bar_h, bar_v)
    if shape == "triangle":  # pointing up: apex (−r, 0), base corners (r, ±r)
        norm = 5**0.5  # the sides' outward normals are (−1, ±2)/√5 in (y, x)
        side_r = (2 * dx - (dy + r)) / norm
        side_l = (-2 * dx - (dy + r)) / norm
        return np.maximum(dy - r, np.maximum(side_r, side_l))
    raise ValueError(f"unknown shape {shape!r}: expected one of {list(SHAPES)}")


@lru_cache(maxsize=1)
def _pixel_grid() -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    return np.meshgrid(c, c, indexing="ij")  # (y, x), each (32, 32)


def render(scene) -> np.ndarray:
    """The scene as a (32, 32, 3) uint8 image; coverage from the signed distance gives smooth edges."""
    yy, xx = _pixel_grid()
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    image[:] = BACKGROUND
    for obj in scene:
        cy, cx = cell_centre(obj.cell)
        d = _signed_distance(obj.shape, yy - cy - obj.offset[0], xx - cx - obj.offset[1], RADIUS[obj.size])
        alpha = np.clip(0.5 - d, 0.0, 1.0)[..., None]
        image = image * (1 - alpha) + np.asarray(COLOURS[obj.colour], np.float32) * alpha
    return np.rint(image).astype(np.uint8)


def to_tensor(images: np.ndarray):
    """(N, 32, 32, 3) uint8 → (N, 3, 32, 32) float32 in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_batch(scenes) -> np.ndarray:
    return np.stack([render(s) for s in scenes])


@dataclass
class SceneStream:
    """An endless seeded stream of (caption text, image) training pairs from the training captions.

    Each batch draws a category uniformly, then a caption of it uniformly; with probability
    ``drop`` the caption is replaced by the empty prompt (condition dropout for CFG).
    """

    seed: int = 0
    split: str = "train"
    drop: float = 0.1
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self.pools = [captions(self.split, cat) for cat in CATEGORIES]

    def batch(self, n: int) -> tuple[list[str], np.ndarray]:
        texts, scenes = [], []
        for _ in range(n):
            pool = self.pools[self.rng.integers(len(self.pools))]
            cap = pool[self.rng.integers(len(pool))]
            scenes.append(sample_scene(cap, self.rng))
            texts.append("" if self.rng.random() < self.drop else cap.text)
        return texts, render_batch(scenes)
