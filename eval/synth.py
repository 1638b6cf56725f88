"""Synthetic long-caption image dataset: every test, benchmark and demo of facetclip uses it.

Each sample is a small procedurally drawn scene (PIL, default 64x64) of 1-3 flat objects on a
tinted background, plus three captions and the true one-word answer to each FLAME facet.

Scene
    main object   shape x colour x pattern (solid/striped/dotted/outlined) x size (large/huge);
                  always clearly the biggest thing in the picture, so a small vision tower can
                  learn its shape and colour.
    minor object  a small or tiny second shape of another colour (absent in ~20% of scenes).
    relation      where the main object is relative to the minor one: above, below, beside,
                  overlapping; "alone" when there is no minor object.
    extra object  a tiny third shape in a corner (~25% of scenes), mentioned only in the long
                  caption as distractor detail.
    mood          a word tied to the rendered background: light warm cream is "cheerful", light
                  azure "calm", lavender "dreamy", dark charcoal "gloomy", dark teal "eerie",
                  dark maroon "tense" (each with its own lighting gradient).

Facet answers (``SynthSample.answers``, keys = ``FACET_NAMES`` = ``embed.prompts.LONG_FACETS``)
    description -> main shape, main_object -> main shape, main_characteristic -> main colour,
    minor_object -> minor shape or "nothing", minor_characteristic -> minor colour or "nothing",
    action -> relation word, atmosphere -> mood word.

Captions
    caption        terse, noisy alt-text ("red star img 0412 jpg").
    short_caption  one sentence.
    long_caption   3-6 sentences (~60-190 words) in varied order, every facet answer appears
                   verbatim, plus distractor detail (style remarks, the extra object).
    All three always name the main object's shape and colour words.

Purity: a sample is a pure function of (seed, stream, index); its random generator is seeded
from a blake2b digest (never Python's salted ``hash``), so generation can be split across
processes or resumed and is byte-identical for the same arguments.

Held-out combinations: ``held_out_combos(seed)`` picks ~10% of colour x shape pairs (8 of 81,
each shape and each colour at most once) that are never the MAIN object of a training or
retrieval sample; they may still appear as minor or extra objects. ``eval/unseen`` holds them.

Layout written by ``write_synth(OUT, cfg)``::

    OUT/
      dataset.json            counts, seed, format, sizes, held-out combos, vocabulary
      README.txt              the same, for humans
      captions.parquet        key, caption, short_caption, long_caption   (train split, incl. failed)
      labels.parquet          key, split, failed, one column per facet answer, raw attributes
                              (every sample of every split)
      images/                 img2dataset output of the train split
        webdataset: 00000.tar ({key}.jpg, {key}.json, {key}.txt), 00000.parquet, 00000_stats.json
        parquet:    00000.parquet (key, url, jpg, txt, status, error_message, width, height,
                    short_caption, long_caption), 00000_stats.json
      eval/
        retrieval/images/<key>.jpg, retrieval/captions.parquet
                              (key, image, caption, short_caption, long_caption)
        zeroshot_shape/<shape>/<key>.jpg, classes.txt ("star")
        zeroshot_color_shape/<color>_<shape>/<key>.jpg, classes.txt ("red star")
        unseen/<color>_<shape>/<key>.jpg, classes.txt (held-out combos only)

classes.txt lists classes in sorted folder order (the order ImageFolder loaders assign labels).

Keys are img2dataset-style 9-digit strings: 5 shard digits + 4 index digits. Train sample i lands
in shard i // shard_size with key ``shard * 10000 + i % shard_size``; eval splits take the shard
numbers after the last train shard (one block of 10000 keys per 10000 eval samples), so keys are
unique across all splits. ``make_sample`` itself has no notion of shards: its key is the index
zero-padded to 9 digits (which equals the written key only when shard_size is 10000).

Failed downloads: a deterministic ``fail_fraction`` of train samples mimics img2dataset's
"failed_to_download": absent from tars, ``jpg`` null in parquet, but present in
captions.parquet and labels.parquet (``failed`` = true), so later stages must skip and count them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import random
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageChops, ImageDraw

from store.errors import InputError
from store.progress import Bar

FACET_NAMES = (
    "description",
    "main_object",
    "main_characteristic",
    "minor_object",
    "minor_characteristic",
    "action",
    "atmosphere",
)

# Colours chosen to stay distinct after 64 px JPEG; RGB values are the un-jittered base.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (250, 140, 0),
    "yellow": (250, 225, 0),
    "green": (30, 165, 60),
    "blue": (30, 80, 230),
    "purple": (140, 50, 200),
    "pink": (250, 120, 200),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "diamond",
    "hexagon",
    "crescent",
)
PATTERNS = ("solid", "striped", "dotted", "outlined")
MAIN_SIZES = {"large": 0.25, "huge": 0.30}  # radius as a fraction of the image side
MINOR_SIZES = {"small": 0.115, "tiny": 0.09}
EXTRA_RADIUS = 0.065
RELATIONS = ("above", "below", "beside", "overlapping")
ALONE = "alone"  # the relation (action answer) of a one-object scene
NOTHING = "nothing"  # the minor-object answers of a one-object scene


@dataclass(frozen=True)
class Mood:
    """A mood is what the background looks like: its colour, name and lighting gradient."""

    background: str  # a word outside the colour vocabulary, so captions stay unambiguous
    rgb: tuple[int, int, int]
    lighting: str
    lighting_phrases: tuple[str, ...]
    synonyms: tuple[str, ...]
    gradient: float  # brightness change from top (+) to bottom, as a fraction


MOODS: dict[str, Mood] = {
    "cheerful": Mood(
        "cream",
        (255, 238, 175),
        "bright",
        ("bright sunny light", "bright warm daylight"),
        ("happy", "upbeat", "sunny"),
        0.06,
    ),
    "calm": Mood(
        "azure",
        (180, 215, 240),
        "soft",
        ("soft diffuse light", "soft even light"),
        ("peaceful", "quiet", "serene"),
        0.04,
    ),
    "dreamy": Mood(
        "lavender",
        (215, 195, 240),
        "hazy",
        ("a hazy glow", "hazy pastel light"),
        ("whimsical", "soft-focus", "floaty"),
        0.05,
    ),
    "gloomy": Mood(
        "charcoal",
        (70, 72, 80),
        "dim",
        ("dim overcast light", "dim grey light"),
        ("bleak", "sombre", "dreary"),
        -0.25,
    ),
    "eerie": Mood(
        "teal",
        (20, 60, 55),
        "faint",
        ("a faint sickly glow", "faint murky light"),
        ("uncanny", "ghostly", "unsettling"),
        -0.3,
    ),
    "tense": Mood(
        "maroon",
        (95, 20, 30),
        "harsh",
        ("harsh low light", "harsh crimson light"),
        ("anxious", "dramatic", "uneasy"),
        -0.3,
    ),
}

# Colour pairs closer than this (redmean distance) are hard to tell apart at 64 px; objects
# are never drawn on such a background, and a minor object never takes such a main colour.
MIN_CONTRAST = 220.0
HELD_OUT_COUNT = 8  # ~10% of the 81 colour x shape pairs
MAX_N = 10_000_000
KEYS_PER_SHARD = 10_000  # 4 index digits
MAX_SHARDS = 100_000  # 5 shard digits
JPEG_QUALITY = 90
FORMATS = ("webdataset", "parquet")
EVAL_SPLITS = ("retrieval", "zeroshot_shape", "zeroshot_color_shape", "unseen")


@dataclass(frozen=True)
class SynthSample:
    key: str  # 9 digits
    caption: str
    short_caption: str
    long_caption: str
    answers: dict[str, str]  # FACET_NAMES -> one lowercase word
    attributes: dict[str, str]  # raw scene attributes, same keys for every sample
    image: Image.Image | None  # None when render=False


# ---------------------------------------------------------------------------------------------
# Randomness: one independent generator per (seed, stream, index)


def _rng(seed: int, stream: str, index: int) -> random.Random:
    """A generator that depends only on its arguments (blake2b, not the salted ``hash``)."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """Redmean colour distance: a cheap perceptual approximation, good enough to reject pairs."""
    rmean = (a[0] + b[0]) / 2
    dr, dg, db = a[0] - b[0], a[1] - b[1], a[2] - b[2]
    return math.sqrt(
        (2 + rmean / 256) * dr * dr + 4 * dg * dg + (2 + (255 - rmean) / 256) * db * db
    )


def _moods_for(*colors: str) -> list[str]:
    return [
        m
        for m, mood in MOODS.items()
        if all(_contrast(COLORS[c], mood.rgb) >= MIN_CONTRAST for c in colors)
    ]


def held_out_combos(seed: int = 0) -> list[tuple[str, str]]:
    """The (colour, shape) pairs never used as a main object in training, fixed by the seed.

    Shapes and colours are paired by two seeded permutations, so each shape and each colour is
    held out at most once and every shape and colour is still seen in training with others.
    """
    rng = _rng(seed, "held-out", 0)
    shapes, colors = list(SHAPES), list(COLORS)
    rng.shuffle(shapes)
    rng.shuffle(colors)
    return sorted(zip(colors[:HELD_OUT_COUNT], shapes[:HELD_OUT_COUNT], strict=True))


@functools.lru_cache(maxsize=64)
def _held_out_set(seed: int) -> frozenset[tuple[str, str]]:
    return frozenset(held_out_combos(seed))


def vocabulary() -> dict[str, list[str]]:
    """Every attribute's possible values (and each facet's possible answers)."""
    return {
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "patterns": list(PATTERNS),
        "main_sizes": list(MAIN_SIZES),
        "minor_sizes": list(MINOR_SIZES),
        "relations": [*RELATIONS, ALONE],
        "positions": ["center", "top", "bottom", "left", "right"],
        "moods": list(MOODS),
        "backgrounds": [m.background for m in MOODS.values()],
        "lightings": [m.lighting for m in MOODS.values()],
        "facet_names": list(FACET_NAMES),
        "description": list(SHAPES),
        "main_object": list(SHAPES),
        "main_characteristic": list(COLORS),
        "minor_object": [*SHAPES, NOTHING],
        "minor_characteristic": [*COLORS, NOTHING],
        "action": [*RELATIONS, ALONE],
        "atmosphere": list(MOODS),
    }


# ---------------------------------------------------------------------------------------------
# Scene: the attributes and the geometry, drawn from one generator


@dataclass(frozen=True)
class _Obj:
    shape: str
    color: str
    pattern: str
    size: str
    cx: float  # centre and radius in [0, 1] image units
    cy: float
    r: float
    rot: float  # degrees
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class _Scene:
    main: _Obj
    minor: _Obj | None
    extra: _Obj | None
    relation: str
    position: str  # of the main object
    mood: str
    bg_rgb: tuple[int, int, int]
    corner: str  # where the extra object sits
    number: int  # a fake file number for the alt-text


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _pick_main(
    rng: random.Random, held_out: frozenset[tuple[str, str]], shape: str | None, color: str | None
) -> tuple[str, str]:
    """Main shape and colour; unconstrained draws skip the held-out combos."""
    if shape is not None and color is not None:
        return shape, color
    while True:
        s = shape or rng.choice(SHAPES)
        c = color or rng.choice(list(COLORS))
        if (c, s) not in held_out:
            return s, c


def _clamp(v: float, r: float) -> float:
    # Keep the object's circumscribed circle inside the frame with a small margin.
    return min(max(v, r + 0.02), 1 - r - 0.02)


def _layout(
    rng: random.Random, relation: str, rm: float, rn: float
) -> tuple[float, float, float, float, str]:
    """Centres of main (rm) and minor (rn) objects for a relation, and the main's position word."""
    if relation == ALONE:
        return 0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08), 0.0, 0.0, "center"
    if relation in ("above", "below"):
        near, far = 0.03 + rm + rng.uniform(0, 0.03), 0.97 - rn - rng.uniform(0, 0.04)
        mx, nx = _clamp(rng.uniform(0.3, 0.7), rm), _clamp(rng.uniform(0.2, 0.8), rn)
        if relation == "above":
            return mx, near, nx, far, "top"
        return mx, 1 - near, nx, 1 - far, "bottom"
    if relation == "beside":
        near, far = 0.03 + rm + rng.uniform(0, 0.03), 0.97 - rn - rng.uniform(0, 0.04)
        my, ny = _clamp(rng.uniform(0.3, 0.7), rm), _clamp(rng.uniform(0.2, 0.8), rn)
        if rng.random() < 0.5:
            return near, my, far, ny, "left"
        return 1 - near, my, 1 - far, ny, "right"
    # overlapping: the minor object's centre sits on the main object's rim, drawn on top of it.
    mx, my = 0.5 + rng.uniform(-0.06, 0.06), 0.5 + rng.uniform(-0.06, 0.06)
    angle = rng.uniform(0, 2 * math.pi)
    nx, ny = (
        _clamp(mx + 0.85 * rm * math.cos(angle), rn),
        _clamp(my + 0.85 * rm * math.sin(angle), rn),
    )
    return mx, my, nx, ny, "center"


_CORNERS = {
    "top left": (0.09, 0.09),
    "top right": (0.91, 0.09),
    "bottom left": (0.09, 0.91),
    "bottom right": (0.91, 0.91),
}


def _scene(
    rng: random.Random,
    held_out: frozenset[tuple[str, str]],
    main_shape: str | None = None,
    main_color: str | None = None,
) -> _Scene:
    shape, color = _pick_main(rng, held_out, main_shape, main_color)
    n_objects = rng.choices((1, 2, 3), weights=(0.2, 0.55, 0.25))[0]
    minor_color = None
    if n_objects >= 2:
        # The minor colour must stand out against the main colour (it may overlap it).
        choices = [c for c in COLORS if _contrast(COLORS[c], COLORS[color]) >= 200]
        minor_color = rng.choice(choices)
        moods = _moods_for(color, minor_color) or _moods_for(color)
    else:
        moods = _moods_for(color)
    mood = rng.choice(moods)
    bg = _jitter(rng, MOODS[mood].rgb, 8)
    relation = rng.choice(RELATIONS) if n_objects >= 2 else ALONE

    main_size = rng.choice(list(MAIN_SIZES))
    rm = MAIN_SIZES[main_size] + rng.uniform(-0.01, 0.01)
    minor_size = rng.choice(list(MINOR_SIZES))
    rn = MINOR_SIZES[minor_size] + rng.uniform(-0.01, 0.01)
    mx, my, nx, ny, position = _layout(rng, relation, rm, rn)
    main = _Obj(
        shape,
        color,
        rng.choice(PATTERNS),
        main_size,
        mx,
        my,
        rm,
        rng.uniform(-12, 12),
        _jitter(rng, COLORS[color], 12),
    )
    minor = None
    if minor_color is not None:
        minor = _Obj(
            rng.choice(SHAPES),
            minor_color,
            rng.choice(PATTERNS),
            minor_size,
            nx,
            ny,
            rn,
            rng.uniform(-12, 12),
            _jitter(rng, COLORS[minor_color], 12),
        )
    extra, corner = None, ""
    if n_objects == 3:
        # The corner farthest from both objects keeps the extra object from covering them.
        def clearance(name: str) -> float:
            x, y = _CORNERS[name]
            return min((x - o.cx) ** 2 + (y - o.cy) ** 2 for o in (main, minor) if o is not None)

        corner = max(sorted(_CORNERS), key=clearance)
        ex, ey = _CORNERS[corner]
        extra_color = rng.choice(
            [c for c in COLORS if _contrast(COLORS[c], MOODS[mood].rgb) >= MIN_CONTRAST]
        )
        extra = _Obj(
            rng.choice(SHAPES),
            extra_color,
            "solid",
            "tiny",
            ex,
            ey,
            EXTRA_RADIUS,
            0.0,
            COLORS[extra_color],
        )
    return _Scene(main, minor, extra, relation, position, mood, bg, corner, rng.randrange(10_000))


def _answers(s: _Scene) -> dict[str, str]:
    return {
        "description": s.main.shape,
        "main_object": s.main.shape,
        "main_characteristic": s.main.color,
        "minor_object": s.minor.shape if s.minor else NOTHING,
        "minor_characteristic": s.minor.color if s.minor else NOTHING,
        "action": s.relation,
        "atmosphere": s.mood,
    }


def _attributes(s: _Scene) -> dict[str, str]:
    m, n, e = s.main, s.minor, s.extra
    return {
        "main_shape": m.shape,
        "main_color": m.color,
        "main_pattern": m.pattern,
        "main_size": m.size,
        "main_position": s.position,
        "minor_shape": n.shape if n else NOTHING,
        "minor_color": n.color if n else NOTHING,
        "minor_pattern": n.pattern if n else NOTHING,
        "minor_size": n.size if n else NOTHING,
        "relation": s.relation,
        "extra_shape": e.shape if e else NOTHING,
        "extra_color": e.color if e else NOTHING,
        "extra_corner": s.corner or NOTHING,
        "background": MOODS[s.mood].background,
        "lighting": MOODS[s.mood].lighting,
        "mood": s.mood,
        "n_objects": str(1 + (n is not None) + (e is not None)),
    }


# ---------------------------------------------------------------------------------------------
# Captions. Every template names the main shape and colour; the long caption names every
# facet answer verbatim. Sentences are self-contained (no "it" pointing at an earlier
# sentence), so their order can be shuffled freely.

_PATTERN_ADJ = {"solid": "solid", "striped": "striped", "dotted": "dotted", "outlined": "outlined"}
_PATTERN_PHRASE = {
    "solid": (
        "filled with one flat, even colour",
        "painted in a single solid colour",
        "with a plain solid fill",
    ),
    "striped": (
        "decorated with bold diagonal stripes",
        "with darker stripes running over its body",
        "covered in a striped pattern",
    ),
    "dotted": (
        "sprinkled with small round dots",
        "covered in a dotted pattern",
        "with a polka-dot texture",
    ),
    "outlined": (
        "drawn only as a thick outline",
        "shown as an outline with an empty middle",
        "sketched as a hollow outlined shape",
    ),
}
_SIZE_PHRASE = {
    "huge": (
        "fills most of the frame",
        "takes up most of the picture",
        "is by far the biggest thing in view",
    ),
    "large": ("dominates the composition", "is clearly the largest object", "takes centre stage"),
}
_STYLE = (
    "The edges look slightly soft, as if the picture had been scaled down from a larger drawing.",
    "Faint compression artifacts are visible around the outlines, typical of a small web thumbnail.",
    "The whole picture looks like a simple flat vector illustration or an icon from a children's book.",
    "There is no text, watermark, frame or border anywhere in the picture, only flat shapes and colour.",
    "The composition is minimal, with generous empty space left around the shapes and no texture on the ground.",
    "Nothing in the picture casts a shadow, and the shapes look as if they were cut from coloured paper.",
)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _alt_text(s: _Scene, rng: random.Random) -> str:
    m = s.main
    c, sh, num = m.color, m.shape, s.number
    bg = MOODS[s.mood].background
    minor = s.minor.shape if s.minor else "icon"
    options = (
        f"{c} {sh} img {num:04d} jpg",
        f"IMG_{num:04d} {c} {sh}",
        f"{c} {sh} {minor} {bg} stock vector",
        f"{sh} {c} clipart {num}",
        f"{c} {sh} icon png",
        f"{m.size} {c} {sh} on {bg} background - free download",
        f"{c}-{sh}-{_PATTERN_ADJ[m.pattern]} {num:04d}",
        f"{sh} | {c} | {s.mood} wallpaper",
    )
    return rng.choice(options)


def _short_caption(s: _Scene, rng: random.Random) -> str:
    m, n = s.main, s.minor
    mood = MOODS[s.mood]
    pat = _PATTERN_ADJ[m.pattern]
    if n is None:
        options = (
            f"A {m.size} {pat} {m.color} {m.shape} alone on a {mood.background} background.",
            f"A {m.color} {m.shape} stands alone in a {s.mood} scene.",
            f"Picture of {_a(pat)} {pat} {m.color} {m.shape} on {mood.background}.",
        )
    else:
        options = (
            f"A {m.size} {m.color} {m.shape} {s.relation} a {n.size} {n.color} {n.shape} on a {mood.background} background.",
            f"{_a(m.color).capitalize()} {m.color} {pat} {m.shape} {s.relation} a {n.color} {n.shape}, {s.mood} mood.",
            f"Picture of {_a(pat)} {pat} {m.color} {m.shape} with a small {n.color} {n.shape} on {mood.background}.",
        )
    return rng.choice(options)


def _main_sentence(s: _Scene, rng: random.Random) -> str:
    m = s.main
    where = {
        "center": "near the centre of the frame",
        "top": "in the upper part of the frame",
        "bottom": "in the lower part of the frame",
        "left": "on the left side of the frame",
        "right": "on the right side of the frame",
    }[s.position]
    pat = rng.choice(_PATTERN_PHRASE[m.pattern])
    options = (
        f"The image shows {_a(m.size)} {m.size} {m.color} {m.shape} {pat}, placed {where}.",
        f"The centre of attention is {_a(m.size)} {m.size} {m.shape} in {m.color}, {pat}, sitting {where}.",
        f"{_a(m.color).capitalize()} {m.color} {m.shape}, {pat}, is the main subject here and {rng.choice(_SIZE_PHRASE[m.size])} {where}.",
        f"The main object is {_a(m.size)} {m.size} {_PATTERN_ADJ[m.pattern]} {m.shape} whose colour is a strong {m.color}, and it sits {where}.",
    )
    return rng.choice(options)


def _main_detail_sentence(s: _Scene, rng: random.Random) -> str:
    m = s.main
    options = (
        f"The {m.color} colour of the {m.shape} is vivid and saturated, and the {m.shape} {rng.choice(_SIZE_PHRASE[m.size])}.",
        f"Because the {m.shape} is so big and so {m.color}, it is the first thing the eye lands on, well before any other detail.",
        f"Its {_PATTERN_ADJ[m.pattern]} {m.color} surface makes the {m.shape} easy to recognise even at this tiny resolution.",
    )
    return rng.choice(options)


def _minor_sentence(s: _Scene, rng: random.Random) -> str:
    m, n = s.main, s.minor
    if n is None:
        options = (
            f"There is nothing else in the scene, so the {m.shape} is alone against the empty background with no companion.",
            f"The {m.color} {m.shape} is alone: no second object appears anywhere, and apart from it the frame holds nothing.",
            f"No minor object keeps it company; the {m.shape} stands alone, surrounded by nothing but flat background.",
        )
        return rng.choice(options)
    pat = rng.choice(_PATTERN_PHRASE[n.pattern])
    rel = {
        "above": f"The {m.shape} is above the {n.shape}",
        "below": f"The {m.shape} is below the {n.shape}",
        "beside": f"The {m.shape} is beside the {n.shape}",
        "overlapping": f"The {m.shape} is overlapping with the {n.shape}, which covers part of its rim",
    }[s.relation]
    options = (
        f"A second, much smaller {n.color} {n.shape} {pat} also appears, and {rel[0].lower()}{rel[1:]}.",
        f"{rel}, a much smaller {n.color} shape {pat}.",
        f"Next to the main subject there is {_a(n.size)} {n.size} {n.shape} in {n.color}; {rel[0].lower()}{rel[1:]}.",
    )
    return rng.choice(options)


def _relation_sentence(s: _Scene, rng: random.Random) -> str:
    m, n = s.main, s.minor
    if n is None:
        return f"With nothing to relate to, the {m.shape} simply floats alone in the {s.position} of the picture, quiet and still."
    side = {
        "above": "higher up in the picture",
        "below": "lower down in the picture",
        "beside": "side by side with it",
        "overlapping": "so close that the two shapes overlap",
    }[s.relation]
    options = (
        f"Seen together, the {m.color} {m.shape} is {s.relation} the {n.color} {n.shape}, {side}.",
        f"The spatial relation is easy to read: relative to the little {n.shape}, the big {m.shape} is {s.relation} it, {side}.",
    )
    return rng.choice(options)


def _atmosphere_sentence(s: _Scene, rng: random.Random) -> str:
    mood = MOODS[s.mood]
    light = rng.choice(mood.lighting_phrases)
    syn = rng.choice(mood.synonyms)
    options = (
        f"The background is a flat {mood.background} wash under {light}, which gives the whole scene a {s.mood}, {syn} atmosphere.",
        f"Behind the shapes lies a {mood.background} backdrop lit by {light}, and the overall mood feels {s.mood} and a little {syn}.",
        f"Thanks to the {mood.background} background and {light}, the picture has a distinctly {s.mood} feeling.",
    )
    return rng.choice(options)


def _extra_sentence(s: _Scene, rng: random.Random) -> str:
    e = s.extra
    assert e is not None
    options = (
        f"In the {s.corner} corner there is also a tiny {e.color} {e.shape}, easy to miss at first glance.",
        f"A tiny {e.color} {e.shape} hides in the {s.corner} corner, far from the other shapes.",
    )
    return rng.choice(options)


_TAILS = {
    "main": (
        "its edges standing out crisply against the plain background behind it",
        "clearly bigger than anything else that shares the picture with it",
        "drawn in the clean, flat style of a simple digital illustration",
    ),
    "minor": (
        "although it is far less prominent than the main subject of the picture",
        "adding a small second point of interest to an otherwise simple layout",
        "and the eye only notices it after taking in the larger shape",
    ),
    "atmosphere": (
        "a feeling that is carried almost entirely by the colour of the backdrop",
        "since the lighting tints every part of the frame in the same way",
        "even though the picture contains nothing but a few simple shapes",
    ),
}


def _with_tail(sentence: str, part: str, rng: random.Random, p: float) -> str:
    """Lengthen a sentence with a neutral clause (keeps long captions in ~60-190 words)."""
    if rng.random() >= p:
        return sentence
    return f"{sentence[:-1]}, {rng.choice(_TAILS[part])}."


def _long_caption(s: _Scene, rng: random.Random) -> str:
    # Three sentences carry every facet (main; minor + relation; background + mood); up to three
    # more add detail and distractors, for 3-6 sentences in all.
    n_extra = rng.randint(0, 3)
    p_tail = 0.9 if n_extra <= 1 else 0.4  # short captions get longer sentences
    required = [
        _with_tail(_main_sentence(s, rng), "main", rng, p_tail),
        _with_tail(_minor_sentence(s, rng), "minor", rng, p_tail),
        _with_tail(_atmosphere_sentence(s, rng), "atmosphere", rng, p_tail),
    ]
    optional = [_main_detail_sentence(s, rng), _relation_sentence(s, rng), *rng.sample(_STYLE, 2)]
    chosen = []
    if s.extra is not None and n_extra:
        chosen.append(_extra_sentence(s, rng))  # the extra object is usually mentioned
    chosen += rng.sample(optional, n_extra - len(chosen))
    rest = required[1:] + chosen
    rng.shuffle(rest)
    if rng.random() < 0.25:
        # Sometimes open with the atmosphere instead of the main object.
        return " ".join([required[2], required[0], *[x for x in rest if x is not required[2]]])
    return " ".join([required[0], *rest])


# ---------------------------------------------------------------------------------------------
# Rendering: draw at SS x the target size, then box-reduce for clean anti-aliased edges.


def _shape_ops(
    shape: str, cx: float, cy: float, r: float, rot: float
) -> list[tuple[str, list[float], int]]:
    """Drawing operations (kind, coords, fill) for one shape in pixel units; fill 0 erases."""

    def poly(points: list[tuple[float, float]]) -> tuple[str, list[float], int]:
        a = math.radians(rot)
        ca, sa = math.cos(a), math.sin(a)
        coords: list[float] = []
        for x, y in points:
            coords += [cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)]
        return ("poly", coords, 255)

    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [
            (
                radius * math.cos(start + 2 * math.pi * k / n),
                radius * math.sin(start + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if shape == "circle":
        rr = 0.9 * r  # a disc looks bigger than polygons of the same circumradius
        return [("ellipse", [cx - rr, cy - rr, cx + rr, cy + rr], 255)]
    if shape == "crescent":
        a = math.radians(rot)
        ox, oy = cx + 0.45 * r * math.cos(a), cy + 0.45 * r * math.sin(a) - 0.15 * r
        ri = 0.78 * r
        return [
            ("ellipse", [cx - r, cy - r, cx + r, cy + r], 255),
            ("ellipse", [ox - ri, oy - ri, ox + ri, oy + ri], 0),
        ]
    if shape == "square":
        return [poly([(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)])]
    if shape == "triangle":
        return [poly([(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)])]
    if shape == "star":
        outer, inner = ring(5, 1.0, -math.pi / 2), ring(5, 0.45, -math.pi / 2 + math.pi / 5)
        return [poly([p for pair in zip(outer, inner, strict=True) for p in pair])]
    if shape == "heart":
        pts = []
        for k in range(32):
            t = 2 * math.pi * k / 32
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            # Centred on its bounding box: x in +-1.03, y in +-0.92.
            pts.append((x / 15.5, (y - 2.6) / 15.5))
        return [poly(pts)]
    if shape == "cross":
        w = 0.34
        return [
            poly(
                [
                    (-w, -1),
                    (w, -1),
                    (w, -w),
                    (1, -w),
                    (1, w),
                    (w, w),
                    (w, 1),
                    (-w, 1),
                    (-w, w),
                    (-1, w),
                    (-1, -w),
                    (-w, -w),
                ]
            )
        ]
    if shape == "diamond":
        return [poly([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)])]
    if shape == "hexagon":
        return [poly(ring(6, 1.0, 0.0))]
    raise ValueError(f"unknown shape {shape!r}")


def _mask(box: tuple[int, int, int, int], ops: list[tuple[str, list[float], int]]) -> Image.Image:
    """The shape's coverage over ``box`` only: drawing and pasting a small box instead of the
    whole canvas is what keeps rendering fast."""
    x0, y0, x1, y1 = box
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(mask)
    for kind, coords, fill in ops:
        local = [v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(coords)]
        if kind == "ellipse":
            draw.ellipse(local, fill=fill)
        else:
            draw.polygon(local, fill=fill)
    return mask


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A second tone of the same colour for stripes and dots: lighter for dark colours."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luma < 90:
        return tuple(int(c + 0.5 * (255 - c)) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c * 0.55) for c in rgb)  # type: ignore[return-value]


def _texture(
    box: tuple[int, int, int, int], pattern: str, cx: float, cy: float, r: float
) -> Image.Image:
    """Stripes or dots over ``box`` (255 where the second tone goes)."""
    x0, y0, x1, y1 = box
    texture = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(texture)
    cx, cy = cx - x0, cy - y0
    step = max(3.0, r * 0.42)
    if pattern == "striped":
        k = -2 * r
        while k < 2 * r:
            draw.line(
                [cx + k - 2 * r, cy - 2 * r, cx + k + 2 * r, cy + 2 * r],
                fill=255,
                width=max(1, int(step * 0.45)),
            )
            k += step
        return texture
    dot = step * 0.24
    y = cy - r + step / 2
    while y < cy + r:
        x = cx - r + step / 2
        while x < cx + r:
            draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=255)
            x += step
        y += step
    return texture


def _draw_object(canvas: Image.Image, o: _Obj) -> None:
    size = canvas.size[0]
    cx, cy, r = o.cx * size, o.cy * size, o.r * size
    # Every shape fits in a circle of 1.15 r (square corners, rotated cross arms).
    reach = 1.15 * r + 2
    box = (
        max(0, int(cx - reach)),
        max(0, int(cy - reach)),
        min(size, int(cx + reach) + 1),
        min(size, int(cy + reach) + 1),
    )
    mask = _mask(box, _shape_ops(o.shape, cx, cy, r, o.rot))
    if o.pattern == "outlined":
        # Hollow: the shape minus a shrunk copy of itself (shrunk about the crescent's body,
        # not its circle centre, so the crescent keeps a visible rim on both sides).
        ox = cx - 0.45 * r * math.cos(math.radians(o.rot)) if o.shape == "crescent" else cx
        oy = cy - 0.45 * r * math.sin(math.radians(o.rot)) if o.shape == "crescent" else cy
        scale = 0.55 if o.shape == "crescent" else 0.68
        inner = _shape_ops(
            o.shape, ox + (cx - ox) * scale, oy + (cy - oy) * scale, r * scale, o.rot
        )
        mask = ImageChops.subtract(mask, _mask(box, inner))
    canvas.paste(o.rgb, box, mask)
    if o.pattern in ("striped", "dotted"):
        texture = _texture(box, o.pattern, cx, cy, r)
        canvas.paste(_shade(o.rgb), box, ImageChops.multiply(mask, texture))


def _background(size: int, rgb: tuple[int, int, int], gradient: float) -> Image.Image:
    # A vertical lighting gradient: bright moods light from above, dark moods fade downwards.
    column = bytearray()
    for y in range(size):
        f = 1 + gradient * (0.5 - y / max(1, size - 1))
        column += bytes(min(255, max(0, int(c * f))) for c in rgb)
    return Image.frombytes("RGB", (1, size), bytes(column)).resize(
        (size, size), Image.Resampling.NEAREST
    )


def _render(s: _Scene, image_size: int) -> Image.Image:
    ss = max(1, min(4, 256 // image_size))  # supersampling factor; 4x at 64 px
    canvas = _background(image_size * ss, s.bg_rgb, MOODS[s.mood].gradient)
    for o in (s.main, s.minor, s.extra):
        if o is not None:
            _draw_object(canvas, o)
    return canvas.reduce(ss) if ss > 1 else canvas


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes with fixed settings (4:4:4 keeps small coloured shapes crisp)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Public sample API


def _sample(
    seed: int,
    stream: str,
    index: int,
    key: str,
    *,
    image_size: int,
    render: bool,
    main_shape: str | None = None,
    main_color: str | None = None,
) -> SynthSample:
    rng = _rng(seed, stream, index)
    scene = _scene(rng, _held_out_set(seed), main_shape, main_color)
    # Captions use their own generator so that rendering choices never shift caption text.
    text_rng = _rng(seed, stream + "/text", index)
    return SynthSample(
        key=key,
        caption=_alt_text(scene, text_rng),
        short_caption=_short_caption(scene, text_rng),
        long_caption=_long_caption(scene, text_rng),
        answers=_answers(scene),
        attributes=_attributes(scene),
        image=_render(scene, image_size) if render else None,
    )


def make_sample(seed: int, index: int, *, image_size: int = 64, render: bool = True) -> SynthSample:
    """Training sample ``index`` of the dataset with this seed (a pure function of both).

    The key is ``f"{index:09d}"``; ``write_synth`` re-keys samples img2dataset-style by shard.

    >>> s = make_sample(0, 42, render=False)
    >>> s.answers["main_object"] in s.caption
    True
    """
    return _sample(seed, "train", index, f"{index:09d}", image_size=image_size, render=render)


def iter_samples(
    n: int, seed: int = 0, *, start: int = 0, render: bool = False, image_size: int = 64
) -> Iterator[SynthSample]:
    """Training samples ``start .. start + n - 1`` (images only when ``render``)."""
    for index in range(start, start + n):
        yield make_sample(seed, index, image_size=image_size, render=render)


# ---------------------------------------------------------------------------------------------
# Writing the dataset


@dataclass
class SynthConfig:
    n: int = 2000  # train samples (failed ones included)
    seed: int = 0
    format: str = "webdataset"  # or "parquet"
    image_size: int = 64
    shard_size: int = 1000
    fail_fraction: float = 0.02
    n_retrieval: int = 200  # held-out image-caption pairs
    n_zeroshot_per_class: int = 10  # per class of each zero-shot set (and of unseen/)
    overwrite: bool = False


@dataclass
class SynthSummary:
    out: Path
    counts: dict[str, int]  # samples per split (train includes failed)
    n_failed: int  # train samples written as failed downloads
    held_out: list[str]  # "color shape" combos never a train main object
    seconds: float
    samples_per_s: float  # all splits, rendering + encoding + writing
    shards: list[str] = field(default_factory=list)


# What write_synth creates directly under OUT; --overwrite removes exactly these.
_OUTPUTS = ("images", "eval", "captions.parquet", "labels.parquet", "dataset.json", "README.txt")


def _validate(out: Path, cfg: SynthConfig) -> None:
    if not 1 <= cfg.n <= MAX_N:
        raise InputError(f"n must be in 1..{MAX_N:_}, got {cfg.n}; pass --n within that range.")
    if not 16 <= cfg.image_size <= 1024:
        raise InputError(f"image_size must be in 16..1024 pixels, got {cfg.image_size}.")
    if cfg.format not in FORMATS:
        raise InputError(f"unknown format {cfg.format!r}; use one of: {', '.join(FORMATS)}.")
    if not 1 <= cfg.shard_size <= KEYS_PER_SHARD:
        raise InputError(
            f"shard_size must be in 1..{KEYS_PER_SHARD} (4 index digits per key), got {cfg.shard_size}."
        )
    if not 0.0 <= cfg.fail_fraction < 1.0:
        raise InputError(f"fail_fraction must be in [0, 1), got {cfg.fail_fraction}.")
    if cfg.n_retrieval < 0 or cfg.n_zeroshot_per_class < 0:
        raise InputError("n_retrieval and n_zeroshot_per_class must be >= 0.")
    if _eval_first_shard(cfg) + _eval_shards_needed(cfg) > MAX_SHARDS:
        raise InputError(
            f"{cfg.n} samples in shards of {cfg.shard_size} need more than {MAX_SHARDS} shards "
            "(5 shard digits per key); use a larger shard_size."
        )
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory; choose another OUT.")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise InputError(
            f"{out} is not empty; pass --overwrite to replace a dataset there, or choose another OUT."
        )


def _train_key(index: int, shard_size: int) -> str:
    return f"{(index // shard_size) * KEYS_PER_SHARD + index % shard_size:09d}"


def _eval_first_shard(cfg: SynthConfig) -> int:
    return -(-cfg.n // cfg.shard_size)


def _eval_counts(cfg: SynthConfig) -> dict[str, int]:
    k = cfg.n_zeroshot_per_class
    return {
        "retrieval": cfg.n_retrieval,
        "zeroshot_shape": k * len(SHAPES),
        "zeroshot_color_shape": k * (len(SHAPES) * len(COLORS) - HELD_OUT_COUNT),
        "unseen": k * HELD_OUT_COUNT,
    }


def _eval_shards_needed(cfg: SynthConfig) -> int:
    return sum(-(-c // KEYS_PER_SHARD) for c in _eval_counts(cfg).values())


def _is_failed(seed: int, index: int, fail_fraction: float) -> bool:
    # Its own stream, so the failure pattern does not change any sample's content.
    return fail_fraction > 0 and _rng(seed, "failed", index).random() < fail_fraction


def _class_lists(seed: int) -> dict[str, list[tuple[str, str | None, str | None, str]]]:
    """Per zero-shot split: (folder, main_shape, main_color, class text) in sorted folder order."""
    held = held_out_combos(seed)
    seen = [(c, s) for s in SHAPES for c in COLORS if (c, s) not in held]
    return {
        "zeroshot_shape": sorted((s, s, None, s) for s in SHAPES),
        "zeroshot_color_shape": sorted((f"{c}_{s}", s, c, f"{c} {s}") for c, s in seen),
        "unseen": sorted((f"{c}_{s}", s, c, f"{c} {s}") for c, s in held),
    }


def _eval_plan(cfg: SynthConfig) -> Iterator[tuple[str, str, str, SynthSample]]:
    """(split, relative image path, class folder or "", sample) for every eval sample.

    Each split draws from its own stream, so eval images are never training images; keys take
    blocks of shard numbers after the last train shard.
    """
    shard = _eval_first_shard(cfg)
    classes = _class_lists(cfg.seed)
    for split in EVAL_SPLITS:
        count = _eval_counts(cfg)[split]
        for j in range(count):
            key = f"{(shard + j // KEYS_PER_SHARD) * KEYS_PER_SHARD + j % KEYS_PER_SHARD:09d}"
            if split == "retrieval":
                sample = _sample(cfg.seed, split, j, key, image_size=cfg.image_size, render=True)
                yield split, f"images/{key}.jpg", "", sample
                continue
            folder, shape, color, _ = classes[split][j // cfg.n_zeroshot_per_class]
            sample = _sample(
                cfg.seed,
                split,
                j,
                key,
                image_size=cfg.image_size,
                render=True,
                main_shape=shape,
                main_color=color,
            )
            yield split, f"{folder}/{key}.jpg", folder, sample
        shard += -(-count // KEYS_PER_SHARD)


def _label_row(sample: SynthSample, split: str, failed: bool) -> dict[str, object]:
    return {
        "key": sample.key,
        "split": split,
        "failed": failed,
        **sample.answers,
        **sample.attributes,
    }


def _label_schema() -> pa.Schema:
    probe = make_sample(0, 0, render=False)
    fields = [
        pa.field("key", pa.string()),
        pa.field("split", pa.string()),
        pa.field("failed", pa.bool_()),
    ]
    fields += [pa.field(name, pa.string()) for name in (*probe.answers, *probe.attributes)]
    return pa.schema(fields)


CAPTIONS_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("key", "caption", "short_caption", "long_caption")]
)


def _write_parquet(path: Path, rows: list[dict[str, object]], schema: pa.Schema) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


class _Img2datasetShard:
    """One img2dataset output shard: a tar (webdataset) or parquet with image bytes, plus the
    per-shard metadata parquet and stats json that img2dataset writes next to it."""

    META_SCHEMA = pa.schema(
        [
            ("url", pa.string()),
            ("key", pa.string()),
            ("caption", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("original_width", pa.int32()),
            ("original_height", pa.int32()),
            ("short_caption", pa.string()),
            ("long_caption", pa.string()),
        ]
    )
    PARQUET_SCHEMA = pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("jpg", pa.binary()),
            ("txt", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("short_caption", pa.string()),
            ("long_caption", pa.string()),
        ]
    )

    def __init__(self, folder: Path, shard: int, fmt: str, seed: int) -> None:
        self.name = f"{shard:05d}"
        self.folder, self.fmt, self.seed = folder, fmt, seed
        self.meta: list[dict[str, object]] = []
        self.rows: list[dict[str, object]] = []
        self.tar = None
        if fmt == "webdataset":
            # USTAR + fixed member metadata: byte-identical tars for identical content.
            self.tar = tarfile.open(  # noqa: SIM115 - closed in close(), one shard at a time
                folder / f"{self.name}.tar", "w", format=tarfile.USTAR_FORMAT
            )

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]

    def add(self, sample: SynthSample, jpeg: bytes | None, size: int) -> None:
        ok = jpeg is not None
        meta = {
            "url": f"synth://{self.seed}/{sample.key}",
            "key": sample.key,
            "caption": sample.caption,
            "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "synthetic download failure (fail_fraction)",
            "width": size if ok else None,
            "height": size if ok else None,
            "original_width": size if ok else None,
            "original_height": size if ok else None,
            "short_caption": sample.short_caption,
            "long_caption": sample.long_caption,
        }
        self.meta.append(meta)
        if self.tar is not None:
            if ok:
                # Members of one key in sorted order: .jpg, .json, .txt.
                self._add_member(f"{sample.key}.jpg", jpeg)
                self._add_member(
                    f"{sample.key}.json", json.dumps(meta, ensure_ascii=False).encode()
                )
                self._add_member(f"{sample.key}.txt", sample.caption.encode())
        else:
            self.rows.append(
                {
                    "key": sample.key,
                    "url": meta["url"],
                    "jpg": jpeg,
                    "txt": sample.caption,
                    "status": meta["status"],
                    "error_message": meta["error_message"],
                    "width": meta["width"],
                    "height": meta["height"],
                    "short_caption": sample.short_caption,
                    "long_caption": sample.long_caption,
                }
            )

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            _write_parquet(self.folder / f"{self.name}.parquet", self.meta, self.META_SCHEMA)
        else:
            _write_parquet(self.folder / f"{self.name}.parquet", self.rows, self.PARQUET_SCHEMA)
        ok = sum(m["status"] == "success" for m in self.meta)
        failed = len(self.meta) - ok
        stats = {
            "count": len(self.meta),
            "successes": ok,
            "failed_to_download": failed,
            "failed_to_resize": 0,
            # Fixed times keep the dataset byte-identical for the same seed.
            "duration": 0.0,
            "start_time": 0.0,
            "end_time": 0.0,
            "status_dict": {"success": ok, "failed_to_download": failed}
            if failed
            else {"success": ok},
        }
        (self.folder / f"{self.name}_stats.json").write_text(json.dumps(stats, indent=4) + "\n")


def _prepare_out(out: Path, cfg: SynthConfig) -> None:
    _validate(out, cfg)
    if cfg.overwrite:
        # Remove only what a previous run wrote, never unrelated files in OUT.
        for name in _OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)


def _write_train(
    out: Path, cfg: SynthConfig, labels: pq.ParquetWriter, advance
) -> tuple[int, list[str]]:
    captions = pq.ParquetWriter(out / "captions.parquet", CAPTIONS_SCHEMA)
    n_failed, shards = 0, []
    for start in range(0, cfg.n, cfg.shard_size):
        shard = _Img2datasetShard(out / "images", start // cfg.shard_size, cfg.format, cfg.seed)
        caption_rows, label_rows = [], []
        for index in range(start, min(cfg.n, start + cfg.shard_size)):
            failed = _is_failed(cfg.seed, index, cfg.fail_fraction)
            # Failed downloads have no image, so do not spend time drawing one.
            sample = replace(
                make_sample(cfg.seed, index, image_size=cfg.image_size, render=not failed),
                key=_train_key(index, cfg.shard_size),
            )
            shard.add(sample, None if failed else encode_jpeg(sample.image), cfg.image_size)
            caption_rows.append({k: getattr(sample, k) for k in CAPTIONS_SCHEMA.names})
            label_rows.append(_label_row(sample, "train", failed))
            n_failed += failed
            advance()
        shard.close()
        shards.append(shard.name)
        captions.write_table(pa.Table.from_pylist(caption_rows, schema=CAPTIONS_SCHEMA))
        labels.write_table(pa.Table.from_pylist(label_rows, schema=labels.schema))
    captions.close()
    return n_failed, shards


def _write_eval(out: Path, cfg: SynthConfig, labels: pq.ParquetWriter, advance) -> None:
    root = out / "eval"
    for split, classes in _class_lists(cfg.seed).items():
        for folder, *_ in classes:
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        (root / split / "classes.txt").write_text("".join(text + "\n" for *_, text in classes))
    (root / "retrieval" / "images").mkdir(parents=True, exist_ok=True)
    retrieval_rows, label_rows = [], []
    for split, rel, _, sample in _eval_plan(cfg):
        (root / split / rel).write_bytes(encode_jpeg(sample.image))
        label_rows.append(_label_row(sample, split, False))
        if split == "retrieval":
            retrieval_rows.append(
                {
                    "key": sample.key,
                    "image": rel,
                    **{k: getattr(sample, k) for k in CAPTIONS_SCHEMA.names[1:]},
                }
            )
        if len(label_rows) == 10_000:
            labels.write_table(pa.Table.from_pylist(label_rows, schema=labels.schema))
            label_rows = []
        advance()
    if label_rows:
        labels.write_table(pa.Table.from_pylist(label_rows, schema=labels.schema))
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("image", pa.string()),
            *[(k, pa.string()) for k in CAPTIONS_SCHEMA.names[1:]],
        ]
    )
    _write_parquet(root / "retrieval" / "captions.parquet", retrieval_rows, schema)


def _describe(cfg: SynthConfig, counts: dict[str, int], n_failed: int) -> dict[str, object]:
    return {
        "name": "facetclip-synth",
        "seed": cfg.seed,
        "format": cfg.format,
        "image_size": cfg.image_size,
        "shard_size": cfg.shard_size,
        "fail_fraction": cfg.fail_fraction,
        "counts": counts,
        "n_failed": n_failed,
        "held_out_combos": [f"{c} {s}" for c, s in held_out_combos(cfg.seed)],
        "facet_names": list(FACET_NAMES),
        "vocabulary": vocabulary(),
        "files": {
            "images/": f"img2dataset {cfg.format} output of the train split",
            "captions.parquet": "key, caption, short_caption, long_caption (train split, failed included)",
            "labels.parquet": "key, split, failed, facet answers, raw attributes (every split)",
            "eval/retrieval/": "held-out image-caption pairs: images/<key>.jpg + captions.parquet",
            "eval/zeroshot_shape/": "class folders <shape>/, classes.txt",
            "eval/zeroshot_color_shape/": "class folders <color>_<shape>/, classes.txt ('red star')",
            "eval/unseen/": "class folders of held-out combos (never a train main object), classes.txt",
        },
    }


def _readme(info: dict[str, object]) -> str:
    lines = [
        "facetclip synthetic long-caption image dataset (made by `facetclip synth`).",
        "",
        f"seed {info['seed']}, format {info['format']}, {info['image_size']}x{info['image_size']} JPEG, "
        f"shards of {info['shard_size']}, {info['n_failed']} failed downloads in train.",
        "",
        "samples per split:",
        *[f"  {k}: {v}" for k, v in info["counts"].items()],  # type: ignore[union-attr]
        "",
        "held-out colour+shape combos (never the main object in train or retrieval):",
        *[f"  {c}" for c in info["held_out_combos"]],  # type: ignore[union-attr]
        "",
        "files:",
        *[f"  {k:28s} {v}" for k, v in info["files"].items()],  # type: ignore[union-attr]
        "",
        "See dataset.json for the full vocabulary; eval/synth.py documents the semantics.",
    ]
    return "\n".join(lines) + "\n"


def write_synth(out: str | Path, cfg: SynthConfig, progress: bool = True) -> SynthSummary:
    """Write the synthetic dataset (train in img2dataset layout, eval splits, labels) to OUT.

    >>> write_synth("synth-out", SynthConfig(n=500, format="parquet"), progress=False)  # doctest: +SKIP
    """
    out = Path(out)
    _prepare_out(out, cfg)
    counts = {"train": cfg.n, **_eval_counts(cfg)}
    total = sum(counts.values())
    t0 = time.perf_counter()
    with Bar("synth", total, enabled=progress) as bar:

        def advance() -> None:
            bar.update(advance=1)

        labels = pq.ParquetWriter(out / "labels.parquet", _label_schema())
        n_failed, shards = _write_train(out, cfg, labels, advance)
        _write_eval(out, cfg, labels, advance)
        labels.close()
    info = _describe(cfg, counts, n_failed)
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.txt").write_text(_readme(info))
    seconds = time.perf_counter() - t0
    return SynthSummary(
        out=out,
        counts=counts,
        n_failed=n_failed,
        held_out=info["held_out_combos"],  # type: ignore[arg-type]
        seconds=seconds,
        samples_per_s=total / seconds if seconds > 0 else float("inf"),
        shards=shards,
    )


def render_synth(s: SynthSummary) -> str:
    """What `facetclip synth` prints."""
    splits = ", ".join(f"{k} {v:,}" for k, v in s.counts.items())
    return (
        f"wrote synthetic dataset to [bold]{s.out}[/]: {splits} ({s.n_failed} train samples "
        f"as failed downloads); {s.seconds:.1f} s, {s.samples_per_s:,.0f} samples/s"
    )
