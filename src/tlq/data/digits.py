"""Digits VQA: a small, real-image visual question answering task for training and testing tiny VLMs.

Images are composed from scikit-learn's handwritten digit scans (``sklearn.datasets.load_digits``:
1,797 real 8x8 scans, values 0..16, shipped inside the sklearn package, so nothing is downloaded).
Several scans are upscaled and placed on a black canvas, one per grid cell, with a small random
shift and brightness change. Each question asks about the image in a way that needs the question
text to decide *what* to read (the digit at a given position, a comparison of two positions, the
count of a given digit) and the image to supply the values, so both modalities matter.

Geometry. Qwen2-VL-style vision towers cut 14x14 patches and merge 2x2 of them, so one merged
visual token covers 28x28 pixels. Each digit sits in its own 28x28 cell (``cell_px``) and is
``digit_px`` = 24 pixels wide, so one digit maps onto exactly one merged visual token, whatever the
jitter. The default 2x2 grid gives a 56x56 image = 4 visual tokens; 56x56 is also the Qwen2-VL
image processor's default ``min_pixels`` (3136), so that processor does not resize it (a 1x3 row,
84x28 = 2352 pixels, would be resized up unless ``min_pixels`` is lowered). LLaVA-OneVision's
processor resizes any image itself, so it gets the same images.

Question types (answers are short strings: ``"7"``, ``"13"``, ``"yes"``, ``"no"``):

- ``digit``: "What is the digit at position 3?" / "What is the top right digit?" -> ``0``..``9``
- ``sum``: "What is the sum of all digits?" -> ``0``..``9 * N``
- ``compare``: "Is the top left digit larger (smaller) than the bottom right digit?" -> ``yes`` / ``no``
- ``count``: "How many times does the digit 7 appear?" -> ``0``..``N``
- ``parity``: "Is the sum of all digits even?" (or "... odd?") -> ``yes`` / ``no``
- ``max`` / ``min``: "What is the largest digit?" / "What is the smallest digit?" -> ``0``..``9``

Positions are numbered 1..N in reading order (left to right, then top to bottom). Grids up to 3x3
also have names (``top left``, ``middle``, ``right`` ...). A comparison of two equal digits is
answered ``no`` (the digit is not larger / smaller).

Splits. The 1,797 scans are split once per seed, stratified by label, into a *train pool* and a
*test pool* (``test_fraction`` of each label). ``train`` and ``calibration`` samples use only train
pool scans; ``val`` and ``test`` samples use only test pool scans, so evaluation images contain
handwriting never seen in training. Each split has its own random stream, and sample ``i`` of a
split depends only on ``(seed, split, i)``: ``generate_samples("test", 100)`` is the first 100 of
``generate_samples("test", 500)``, and ``generate_samples("train", 64, start=64 * step)`` draws
fresh training batches on the fly. Nothing touches the global numpy / random / torch RNG state.

Multi-turn training. Every ``Sample`` also carries ``turns``: ``turns_per_sample`` distinct
(question, answer) pairs about the same image, the first being the sample's own question. Training
on several answers per image and sequence is what let a tiny language model learn to read the
visual tokens (an earlier single-turn attempt did not); evaluation and calibration use the single ``question``.

Typical use::

    from tlq.data.digits import DigitsVQAConfig, generate_samples, write_jsonl
    cfg = DigitsVQAConfig()
    calib = write_jsonl(generate_samples("calibration", 128, cfg), "out/digits", "calibration")
    test = write_jsonl(generate_samples("test", 500, cfg), "out/digits", "test")
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from tlq.config import ConfigError

__all__ = [
    "QUESTION_TYPES",
    "SPLITS",
    "DEFAULT_SIZES",
    "DigitsVQAConfig",
    "Sample",
    "load_scans",
    "cell_colours",
    "scan_pools",
    "generate_samples",
    "write_jsonl",
    "corpus",
]

QUESTION_TYPES: tuple[str, ...] = ("digit", "sum", "compare", "count", "parity", "max", "min")
"""All question types, in a fixed order."""

# Split name -> (scan pool, stream code). The stream code keeps the random streams of the splits apart.
SPLITS: dict[str, tuple[str, int]] = {
    "train": ("train", 0),
    "calibration": ("train", 1),
    "val": ("test", 2),
    "test": ("test", 3),
}
"""Split names and the scan pool each draws from (``"calib"`` is accepted for ``"calibration"``)."""

DEFAULT_SIZES: dict[str, int] = {"calibration": 128, "val": 200, "test": 500}
"""Sizes used when ``generate_samples`` gets ``n=None`` (``train`` has no default: pass ``n``)."""

_ROW_NAMES = {1: ("",), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COL_NAMES = {1: ("",), 2: ("left", "right"), 3: ("left", "middle", "right")}


class CellGrid:
    """Geometry of a canvas of ``rows x cols`` square cells of ``cell_px`` pixels (one visual token each)."""

    rows: int
    cols: int
    cell_px: int

    @property
    def num_cells(self) -> int:
        return self.rows * self.cols

    @property
    def image_size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels, as PIL reports it."""
        return (self.cols * self.cell_px, self.rows * self.cell_px)


@dataclass(frozen=True)
class DigitsVQAConfig(CellGrid):
    """Everything that decides the generated data. Same config -> same samples, byte for byte.

    Attributes:
        rows, cols: the grid of digits; one digit per cell, ``rows * cols`` digits per image.
            Default 2x2: a 56x56 image = 4 merged visual tokens (Qwen2-VL patch 14, 2x2 merge), small
            enough for CPU training, with 4 positions to tell apart and sums up to 36.
        cell_px: side of one cell in pixels. 28 = one merged visual token of Qwen2-VL.
        digit_px: side of an upscaled digit scan (8x8 -> ``digit_px``), at most ``cell_px``. 24 leaves
            4 pixels of room for the position jitter, so a digit never leaves its token cell.
        jitter_px: largest shift of a digit from the centre of its cell, per axis (clipped so the digit
            stays inside the cell).
        intensity_range: the digit's brightness is multiplied by a factor drawn from this range.
        noise_std: standard deviation of Gaussian pixel noise, as a fraction of 255 (0 disables it).
        cell_tint: brightness (fraction of 255, in [0, 1)) of a distinct background colour given to each
            grid cell, so a visual token shows *where* it is in its own content, not only through
            positional encodings: cell k gets the hue ``k / (rows * cols)`` (2x2: red, yellow-green,
            cyan, violet), the white digit strokes are blended over it (``ink + tint * (1 - ink)``), so
            the digits stay legible. 0 (the default) disables it and gives the grey images, byte for
            byte. The tint draws nothing from the random streams: labels, questions, jitter and noise
            are the same with or without it.
        question_types: types to draw from, uniformly (a type listed twice is drawn twice as often).
        position_style: how questions name a position: ``"number"`` ("position 3"), ``"name"``
            ("top left"; grids up to 3x3 only) or ``"both"`` (either, 50/50; the default, so the text
            really has to be read).
        turns_per_sample: number of (question, answer) turns per image in ``Sample.turns``, each asking
            something different (fewer if the image has fewer distinct questions). 6 keeps a training
            sequence under ~100 text tokens.
        test_fraction: share of each digit label's scans kept for the test pool (the rest is the
            train pool). 0.3 -> ~539 test scans, ~1258 train scans.
        seed: the one seed everything derives from (scan pools, images, questions).
    """

    rows: int = 2
    cols: int = 2
    cell_px: int = 28
    digit_px: int = 24
    jitter_px: int = 2
    intensity_range: tuple[float, float] = (0.7, 1.0)
    noise_std: float = 0.02
    cell_tint: float = 0.0
    question_types: tuple[str, ...] = QUESTION_TYPES
    position_style: str = "both"
    turns_per_sample: int = 6
    test_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ConfigError(f"rows and cols must be >= 1, got {self.rows}x{self.cols}")
        if not 8 <= self.digit_px <= self.cell_px:
            raise ConfigError(f"digit_px must be in [8, cell_px={self.cell_px}], got {self.digit_px}")
        if self.jitter_px < 0:
            raise ConfigError(f"jitter_px must be >= 0, got {self.jitter_px}")
        lo, hi = self.intensity_range
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"intensity_range must satisfy 0 < lo <= hi <= 1, got {self.intensity_range}")
        if self.noise_std < 0:
            raise ConfigError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.cell_tint < 1.0:
            raise ConfigError(f"cell_tint must be in [0, 1), got {self.cell_tint}")
        if not self.question_types:
            raise ConfigError("question_types is empty; choose from " + ", ".join(QUESTION_TYPES))
        unknown = sorted(set(self.question_types) - set(QUESTION_TYPES))
        if unknown:
            raise ConfigError(f"unknown question types {unknown}; choose from {', '.join(QUESTION_TYPES)}")
        if "compare" in self.question_types and self.num_digits < 2:
            raise ConfigError("'compare' questions need at least 2 digits per image")
        if self.position_style not in ("number", "name", "both"):
            raise ConfigError(f"position_style must be 'number', 'name' or 'both', got {self.position_style!r}")
        if self.position_style == "name" and self.position_names() is None:
            raise ConfigError("position_style='name' needs a grid of at most 3x3; use 'number'")
        if self.turns_per_sample < 1:
            raise ConfigError(f"turns_per_sample must be >= 1, got {self.turns_per_sample}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")

    @property
    def num_digits(self) -> int:
        return self.num_cells

    @property
    def max_sum(self) -> int:
        return 9 * self.num_digits

    def position_names(self) -> list[str] | None:
        """Names of the positions in reading order, or ``None`` for grids larger than 3x3."""
        if self.rows not in _ROW_NAMES or self.cols not in _COL_NAMES or self.num_digits < 2:
            return None
        names = []
        for r in _ROW_NAMES[self.rows]:
            for c in _COL_NAMES[self.cols]:
                name = " ".join(p for p in (r, c) if p)
                names.append("center" if name == "middle middle" else name)
        return names


@dataclass
class Sample:
    """One generated VQA sample.

    ``question`` / ``answer`` is the sample's main pair (written to JSONL, used for calibration and
    evaluation); ``turns`` holds ``turns_per_sample`` distinct pairs about the same image, starting
    with the main one (for multi-turn training sequences). ``labels`` are the digits in reading
    order and ``scan_ids`` their indices into ``load_digits()``.
    """

    image: Image.Image
    question: str
    answer: str
    qtype: str
    turns: list[tuple[str, str]] = field(default_factory=list)
    labels: tuple[int, ...] = ()
    scan_ids: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)  # ground truth written beside each JSONL line (the loader ignores it)
    marks: tuple[int, ...] = ()  # per-cell marker class (needle task: frame colour, 0 = none); training only


@lru_cache(maxsize=1)
def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: the 1,797 scans as float32 ``[1797, 8, 8]`` in 0..16 and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float32)
    labels = np.asarray(d.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@lru_cache(maxsize=8)
def _pools(seed: int, test_fraction: float) -> dict[str, tuple[np.ndarray, ...]]:
    _, labels = load_scans()
    rng = np.random.default_rng([seed, 1000])  # pool stream, apart from every split stream
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for d in range(10):
        idx = np.flatnonzero(labels == d)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(np.sort(idx[:k]))
        train.append(np.sort(idx[k:]))
    return {"train": tuple(train), "test": tuple(test)}


def label_pools(seed: int, test_fraction: float, pool: str) -> tuple[np.ndarray, ...]:
    """Per digit label, the sorted scan indices of ``pool`` (``"train"`` or ``"test"``) for this seed."""
    return _pools(seed, test_fraction)[pool]


def scan_pools(cfg: DigitsVQAConfig | None = None) -> dict[str, np.ndarray]:
    """The disjoint scan index pools ``{"train": ..., "test": ...}`` (sorted indices into ``load_scans()``)."""
    cfg = cfg or DigitsVQAConfig()
    pools = _pools(cfg.seed, cfg.test_fraction)
    return {name: np.sort(np.concatenate(per_label)) for name, per_label in pools.items()}


def _split(split: str) -> tuple[str, int]:
    split = "calibration" if split == "calib" else split
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return SPLITS[split]


def _render(scan_ids: Sequence[int], cfg: DigitsVQAConfig, rng: np.random.Generator) -> Image.Image:
    images, _ = load_scans()
    w, h = cfg.image_size
    canvas = np.zeros((h, w), dtype=np.float32)
    free = cfg.cell_px - cfg.digit_px
    lo_i, hi_i = cfg.intensity_range
    for pos, sid in enumerate(scan_ids):
        r, c = divmod(pos, cfg.cols)
        scan = Image.fromarray((images[sid] * (255.0 / 16.0)).astype(np.uint8), mode="L")
        digit = np.asarray(scan.resize((cfg.digit_px, cfg.digit_px), Image.Resampling.BILINEAR), np.float32)
        dy, dx = rng.integers(-cfg.jitter_px, cfg.jitter_px + 1, size=2)
        oy = int(np.clip(free // 2 + dy, 0, free))
        ox = int(np.clip(free // 2 + dx, 0, free))
        y0, x0 = r * cfg.cell_px + oy, c * cfg.cell_px + ox
        canvas[y0 : y0 + cfg.digit_px, x0 : x0 + cfg.digit_px] = digit * rng.uniform(lo_i, hi_i)
    if cfg.noise_std > 0:
        canvas += rng.normal(0.0, cfg.noise_std * 255.0, size=canvas.shape).astype(np.float32)
    if cfg.cell_tint > 0:
        ink = np.clip(canvas, 0.0, 255.0)[..., None]  # [h, w, 1]
        bg = _tint_map(cfg)  # [h, w, 3]
        rgb = ink + bg * (1.0 - ink / 255.0)  # white strokes over the cell's colour
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").convert("RGB")


def cell_colours(cfg: DigitsVQAConfig) -> np.ndarray:
    """``[rows * cols, 3]`` background colours (0..255, float) of the cells when ``cfg.cell_tint > 0``.

    Fully saturated hues spaced evenly around the colour wheel (cell k: hue ``k / N``), scaled so the
    brightest channel is ``cell_tint * 255``.
    """
    import colorsys

    n = cfg.num_digits
    cols = [colorsys.hsv_to_rgb(k / n, 1.0, 1.0) for k in range(n)]
    return np.asarray(cols, dtype=np.float32) * (cfg.cell_tint * 255.0)


def _tint_map(cfg: DigitsVQAConfig) -> np.ndarray:
    w, h = cfg.image_size
    colours = cell_colours(cfg)
    bg = np.zeros((h, w, 3), dtype=np.float32)
    for pos in range(cfg.num_digits):
        r, c = divmod(pos, cfg.cols)
        bg[r * cfg.cell_px : (r + 1) * cfg.cell_px, c * cfg.cell_px : (c + 1) * cfg.cell_px] = colours[pos]
    return bg


def _where(pos: int, cfg: DigitsVQAConfig, rng: np.random.Generator) -> tuple[str, str]:
    """(phrase "the digit at position k" / "the top left digit", style) for position ``pos`` (0-based)."""
    names = cfg.position_names()
    style = cfg.position_style
    if style == "both":
        style = "name" if names is not None and rng.random() < 0.5 else "number"
    if style == "name":
        return f"the {names[pos]} digit", style
    return f"the digit at position {pos + 1}", style


def _question(
    qtype: str, labels: Sequence[int], cfg: DigitsVQAConfig, rng: np.random.Generator
) -> tuple[str, str, tuple]:
    """(question, answer, key); questions with equal keys ask the same thing (e.g. "even?" / "odd?")."""
    n = len(labels)
    yes_no = ("no", "yes")
    if qtype == "digit":
        pos = int(rng.integers(n))
        phrase, _ = _where(pos, cfg, rng)
        return f"What is {phrase}?", str(labels[pos]), ("digit", pos)
    if qtype == "sum":
        return "What is the sum of all digits?", str(sum(labels)), ("sum",)
    if qtype == "compare":
        i, j = (int(x) for x in rng.choice(n, size=2, replace=False))
        a, style = _where(i, cfg, rng)
        # both positions in the same style, so a question never mixes "position 2" and "top left"
        b = f"the {cfg.position_names()[j]} digit" if style == "name" else f"the digit at position {j + 1}"
        key = ("compare", min(i, j), max(i, j))
        if rng.random() < 0.5:
            return f"Is {a} larger than {b}?", yes_no[labels[i] > labels[j]], key
        return f"Is {a} smaller than {b}?", yes_no[labels[i] < labels[j]], key
    if qtype == "count":
        # Half the time ask about a digit that is present, so the answers are not mostly "0".
        d = int(rng.choice(labels)) if rng.random() < 0.5 else int(rng.integers(10))
        return f"How many times does the digit {d} appear?", str(sum(1 for x in labels if x == d)), ("count", d)
    if qtype == "parity":
        if rng.random() < 0.5:
            return "Is the sum of all digits even?", yes_no[sum(labels) % 2 == 0], ("parity",)
        return "Is the sum of all digits odd?", yes_no[sum(labels) % 2 == 1], ("parity",)
    if qtype == "max":
        return "What is the largest digit?", str(max(labels)), ("max",)
    if qtype == "min":
        return "What is the smallest digit?", str(min(labels)), ("min",)
    raise ValueError(f"unknown question type {qtype!r}")


def _make_sample(split: str, index: int, cfg: DigitsVQAConfig) -> Sample:
    pool_name, code = _split(split)
    per_label = _pools(cfg.seed, cfg.test_fraction)[pool_name]
    _, all_labels = load_scans()
    # Independent streams per (seed, split, index): image, main question, extra turns.
    img_rng = np.random.default_rng([cfg.seed, code, index, 0])
    q_rng = np.random.default_rng([cfg.seed, code, index, 1])
    t_rng = np.random.default_rng([cfg.seed, code, index, 2])

    digits = img_rng.integers(10, size=cfg.num_digits)  # labels uniform over 0..9
    scan_ids = tuple(int(per_label[d][img_rng.integers(len(per_label[d]))]) for d in digits)
    labels = tuple(int(all_labels[s]) for s in scan_ids)
    image = _render(scan_ids, cfg, img_rng)

    qtype = str(cfg.question_types[int(q_rng.integers(len(cfg.question_types)))])
    question, answer, key = _question(qtype, labels, cfg, q_rng)
    turns = [(question, answer)]
    seen = {key}
    for _ in range(20 * cfg.turns_per_sample):
        if len(turns) >= cfg.turns_per_sample:
            break
        t = str(cfg.question_types[int(t_rng.integers(len(cfg.question_types)))])
        q, a, key = _question(t, labels, cfg, t_rng)
        if key not in seen:  # one turn per distinct question, so no turn gives another's answer away
            seen.add(key)
            turns.append((q, a))
    return Sample(image, question, answer, qtype, turns, labels, scan_ids)


def generate_samples(
    split: str, n: int | None = None, cfg: DigitsVQAConfig | None = None, *, start: int = 0
) -> list[Sample]:
    """Samples ``start .. start + n - 1`` of ``split`` (``train``, ``calibration``/``calib``, ``val``, ``test``).

    ``n=None`` uses ``DEFAULT_SIZES[split]`` (128 calibration, 200 val, 500 test). The train split is
    unbounded: step through it with ``start`` to generate training data on the fly.
    """
    cfg = cfg or DigitsVQAConfig()
    name = "calibration" if split == "calib" else split
    _split(name)
    if n is None:
        if name not in DEFAULT_SIZES:
            raise ValueError(f"split {split!r} has no default size; pass n")
        n = DEFAULT_SIZES[name]
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    return [_make_sample(name, start + i, cfg) for i in range(n)]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(samples: Sequence[Sample], out_dir: str | os.PathLike, name: str) -> Path:
    """Write ``<out_dir>/<name>.jsonl`` and the images ``<out_dir>/<name>_images/<i>.png``; return the JSONL path.

    One line per sample: ``{"image": "<path relative to the jsonl file>", "question": ..., "answer": ...}``
    followed by the sample's ``extra`` ground truth, if any (keys the loader ignores). Every file is
    written to a temporary file and renamed into place, the JSONL last, so a reader never sees a partial
    file or a line whose image is missing.
    """
    out = Path(out_dir)
    img_dir = out / f"{name}_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(samples):
        rel = f"{name}_images/{i:05d}.png"
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        _atomic_write_bytes(out / rel, buf.getvalue())
        lines.append(json.dumps({"image": rel, "question": s.question, "answer": s.answer, **s.extra}, ensure_ascii=False))
    path = out / f"{name}.jsonl"
    _atomic_write_bytes(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))
    return path


def corpus(cfg: DigitsVQAConfig | None = None) -> list[str]:
    """Every question the config can generate and every answer, one string each (for tokenizer training)."""
    cfg = cfg or DigitsVQAConfig()
    n = cfg.num_digits
    names = cfg.position_names()
    phrases = []
    if cfg.position_style in ("number", "both") or names is None:
        phrases.append([f"the digit at position {k + 1}" for k in range(n)])
    if cfg.position_style in ("name", "both") and names is not None:
        phrases.append([f"the {nm} digit" for nm in names])
    texts: list[str] = []
    types = set(cfg.question_types)
    for ph in phrases:
        if "digit" in types:
            texts += [f"What is {p}?" for p in ph]
        if "compare" in types:
            texts += [
                f"Is {ph[i]} {rel} than {ph[j]}?"
                for rel in ("larger", "smaller")
                for i in range(n)
                for j in range(n)
                if i != j
            ]
    if "sum" in types:
        texts.append("What is the sum of all digits?")
    if "count" in types:
        texts += [f"How many times does the digit {d} appear?" for d in range(10)]
    if "parity" in types:
        texts += ["Is the sum of all digits even?", "Is the sum of all digits odd?"]
    if "max" in types:
        texts.append("What is the largest digit?")
    if "min" in types:
        texts.append("What is the smallest digit?")
    texts += [str(v) for v in range(max(cfg.max_sum, 9) + 1)] + ["yes", "no"]
    return texts
