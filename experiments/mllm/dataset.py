"""The default multimodal dataset: image questions built offline from images our dependencies ship.

Sources (each image is a 32 x 32 RGB PNG by default):

- ``digits``: scikit-learn's `load_digits` (1797 8 x 8 grey digits; the first `max_digits`),
  bilinearly upscaled, tinted with a seeded random colour on black. Label: the sklearn target.
- ``shapes``: `skimage.draw.random_shapes` with one shape kind (rectangle / circle / triangle), 1-4
  shapes, one colour per image on white; a draw is kept only if every shape lies inside the image,
  the requested number was placed and the shapes do not touch (8-connected components = shapes).
  Label: {"shape", "count", "color"}.
- ``photos``: `PHOTOS`, scikit-image sample images that load without a download in scikit-image
  0.26 (bundled with the wheel), each a class with a name; sample i uses class i mod len(PHOTOS),
  a seeded random square crop (60-100 % of the short side) and horizontal flip, area-resized.
  Label: the class name.

Question types (record key ``question_type``): digits: ``digit``, ``parity``, ``compare``;
shapes: ``count``, ``shape``, ``color``; photos: ``name``; all sources: ``mme`` (MME-style yes/no
pair on one image, one answer yes and one no, sharing ``pair_id``). Every question carries
``answers``, 10 reference answers as in VQA (e.g. 8 x "7" + 2 x "seven"; synonyms such as
"cat" / "kitten"), so VQA accuracy is meaningful.

Split: by image, per source, with a seeded permutation (test first, then val, the rest train), so an
image is never in two splits. Crops of one photo class are different images and do appear in
different splits (that is what makes naming learnable). Records (LLaVA JSONL, see `formats`):

- train: one record per image with `train_turns` (2) QA turns drawn without replacement from the
  image's questions (its open questions and one of its two mme questions, yes or no at random);
- val / test: single-turn records; per image one question type of its source, assigned in equal
  shares (type k to the images at positions = k mod n_types of a seeded permutation); ``mme`` gives
  two records (yes and no, random order) with ``pair_id`` = image id.

Every record has ``question_type`` and ``answers`` of its first turn, ``turn_types`` /
``turn_answers`` for all turns, ``source``, ``label`` and ``source_index`` (index in load_digits,
shape draw number, or photo name). All randomness comes from ``numpy.random.default_rng([seed,
source, stream])``, so a source's images do not change when another source's size does.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dfm.io import atomic_path
from experiments.mllm.formats import GPT, HUMAN, IMAGE_TOKEN, Record, Turn, load_llava, write_llava
from experiments.mllm.images import save_png

SPLITS = ("train", "val", "test")
SOURCES = ("digits", "shapes", "photos")
VERSION = 1
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SOURCE_TYPES = {"digits": ("digit", "parity", "compare", "mme"), "shapes": ("count", "shape", "color", "mme"),
                "photos": ("name", "mme")}
SHAPE_KINDS = ("rectangle", "circle", "triangle")
SHAPE_ANSWERS = {"rectangle": ("rectangle",) * 8 + ("box",) * 2, "circle": ("circle",) * 8 + ("round",) * 2,
                 "triangle": ("triangle",) * 10}
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 190), "orange": (245, 140, 30)}
COLOR_ANSWERS = {c: (c,) * 10 for c in COLORS} | {"purple": ("purple",) * 7 + ("violet",) * 3}


@dataclass(frozen=True)
class Photo:
    """A photo class: `loader` (function of `skimage.data`), `label` (the main answer), 10 reference
    `answers`, the noun `phrase` of yes/no questions."""

    loader: str
    label: str
    answers: tuple[str, ...]
    phrase: str


def _ans(*pairs) -> tuple[str, ...]:
    return tuple(a for a, n in pairs for _ in range(n))


PHOTOS = (
    Photo("astronaut", "astronaut", _ans(("astronaut", 6), ("woman", 2), ("person", 2)), "an astronaut"),
    Photo("camera", "cameraman", _ans(("cameraman", 6), ("man", 2), ("photographer", 2)), "a cameraman"),
    Photo("chelsea", "cat", _ans(("cat", 8), ("kitten", 2)), "a cat"),
    Photo("coffee", "coffee", _ans(("coffee", 6), ("cup", 3), ("mug", 1)), "a cup of coffee"),
    Photo("coins", "coins", _ans(("coins", 8), ("money", 2)), "coins"),
    Photo("rocket", "rocket", _ans(("rocket", 8), ("spaceship", 2)), "a rocket"),
    Photo("horse", "horse", _ans(("horse", 10)), "a horse"),
    Photo("moon", "moon", _ans(("moon", 8), ("crater", 2)), "the moon"),
    Photo("clock", "clock", _ans(("clock", 10)), "a clock"),
    Photo("page", "text", _ans(("text", 6), ("page", 4)), "a page of text"),
    Photo("retina", "eye", _ans(("eye", 6), ("retina", 4)), "an eye"),
    Photo("colorwheel", "color wheel", _ans(("color wheel", 7), ("rainbow", 3)), "a color wheel"),
    Photo("brick", "bricks", _ans(("bricks", 6), ("wall", 4)), "a brick wall"),
    Photo("grass", "grass", _ans(("grass", 10)), "grass"),
    Photo("gravel", "gravel", _ans(("gravel", 7), ("stones", 3)), "gravel"),
    Photo("checkerboard", "checkerboard", _ans(("checkerboard", 8), ("chessboard", 2)), "a checkerboard"),
    Photo("logo", "logo", _ans(("logo", 10)), "a logo"),
    Photo("hubble_deep_field", "galaxies", _ans(("galaxies", 6), ("space", 4)), "galaxies"),
    Photo("immunohistochemistry", "tissue", _ans(("tissue", 6), ("cells", 4)), "tissue"),
    Photo("stereo_motorcycle", "motorcycle", _ans(("motorcycle", 8), ("motorbike", 2)), "a motorcycle"),
    Photo("lfw_subset", "face", _ans(("face", 8), ("person", 2)), "a face"),
)


@dataclass(frozen=True)
class Item:
    """One question about an image: type, question text (no placeholder), answer, 10 references."""

    qtype: str
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


def _rng(seed: int, source: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, SOURCES.index(source), stream])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _number_answers(n: int) -> tuple[str, ...]:
    return (str(n),) * 8 + (NUMBER_WORDS[n],) * 2


# ---------------------------------------------------------------- digits
def digit_samples(max_digits: int | None, size: int, seed: int) -> list[Sample]:
    """The first `max_digits` (all if None) sklearn digits as tinted RGB images with questions."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target) if max_digits is None else min(max_digits, len(digits.target))
    img_rng, q_rng = _rng(seed, "digits", 0), _rng(seed, "digits", 1)
    out = []
    for i in range(n):
        d = int(digits.target[i])
        grey = Image.fromarray(np.round(digits.images[i] / 16.0 * 255).astype(np.uint8), "L")
        g = np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
        tint = img_rng.uniform(0.35, 1.0, 3)
        tint /= tint.max()
        pixels = np.round(g[..., None] * tint * 255).astype(np.uint8)
        t = int(q_rng.integers(0, 9))
        other = _pick(q_rng, [x for x in range(10) if x != d])
        yes_no = ("yes",) * 10, ("no",) * 10
        open_items = {
            "digit": Item("digit", _pick(q_rng, ("What digit is shown?", "Which digit is in the image?")),
                          str(d), _number_answers(d)),
            "parity": Item("parity", "Is the digit even or odd?", "even" if d % 2 == 0 else "odd",
                           ("even" if d % 2 == 0 else "odd",) * 10),
            "compare": Item("compare", f"Is the digit greater than {t}?", "yes" if d > t else "no",
                            yes_no[0] if d > t else yes_no[1]),
        }
        mme = (Item("mme", f"Is this the digit {d}?", "yes", yes_no[0]),
               Item("mme", f"Is this the digit {other}?", "no", yes_no[1]))
        out.append(Sample(f"digits-{i:05d}", "digits", pixels, d, i, open_items, mme))
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
        plural = n > 1
        open_items = {
            "count": Item("count", _pick(q_rng, ("How many shapes are there?", "How many shapes are in the image?")),
                          str(n), _number_answers(n)),
            "shape": Item("shape", _pick(q_rng, ("What shape is shown?", "Which shape is in the image?")),
                          kind, SHAPE_ANSWERS[kind]),
            "color": Item("color", "What color are the shapes?" if plural else "What color is the shape?",
                          color, COLOR_ANSWERS[color]),
        }
        if q_rng.random() < 0.5:
            other = _pick(q_rng, [k for k in SHAPE_KINDS if k != kind])
            qs = f"Is there a {kind} in the image?", f"Is there a {other} in the image?"
        else:
            other = _pick(q_rng, [c for c in colors if c != color])
            qs = f"Is there a {color} shape in the image?", f"Is there a {other} shape in the image?"
        mme = Item("mme", qs[0], "yes", ("yes",) * 10), Item("mme", qs[1], "no", ("no",) * 10)
        out.append(Sample(f"shapes-{i:05d}", "shapes", pixels, {"shape": kind, "count": n, "color": color},
                          i, open_items, mme))
    return out


# ---------------------------------------------------------------- photos
@functools.lru_cache(maxsize=None)
def photo_array(loader: str) -> np.ndarray:
    """The `skimage.data` image `loader` as uint8 RGB [h, w, 3] (for "lfw_subset": the 100 faces,
    [100, 25, 25, 3]).

    Raises:
      RuntimeError: if scikit-image cannot load it offline (names the image).
    """
    import skimage.data

    try:
        x = getattr(skimage.data, loader)()
    except Exception as e:  # ModuleNotFoundError (pooch) or a download error
        raise RuntimeError(f"photos: skimage.data.{loader}() is not available offline: {e}") from None
    if loader == "stereo_motorcycle":
        x = x[0]
    if loader == "lfw_subset":
        x = x[:100]  # the first 100 are faces, the rest non-faces
    if x.dtype == bool:
        x = np.where(x, 255, 0).astype(np.uint8)
    elif x.dtype != np.uint8:
        x = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    if x.shape[-1] == 4:  # RGBA logo: composite on white
        a = x[..., 3:].astype(np.float32) / 255.0
        x = np.round(x[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    if x.shape[-1] != 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    return x


def photo_crop(array: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (60-100 % of the short side), random horizontal flip, area-resized to
    `size`: uint8 [size, size, 3]."""
    h, w = array.shape[:2]
    side = max(1, int(round(min(h, w) * rng.uniform(0.6, 1.0))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = array[top:top + side, left:left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    im = Image.fromarray(np.ascontiguousarray(crop))
    resample = Image.Resampling.BOX if side >= size else Image.Resampling.BICUBIC
    return np.asarray(im.resize((size, size), resample), np.uint8)


def photo_samples(num_photos: int, size: int, seed: int) -> list[Sample]:
    """`num_photos` crops of the `PHOTOS` classes (sample i: class i mod len(PHOTOS)), with questions."""
    img_rng, q_rng = _rng(seed, "photos", 0), _rng(seed, "photos", 1)
    out = []
    for i in range(num_photos):
        photo = PHOTOS[i % len(PHOTOS)]
        array = photo_array(photo.loader)
        if photo.loader == "lfw_subset":
            array = array[int(img_rng.integers(len(array)))]
        pixels = photo_crop(array, size, img_rng)
        other = _pick(q_rng, [p for p in PHOTOS if p.label != photo.label])
        open_items = {"name": Item("name", _pick(q_rng, ("What is in this image?", "What does this image show?")),
                                   photo.label, photo.answers)}
        mme = (Item("mme", f"Does this image show {photo.phrase}?", "yes", ("yes",) * 10),
               Item("mme", f"Does this image show {other.phrase}?", "no", ("no",) * 10))
        out.append(Sample(f"photos-{i:05d}", "photos", pixels, photo.label, photo.loader, open_items, mme))
    return out


# ---------------------------------------------------------------- records
def split_samples(samples: list[Sample], val_fraction: float, test_fraction: float,
                  rng: np.random.Generator) -> dict[str, list[Sample]]:
    """Seeded split by image: a permutation, the first round(n * test_fraction) to test, the next
    round(n * val_fraction) to val, the rest to train (each list in image order)."""
    n = len(samples)
    perm = rng.permutation(n)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    which = {int(i): "test" for i in perm[:n_test]} | {int(i): "val" for i in perm[n_test:n_test + n_val]}
    out = {s: [] for s in SPLITS}
    for i, sample in enumerate(samples):
        out[which.get(i, "train")].append(sample)
    return out


def _record(sample: Sample, rid: str, items: list[Item], image: Path, extra: dict | None = None) -> Record:
    turns = []
    for k, item in enumerate(items):
        turns.append(Turn(HUMAN, (IMAGE_TOKEN + "\n" if k == 0 else "") + item.question))
        turns.append(Turn(GPT, item.answer))
    meta = {"question_type": items[0].qtype, "answers": list(items[0].answers),
            "turn_types": [it.qtype for it in items], "turn_answers": [list(it.answers) for it in items],
            "source": sample.source, "label": sample.label, "source_index": sample.source_index}
    return Record(rid, (image,), tuple(turns), meta | (extra or {}))


def sample_records(sample: Sample, split: str, image: Path, rng: np.random.Generator,
                   train_turns: int = 2, qtype: str | None = None) -> list[Record]:
    """The records of one image (see the module docstring: multi-turn train, single-turn eval);
    `qtype` is the question type of a val / test image (None: drawn uniformly)."""
    if split == "train":
        pool = list(sample.open.values()) + [sample.mme[int(rng.integers(2))]]
        idx = rng.choice(len(pool), size=min(train_turns, len(pool)), replace=False)
        return [_record(sample, f"{sample.id}-0", [pool[int(i)] for i in idx], image)]
    qtype = _pick(rng, SOURCE_TYPES[sample.source]) if qtype is None else qtype
    if qtype != "mme":
        return [_record(sample, f"{sample.id}-0", [sample.open[qtype]], image)]
    pair = list(sample.mme) if rng.random() < 0.5 else list(sample.mme)[::-1]
    return [_record(sample, f"{sample.id}-{k}", [item], image, {"pair_id": sample.id}) for k, item in enumerate(pair)]


def _summary(records: dict[str, list[Record]]) -> dict:
    out = {"records": {}, "turns": {}, "images": {}, "questions": {}, "sources": {}}
    for split, recs in records.items():
        types: dict[str, int] = {}
        sources: dict[str, set] = {}
        for r in recs:
            for t in r.extra["turn_types"]:
                types[t] = types.get(t, 0) + 1
            sources.setdefault(r.extra["source"], set()).add(r.images[0])
        out["records"][split] = len(recs)
        out["turns"][split] = sum(types.values())
        out["images"][split] = len({r.images[0] for r in recs})
        out["questions"][split] = dict(sorted(types.items()))
        out["sources"][split] = {s: len(v) for s, v in sorted(sources.items())}
    return out


def build_default_dataset(out_dir: Path, *, seed: int = 0, image_size: int = 32, max_digits: int | None = None,
                          num_shapes: int = 450, num_photos: int = 294, test_fraction: float = 0.15,
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
      num_shapes, num_photos: number of shape / photo images (>= 0); the default 294 is 14 crops
        per photo class. The defaults give about 3800 train QA turns and 490 test questions.
      test_fraction, val_fraction: fractions of each source's images in test / val.
      train_turns: QA turns per train record (>= 1).
      log: optional callable for one progress line.

    Returns:
      the manifest: "params", "photo_classes", per split "records", "turns" (QA turns), "images",
      "questions" (turns per question type), "sources" (images per source), "seconds", plus
      "paths" (Path objects: "root", "images", "manifest", "train", "val", "test"; not in the file).

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
               "shapes": shape_samples(num_shapes, image_size, seed),
               "photos": photo_samples(num_photos, image_size, seed)}
    records = {s: [] for s in SPLITS}
    written = set()
    for source in SOURCES:
        split_rng, rec_rng = _rng(seed, source, 2), _rng(seed, source, 3)
        for split, group in split_samples(samples[source], val_fraction, test_fraction, split_rng).items():
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
