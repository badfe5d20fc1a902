"""The default multimodal dataset: image questions built offline from images our dependencies ship.

Sources (each image is a 32 x 32 RGB PNG by default):

- ``digits``: scikit-learn's `load_digits` (1797 8 x 8 grey digits; the first `max_digits`): 1, 2 or 3
  copies of the digit (one copy fills the image; two or three copies at half size in distinct
  quadrants), bilinearly upscaled and tinted with a named colour of `COLORS` on black.
  Label: {"digit" (the sklearn target), "count", "color"}.
- ``shapes``: `skimage.draw.random_shapes` with one shape kind (rectangle / circle / triangle), 1-4
  shapes, one colour of `COLORS` per image on white; a draw is kept only if every shape lies inside
  the image, the requested number was placed and the shapes do not touch (8-connected components =
  shapes). Label: {"shape", "count", "color"}.
- ``photos``: `PHOTOS`, 10 classes of texture tiles and faces from scikit-image sample images that
  load without a download (bundled with the wheel). Each photograph is cut into a grid of disjoint
  square cells (side `PhotoSource.cell` source pixels, inside `PhotoSource.region`); the 100 faces
  of ``lfw_subset`` are 100 cells, one per person. The cells of each class are split into train /
  val / test (seeded; at least one cell each), and a photo image is a random square sub-crop (70-100
  % of the side) of one cell of its own split, flipped at random and area-resized. So no val / test
  photo shares a source pixel with a train photo, and test faces are of people never seen in
  training. The ``what`` questions stay answerable on held-out cells: the texture photographs are
  stationary (a held-out part of the brick wall is another sample of the same wall: the protocol
  of texture benchmarks such as Brodatz or Outex, which classify non-overlapping sub-images of one
  texture image), and an unseen person's face is still a face. (Version 1 named crops of 21 whole
  photographs, the same photographs in train and test; object photographs such as the cat or the
  astronaut are not used, since a held-out part of them does not show the object.)
  Label: the class name.

Question types (record key ``question_type``) and their templates (`TEMPLATES`, record key
``template``): every template is asked of images of at least two sources, so the question text does
not name the source (and so not the cluster); the image must:

- ``what`` ("What is shown?", ...): all sources; the digit ("7"), the shape ("circle"), the class;
- ``color`` ("What color is the main object?", ...): digits and shapes;
- ``count`` ("How many objects are there?", ...): digits (1-3) and shapes (1-4);
- ``mme``: an MME-style yes / no pair on one image (one yes, one no; sharing ``pair_id``): "Is there
  {x} in the image?" (all sources: x is the image's object for yes, and for no an object drawn
  uniformly from every other object of every source, `OBJECTS`) or "Is the main object {color}?"
  (digits and shapes).

Every question carries ``answers``, 10 reference answers as in VQA (e.g. 8 x "7" + 2 x "seven";
synonyms such as "gravel" / "stones"), so VQA accuracy is meaningful.

Split: by image, per source, with a seeded permutation (test first, then val, the rest train), so an
image is never in two splits (photos: also by cell, above). Records (LLaVA JSONL, see `formats`):

- train: one record per image with `train_turns` (2) QA turns drawn without replacement from the
  image's questions (its open questions and one of its two mme questions, yes or no at random);
- val: single-turn records; per image one question type of its source, assigned in equal shares
  (type k to the images at positions = k mod n_types of a seeded permutation); ``mme`` gives two
  records (yes and no, random order) with ``pair_id`` = image id;
- test: single-turn records, every question type of the image's source (``mme``: both questions), so
  5 questions per digit or shape image and 3 per photo: the default sizes give 2046 test questions
  on 442 test images (and 382 val questions).

Every record has ``question_type``, ``template`` and ``answers`` of its first turn, ``turn_types`` /
``turn_templates`` / ``turn_answers`` for all turns, ``source``, ``label``, ``source_index`` (index
in load_digits, shape draw number, or photo class) and ``unit`` (the image's independent source unit:
the digit sample, the shape draw, the photo cell "loader:top:left:side" or face "lfw_subset:i");
photos also ``region`` [loader, top, left, side] (the crop in source pixels; a face index for
faces). All randomness comes from ``numpy.random.default_rng([seed, source, stream])``, so a
source's images do not change when another source's size does.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dfm.io import atomic_path
from experiments.mllm.formats import (
    GPT,
    HUMAN,
    IMAGE_TOKEN,
    Record,
    Turn,
    load_llava,
    write_llava,
)
from experiments.mllm.images import save_png

SPLITS = ("train", "val", "test")
SOURCES = ("digits", "shapes", "photos")
VERSION = 2
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = {
    "what": ("What is shown?", "What is in the image?", "What does the image show?"),
    "color": ("What color is the main object?", "What is the color of the main object?"),
    "count": ("How many objects are there?", "How many objects are in the image?"),
    "mme": ("Is there {} in the image?", "Is the main object {}?"),
}
SOURCE_TYPES = {"digits": ("what", "color", "count", "mme"), "shapes": ("what", "color", "count", "mme"),
                "photos": ("what", "mme")}
SHAPE_KINDS = ("rectangle", "circle", "triangle")
SHAPE_ANSWERS = {"rectangle": ("rectangle",) * 8 + ("box",) * 2, "circle": ("circle",) * 8 + ("round",) * 2,
                 "triangle": ("triangle",) * 10}
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 190), "orange": (245, 140, 30)}
COLOR_ANSWERS = {c: (c,) * 10 for c in COLORS} | {"purple": ("purple",) * 7 + ("violet",) * 3}
YES, NO = ("yes",) * 10, ("no",) * 10


@dataclass(frozen=True)
class PhotoSource:
    """One photograph of a class: `skimage.data.<loader>`, cut into disjoint `cell` x `cell` squares
    inside `region` (fractions top, left, bottom, right of the image). For "lfw_subset" every face
    is one cell."""

    loader: str
    cell: int
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class Photo:
    """A photo class: `label` (the main answer), 10 reference `answers`, the noun `phrase` of yes/no
    questions, its photographs `sources`."""

    label: str
    answers: tuple[str, ...]
    phrase: str
    sources: tuple[PhotoSource, ...]


def _ans(*pairs) -> tuple[str, ...]:
    return tuple(a for a, n in pairs for _ in range(n))


PHOTOS = (
    Photo("bricks", _ans(("bricks", 6), ("wall", 2), ("brick", 2)), "bricks", (PhotoSource("brick", 64),)),
    Photo("grass", _ans(("grass", 10)), "grass", (PhotoSource("grass", 64),)),
    Photo("gravel", _ans(("gravel", 7), ("stones", 3)), "gravel", (PhotoSource("gravel", 64),)),
    Photo("moon", _ans(("moon", 6), ("craters", 2), ("moon surface", 2)), "the moon surface",
          (PhotoSource("moon", 64),)),
    Photo("galaxies", _ans(("galaxies", 6), ("stars", 2), ("space", 2)), "galaxies",
          (PhotoSource("hubble_deep_field", 110),)),
    Photo("coins", _ans(("coins", 8), ("money", 2)), "coins", (PhotoSource("coins", 48),)),
    Photo("tissue", _ans(("tissue", 6), ("cells", 4)), "tissue", (PhotoSource("immunohistochemistry", 64),)),
    Photo("retina", _ans(("retina", 6), ("eye", 2), ("blood vessels", 2)), "a retina",
          (PhotoSource("retina", 105, (0.2, 0.2, 0.8, 0.8)),)),        # inside the fundus disc
    Photo("text", _ans(("text", 6), ("writing", 2), ("letters", 2)), "text",
          (PhotoSource("page", 40), PhotoSource("text", 40))),
    Photo("face", _ans(("face", 8), ("person", 2)), "a face", (PhotoSource("lfw_subset", 0),)),
)
# every object of the yes / no questions: "Is there {object} in the image?"
OBJECTS = tuple(f"a {d}" for d in range(10)) + tuple(f"a {k}" for k in SHAPE_KINDS) + tuple(p.phrase for p in PHOTOS)


@dataclass(frozen=True)
class Item:
    """One question about an image: type, template, question text (no placeholder), answer, 10 references."""

    qtype: str
    template: str
    question: str
    answer: str
    answers: tuple[str, ...]


@dataclass
class Sample:
    """One generated image with its questions: `open` (one per open type) and `mme` (yes, no)."""

    id: str
    source: str
    pixels: np.ndarray  # uint8 [size, size, 3]
    label: object
    source_index: object
    open: dict[str, Item]
    mme: tuple[Item, Item]
    unit: str = ""
    extra: dict = field(default_factory=dict)


def _rng(seed: int, source: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, SOURCES.index(source), stream])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _item(rng, qtype: str, answer: str, answers, fill: str | None = None, template: int | None = None) -> Item:
    """A question of `qtype` from a random template (or template number `template`), `{}` filled with `fill`."""
    t = TEMPLATES[qtype][template] if template is not None else _pick(rng, TEMPLATES[qtype])
    return Item(qtype, t, t.format(fill) if fill is not None else t, answer, tuple(answers))


def _number_answers(n: int) -> tuple[str, ...]:
    return (str(n),) * 8 + (NUMBER_WORDS[n],) * 2


def _questions(rng, what: tuple[str, tuple], obj: str, color: str | None = None,
               count: int | None = None) -> tuple[dict, tuple[Item, Item]]:
    """The open questions and the yes / no pair of an image showing `obj` (an `OBJECTS` phrase)."""
    items = {"what": _item(rng, "what", what[0], what[1])}
    if color is not None:
        items["color"] = _item(rng, "color", color, COLOR_ANSWERS[color])
    if count is not None:
        items["count"] = _item(rng, "count", str(count), _number_answers(count))
    if color is not None and rng.random() < 0.5:
        other = _pick(rng, [c for c in COLORS if c != color])
        mme = _item(rng, "mme", "yes", YES, color, 1), _item(rng, "mme", "no", NO, other, 1)
    else:
        other = _pick(rng, [o for o in OBJECTS if o != obj])
        mme = _item(rng, "mme", "yes", YES, obj, 0), _item(rng, "mme", "no", NO, other, 0)
    return items, mme


# ---------------------------------------------------------------- digits
def digit_samples(max_digits: int | None, size: int, seed: int) -> list[Sample]:
    """The first `max_digits` (all if None) sklearn digits as tinted RGB images of 1-3 copies, with questions."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target) if max_digits is None else min(max_digits, len(digits.target))
    img_rng, q_rng = _rng(seed, "digits", 0), _rng(seed, "digits", 1)
    colors, half = tuple(COLORS), size // 2
    out = []
    for i in range(n):
        d = int(digits.target[i])
        color, count = _pick(img_rng, colors), int(img_rng.integers(1, 4))
        grey = Image.fromarray(np.round(digits.images[i] / 16.0 * 255).astype(np.uint8), "L")
        canvas = np.zeros((size, size), np.float32)
        if count == 1:
            canvas[:] = np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR), np.float32)
            cells = [0, 1, 2, 3]
        else:
            small = np.asarray(grey.resize((half, half), Image.Resampling.BILINEAR), np.float32)
            cells = sorted(int(c) for c in img_rng.choice(4, size=count, replace=False))
            for c in cells:
                canvas[(c // 2) * half:(c // 2 + 1) * half, (c % 2) * half:(c % 2 + 1) * half] = small
        pixels = np.round(canvas[..., None] / 255.0 * np.asarray(COLORS[color], np.float32)).astype(np.uint8)
        items, mme = _questions(q_rng, (str(d), _number_answers(d)), f"a {d}", color, count)
        out.append(Sample(f"digits-{i:05d}", "digits", pixels, {"digit": d, "count": count, "color": color,
                                                                "quadrants": cells}, i, items, mme, f"digits:{i}"))
    return out


# ---------------------------------------------------------------- shapes
def draw_shapes(size: int, kind: str, count: int, rng: np.random.Generator, tries: int = 200):
    """A boolean mask [size, size] with `count` non-touching `kind` shapes fully inside the image
    (`skimage.draw.random_shapes`); returns (mask, placed count). If no draw places `count`, the
    last valid draw with fewer shapes is returned.

    Raises:
      RuntimeError: if no valid draw is found in `tries` attempts.
    """
    from skimage.draw import random_shapes
    from skimage.measure import label as connected

    min_size, max_size = max(4, size // 5), max(6, (2 * size) // 5)
    best = None
    for _ in range(tries):
        img, labels = random_shapes((size, size), max_shapes=count, min_shapes=count, min_size=min_size,
                                    max_size=max_size, shape=kind, channel_axis=None, intensity_range=(0, 0),
                                    allow_overlap=False, num_trials=100, rng=int(rng.integers(2**31)))
        inside = all(r0 >= 0 and c0 >= 0 and r1 < size and c1 < size for _, ((r0, r1), (c0, c1)) in labels)
        mask = img < 255
        if not labels or not inside or connected(mask, connectivity=2).max() != len(labels):
            continue
        if len(labels) == count:
            return mask, count
        best = (mask, len(labels))
    if best is None:
        raise RuntimeError(f"shapes: no valid {kind} draw in {tries} tries at image size {size}")
    return best


def shape_samples(num_shapes: int, size: int, seed: int) -> list[Sample]:
    """`num_shapes` images of 1-4 same-kind, same-colour shapes on white, with questions."""
    img_rng, q_rng = _rng(seed, "shapes", 0), _rng(seed, "shapes", 1)
    colors = tuple(COLORS)
    out = []
    for i in range(num_shapes):
        kind, color = _pick(img_rng, SHAPE_KINDS), _pick(img_rng, colors)
        mask, n = draw_shapes(size, kind, int(img_rng.integers(1, 5)), img_rng)
        pixels = np.full((size, size, 3), 255, np.uint8)
        pixels[mask] = COLORS[color]
        items, mme = _questions(q_rng, (kind, SHAPE_ANSWERS[kind]), f"a {kind}", color, n)
        out.append(Sample(f"shapes-{i:05d}", "shapes", pixels, {"shape": kind, "count": n, "color": color},
                          i, items, mme, f"shapes:{i}"))
    return out


# ---------------------------------------------------------------- photos
@functools.cache
def photo_array(loader: str) -> np.ndarray:
    """The `skimage.data` image `loader` as uint8 RGB [h, w, 3] (for "lfw_subset": the 100 faces,
    [100, 25, 25, 3]).

    Raises:
      RuntimeError: if scikit-image cannot load it offline (names the image).
    """
    import skimage.data

    try:
        x = getattr(skimage.data, loader)()
    except Exception as e:  # noqa: BLE001 (ModuleNotFoundError (pooch) or any download error)
        raise RuntimeError(f"photos: skimage.data.{loader}() is not available offline: {e}") from None
    if loader == "stereo_motorcycle":
        x = x[0]
    if loader == "lfw_subset":
        x = x[:100]  # the first 100 are faces, the rest non-faces
    if x.dtype == bool:
        x = np.where(x, 255, 0).astype(np.uint8)
    elif x.dtype != np.uint8:
        x = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    if x.shape[-1] == 4:  # RGBA: composite on white
        a = x[..., 3:].astype(np.float32) / 255.0
        x = np.round(x[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    if x.shape[-1] != 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    return x


def photo_cells(source: PhotoSource) -> list[tuple[str, int, int, int]]:
    """The disjoint cells `(loader, top, left, side)` of one photograph, row by row (for
    "lfw_subset": `(loader, face index, 0, 25)`)."""
    x = photo_array(source.loader)
    if source.loader == "lfw_subset":
        return [(source.loader, i, 0, x.shape[1]) for i in range(len(x))]
    h, w = x.shape[:2]
    t0, l0 = int(source.region[0] * h), int(source.region[1] * w)
    rows, cols = (int(source.region[2] * h) - t0) // source.cell, (int(source.region[3] * w) - l0) // source.cell
    return [(source.loader, t0 + r * source.cell, l0 + c * source.cell, source.cell)
            for r in range(rows) for c in range(cols)]


def photo_crop(cell: tuple[str, int, int, int], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """A random square sub-crop (70-100 % of the side) of `cell` (`photo_cells`), flipped at random,
    area-resized to `size`: (uint8 [size, size, 3], its region [loader, top, left, side] in source
    pixels; for a face [loader, face index, top, left, side] inside the face)."""
    loader, top, left, side = cell
    array = photo_array(loader)
    if loader == "lfw_subset":
        array, top, left = array[top], 0, 0
    s = max(1, round(side * rng.uniform(0.7, 1.0)))
    dt, dl = int(rng.integers(0, side - s + 1)), int(rng.integers(0, side - s + 1))
    crop = array[top + dt:top + dt + s, left + dl:left + dl + s]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    im = Image.fromarray(np.ascontiguousarray(crop))
    resample = Image.Resampling.BOX if s >= size else Image.Resampling.BICUBIC
    region = [loader, cell[1], dt, dl, s] if loader == "lfw_subset" else [loader, top + dt, left + dl, s]
    return np.asarray(im.resize((size, size), resample), np.uint8), region


def photo_units(seed: int, val_fraction: float, test_fraction: float) -> dict[str, dict[str, list]]:
    """`{class label: {split: [cells]}}`: each class's cells (`photo_cells` of its photographs)
    split by a seeded permutation: round(n * test_fraction) (>= 1) to test, then round(n *
    val_fraction) (>= 1) to val, the rest (>= 1) to train."""
    rng = _rng(seed, "photos", 4)
    out = {}
    for photo in PHOTOS:
        cells = [c for s in photo.sources for c in photo_cells(s)]
        n_test, n_val = max(1, round(len(cells) * test_fraction)), max(1, round(len(cells) * val_fraction))
        if n_test + n_val >= len(cells):
            raise ValueError(f"photos: class {photo.label!r} has {len(cells)} cells, too few for the fractions")
        perm = [cells[int(i)] for i in rng.permutation(len(cells))]
        out[photo.label] = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    return out


def photo_samples(splits: list[str], size: int, seed: int, units: dict) -> list[Sample]:
    """Photo images (sample i: class i mod len(PHOTOS), split `splits[i]`), each a crop of one cell
    of its class and split (`units`, from `photo_units`). Val / test images take the split's cells
    in a seeded order (distinct cells while they last); train images a random train cell."""
    img_rng, q_rng = _rng(seed, "photos", 0), _rng(seed, "photos", 1)
    used: dict[tuple[str, str], int] = {}
    out = []
    for i, split in enumerate(splits):
        photo = PHOTOS[i % len(PHOTOS)]
        cells = units[photo.label][split]
        if split == "train":
            cell = cells[int(img_rng.integers(len(cells)))]
        else:
            k = used.get((photo.label, split), 0)
            used[(photo.label, split)] = k + 1
            cell = cells[k % len(cells)]
        pixels, region = photo_crop(cell, size, img_rng)
        items, mme = _questions(q_rng, (photo.label, photo.answers), photo.phrase)
        out.append(Sample(f"photos-{i:05d}", "photos", pixels, photo.label, photo.label, items, mme,
                          f"{cell[0]}:{cell[1]}" if cell[0] == "lfw_subset" else ":".join(map(str, cell)),
                          {"region": region}))
    return out


# ---------------------------------------------------------------- records
def assign_splits(n: int, val_fraction: float, test_fraction: float, rng: np.random.Generator) -> list[str]:
    """The split of each of `n` images: a seeded permutation, the first round(n * test_fraction)
    to test, the next round(n * val_fraction) to val, the rest to train."""
    perm = rng.permutation(n)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    out = ["train"] * n
    for rank, i in enumerate(perm[:n_test + n_val]):
        out[int(i)] = "test" if rank < n_test else "val"
    return out


def _record(sample: Sample, rid: str, items: list[Item], image: Path, extra: dict | None = None) -> Record:
    turns = []
    for k, item in enumerate(items):
        turns.append(Turn(HUMAN, (IMAGE_TOKEN + "\n" if k == 0 else "") + item.question))
        turns.append(Turn(GPT, item.answer))
    meta = {"question_type": items[0].qtype, "template": items[0].template, "answers": list(items[0].answers),
            "turn_types": [it.qtype for it in items], "turn_templates": [it.template for it in items],
            "turn_answers": [list(it.answers) for it in items], "source": sample.source, "label": sample.label,
            "source_index": sample.source_index, "unit": sample.unit, **sample.extra}
    return Record(rid, (image,), tuple(turns), meta | (extra or {}))


def sample_records(sample: Sample, split: str, image: Path, rng: np.random.Generator,
                   train_turns: int = 2, qtype: str | None = None) -> list[Record]:
    """The records of one image (see the module docstring: multi-turn train, single-turn val with
    one question type `qtype` (None: drawn uniformly), single-turn test with every type)."""
    if split == "train":
        pool = list(sample.open.values()) + [sample.mme[int(rng.integers(2))]]
        idx = rng.choice(len(pool), size=min(train_turns, len(pool)), replace=False)
        return [_record(sample, f"{sample.id}-0", [pool[int(i)] for i in idx], image)]
    if split == "test":
        qtypes = SOURCE_TYPES[sample.source]
    else:
        qtypes = (_pick(rng, SOURCE_TYPES[sample.source]) if qtype is None else qtype,)
    items = []
    for t in qtypes:
        if t != "mme":
            items.append((sample.open[t], None))
        else:
            pair = list(sample.mme) if rng.random() < 0.5 else list(sample.mme)[::-1]
            items += [(it, {"pair_id": sample.id}) for it in pair]
    return [_record(sample, f"{sample.id}-{k}", [item], image, extra) for k, (item, extra) in enumerate(items)]


def _summary(records: dict[str, list[Record]]) -> dict:
    out = {"records": {}, "turns": {}, "images": {}, "questions": {}, "sources": {}, "templates": {}}
    templates: dict[str, set] = {}
    for split, recs in records.items():
        types: dict[str, int] = {}
        sources: dict[str, set] = {}
        for r in recs:
            for t, tpl in zip(r.extra["turn_types"], r.extra["turn_templates"]):
                types[t] = types.get(t, 0) + 1
                templates.setdefault(tpl, set()).add(r.extra["source"])
            sources.setdefault(r.extra["source"], set()).add(r.images[0])
        out["records"][split] = len(recs)
        out["turns"][split] = sum(types.values())
        out["images"][split] = len({r.images[0] for r in recs})
        out["questions"][split] = dict(sorted(types.items()))
        out["sources"][split] = {s: len(v) for s, v in sorted(sources.items())}
    out["templates"] = {t: sorted(s) for t, s in sorted(templates.items())}
    return out


def build_default_dataset(out_dir: Path, *, seed: int = 0, image_size: int = 32, max_digits: int | None = None,
                          num_shapes: int = 600, num_photos: int = 550, test_fraction: float = 0.15,
                          val_fraction: float = 0.1, train_turns: int = 2, log=None) -> dict:
    """Build (or find) the default dataset in `out_dir`.

    Writes ``out_dir/images/<image id>.png``, ``out_dir/{train,val,test}.jsonl`` (LLaVA format, image
    paths relative to `out_dir`; read them with ``load_split`` or ``formats.load_llava(path,
    out_dir)``) and last ``out_dir/manifest.json`` (parameters + counts). Idempotent: returns at once
    if a manifest with the same parameters exists; a build with other parameters is replaced.

    Args:
      out_dir: output directory (created).
      seed: seed of every random draw.
      image_size: image side in pixels (>= 16).
      max_digits: use the first `max_digits` sklearn digits (None: all 1797).
      num_shapes, num_photos: number of shape / photo images (>= 0); the default 550 photos are 55
        per photo class. The defaults give 2947 images: 2046 test questions on 442 test images,
        382 val questions, 4420 train QA turns (seed 0).
      test_fraction, val_fraction: fractions of each source's images in test / val (photos: also of
        each class's cells).
      train_turns: QA turns per train record (>= 1).
      log: optional callable for one progress line.

    Returns:
      the manifest: "params", "photo_classes", "photo_cells" (cells per class and split), per split
      "records", "turns" (QA turns), "images", "questions" (turns per question type), "sources"
      (images per source), "templates" (template -> sources asking it), "seconds", plus "paths"
      (Path objects: "root", "images", "manifest", "train", "val", "test"; not in the file).

    Raises:
      ValueError: bad arguments (named), or an empty split.
    """
    out_dir = Path(out_dir)
    if image_size < 16:
        raise ValueError(f"image_size: must be >= 16, got {image_size}")
    if max_digits is not None and max_digits < 0 or num_shapes < 0 or num_photos < 0:
        raise ValueError(f"max_digits, num_shapes, num_photos: must be >= 0, got {max_digits}, {num_shapes}, "
                         f"{num_photos}")
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(f"test_fraction, val_fraction: must be in (0, 1) with sum < 1, got {test_fraction}, "
                         f"{val_fraction}")
    if train_turns < 1:
        raise ValueError(f"train_turns: must be >= 1, got {train_turns}")
    params = {"version": VERSION, "seed": seed, "image_size": image_size, "max_digits": max_digits,
              "num_shapes": num_shapes, "num_photos": num_photos, "test_fraction": test_fraction,
              "val_fraction": val_fraction, "train_turns": train_turns}
    paths = {"root": out_dir, "images": out_dir / "images", "manifest": out_dir / "manifest.json"}
    paths |= {s: out_dir / f"{s}.jsonl" for s in SPLITS}
    if paths["manifest"].is_file():
        manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
        if manifest.get("params") == params and all(paths[s].is_file() for s in SPLITS):
            return manifest | {"paths": paths}
        paths["manifest"].unlink()  # an interrupted rebuild must not look complete
    t0 = time.perf_counter()
    samples = {"digits": digit_samples(max_digits, image_size, seed),
               "shapes": shape_samples(num_shapes, image_size, seed)}
    sizes = {"digits": len(samples["digits"]), "shapes": num_shapes, "photos": num_photos}
    splits = {s: assign_splits(sizes[s], val_fraction, test_fraction, _rng(seed, s, 2)) for s in SOURCES}
    units = photo_units(seed, val_fraction, test_fraction)
    samples["photos"] = photo_samples(splits["photos"], image_size, seed, units)
    records = {s: [] for s in SPLITS}
    written = set()
    for source in SOURCES:
        rec_rng = _rng(seed, source, 3)
        for split in SPLITS:
            group = [x for x, s in zip(samples[source], splits[source]) if s == split]
            types = SOURCE_TYPES[source]
            qtypes = [types[k % len(types)] for k in rec_rng.permutation(len(group))]
            for sample, qtype in zip(group, qtypes):
                image = paths["images"] / f"{sample.id}.png"
                save_png(sample.pixels, image)
                written.add(image.name)
                records[split] += sample_records(sample, split, image, rec_rng, train_turns, qtype)
    empty = [s for s in SPLITS if not records[s]]
    if empty:
        raise ValueError(f"split(s) {empty} are empty: increase max_digits/num_shapes/num_photos or the fractions")
    for split in SPLITS:
        write_llava(records[split], paths[split], out_dir)
    for stale in paths["images"].glob("*.png"):
        if stale.name not in written:
            stale.unlink()
    manifest = {"params": params, "photo_classes": [p.label for p in PHOTOS[:max(0, min(num_photos, len(PHOTOS)))]],
                "photo_cells": {c: {s: len(v) for s, v in u.items()} for c, u in units.items()},
                **_summary(records), "seconds": round(time.perf_counter() - t0, 2)}
    with atomic_path(paths["manifest"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    if log is not None:
        log(f"[mllm data] {out_dir}: " + ", ".join(f"{s} {manifest['records'][s]} records / "
                                                    f"{manifest['turns'][s]} turns" for s in SPLITS))
    return manifest | {"paths": paths}


def load_split(out_dir: Path, split: str, *, check_images: bool = True) -> list[Record]:
    """The records of one split of a dataset built by `build_default_dataset`.

    Raises:
      ValueError: unknown split. FormatError: missing / malformed file.
    """
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
    return load_llava(Path(out_dir) / f"{split}.jsonl", out_dir, check_images=check_images)
