"""Needle VQA: a sparse-relevance visual question answering task (few visual tokens carry the answer).

Why it exists. On the 2x2 digits task every visual token matters (a largest-digit question needs all
four), so there is nothing for token importance to weigh. Real VLM inputs are the opposite: a document
or street photo gives hundreds of visual tokens of which a few hold the answer, behind instructions the
answer never needs. This task reproduces that shape with real image content (scikit-learn's handwritten
digit scans, shipped inside the package):

- a large cluttered canvas: ``rows x cols`` cells of ``cell_px`` pixels (default 8x8 cells of 28 px =
  224x224 = 64 merged Qwen2-VL visual tokens, one token per cell);
- ``num_framed`` digits in frames of distinct colours (drawn from ``FRAME_COLOURS``), the look-alikes of
  each other; ``num_plain`` more digits without a frame; faint scan fragments and noise as background;
- a question naming one frame colour ("What is the digit in the red frame?"), so the answer needs exactly
  one visual token (the framed cell) and the colour word of the text (``question="sum"``: two named
  frames; ``question="count"``: how many cells hold a named digit, so the answer needs every copy of it
  and no other token);
- a preamble of instructions before the question (2-4 sentences drawn from ``PREAMBLE``) that the answer
  never needs.

Ground truth. Every sample knows which visual tokens hold its target: ``extra["relevant_tokens"]`` lists
their indices in the image's merged-token grid (row-major, ``extra["token_grid"] = [rows, cols]``); the
JSONL keeps both beside each line (calibration never reads them), so ``tlq importance`` measures how much
of the importance lands on them (:func:`tlq.data.records.relevant_visual_tokens`).

Splits and determinism follow :mod:`tlq.data.digits`: ``train``/``calibration`` use the train scan pool,
``val``/``test`` the test pool (handwriting never seen in training); sample ``i`` of a split depends only
on ``(seed, split, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tlq.config import ConfigError
from tlq.data.digits import SPLITS, CellGrid, Sample, label_pools, load_scans

__all__ = [
    "FRAME_COLOURS",
    "PREAMBLE",
    "QUESTION_TEMPLATES",
    "SUM_TEMPLATES",
    "COUNT_TEMPLATES",
    "DEFAULT_SIZES",
    "NeedleVQAConfig",
    "generate_samples",
    "corpus",
]

FRAME_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
}
"""Frame colours a question can name (RGB)."""

PREAMBLE: tuple[str, ...] = (
    "This picture is a scanned page with handwritten digits.",
    "Some digits are scattered over the page and a few of them are marked with coloured frames.",
    "The background has smudges and faint strokes that are not digits.",
    "Please look at the whole page carefully before you answer.",
    "Frames are drawn around some of the digits.",
    "Answer with a single digit and nothing else.",
    "Digits without a frame are not part of the question.",
    "The page was scanned in colour at low resolution.",
)
"""Instruction sentences; each question is preceded by a few of them, none needed for the answer."""

# Words of the generated preambles (``NeedleVQAConfig.preamble="generated"``): no colour, no digit, so
# nothing in them hints at an answer.
_NOUNS = ("archive", "bridge", "camera", "cabinet", "clerk", "engine", "garden", "harbour", "kitchen", "ledger", "library",
          "market", "meadow", "office", "packet", "pilot", "printer", "river", "scanner", "station", "storm", "teacher",
          "tower", "valley", "village", "window", "folder", "sensor", "manager", "student", "painter", "courier",
          "signal", "tunnel", "farmer", "doctor", "lantern", "mirror", "journal", "compass")
_VERBS = ("stores", "crosses", "watches", "repairs", "describes", "follows", "opens", "closes", "measures", "collects",
          "explains", "prints", "carries", "checks", "covers", "guards", "sorts", "visits", "updates", "copies",
          "reaches", "ignores", "answers", "protects", "lights", "moves", "marks", "reads", "builds", "cleans")
_ADJECTIVES = ("quiet", "narrow", "ancient", "busy", "careful", "distant", "empty", "fragile", "gentle", "heavy", "hidden",
               "honest", "large", "modern", "nervous", "patient", "rapid", "rough", "simple", "small", "steady", "strange",
               "tidy", "useful", "warm", "wide", "wooden", "bright", "dusty", "early")
_ADVERBS = ("slowly", "often", "rarely", "carefully", "quickly", "again", "today", "quietly", "always", "never",
            "usually", "later", "openly", "twice", "gladly")
_SENTENCE_FORMS = (
    "The {a} {n} {v} the {b} {m}.",
    "A {a} {n} {v} every {m} {d}.",
    "Each {n} {v} a {b} {m} {d}.",
    "The {n} near the {m} is {a} and {b}.",
    "When the {n} {v} the {m}, the {o} is {a}.",
    "Nobody {v} the {a} {n} {d}.",
)

QUESTION_TEMPLATES: tuple[str, ...] = (
    "What is the digit in the {c} frame?",
    "Which digit is framed in {c}?",
    "Read the digit inside the {c} box.",
)

SUM_TEMPLATES: tuple[str, ...] = (
    "Add the digits in the {c} and {d} frames. What is the last digit of the sum?",
    "What is the last digit of the sum of the {c} and {d} framed digits?",
    "Sum the digits inside the {c} and {d} boxes and give the last digit.",
)
"""``question="sum"``: two frames named, the answer is ``(a + b) mod 10``."""

COUNT_TEMPLATES: tuple[str, ...] = (
    "How many times does the digit {d} appear on the page?",
    "Count the handwritten digits {d} on the page. How many are there?",
    "How many of the digits on the page are a {d}?",
)
"""``question="count"``: one digit named, the answer is how many cells hold it (``count_range``)."""

QUESTIONS = ("read", "sum", "count")

PREAMBLE_SOURCES = ("fixed", "generated")
BLEND_LABELS = ("dominant", "sampled")  # NeedleVQAConfig.blend_label

DEFAULT_SIZES: dict[str, int] = {"calibration": 128, "val": 300, "test": 1000}
"""Sizes when ``n=None``: a 1,000-sample test set makes a 1-point difference measurable."""


@dataclass(frozen=True)
class NeedleVQAConfig(CellGrid):
    """Everything that decides the generated data. Same config -> same samples, byte for byte.

    Attributes:
        rows, cols: cell grid; one merged visual token per cell (Qwen2-VL: 28 px = 2x2 patches of 14).
        cell_px: side of a cell in pixels.
        frame_px: width of a frame, drawn on the cell's border.
        digit_px: side of an upscaled digit scan, placed inside the frame with a small jitter.
        num_framed: framed digits per image, each in a different colour of ``FRAME_COLOURS``.
        num_plain: unframed digits per image (distractors that must be ignored).
        num_fragments: faint partial scans in empty cells (background texture).
        fragment_intensity: brightness of the fragments relative to a digit.
        intensity_range: a digit's brightness factor range.
        noise_std: Gaussian pixel noise (fraction of 255).
        preamble_range: (min, max) number of preamble sentences before each question.
        preamble: where the preamble sentences come from: ``"fixed"`` = a few of the eight instructions of
            ``PREAMBLE``; ``"generated"`` = sentences drawn from a small grammar over ~150 words (no colours,
            no digits). Why: a real system prompt is varied text the answer never needs; eight recurring
            sentences give the text positions a handful of activation patterns, varied text gives them
            many, the way real prompts fill a model's width.
        asked_colours: the frame colours a question may name; every image holds at least one of them and
            the other framed digits are look-alike distractors. One colour (e.g. ``("red",)``) makes the
            cue fixed, so the question's text no longer chooses the target.
        question: ``"read"`` = the digit in one named frame; ``"sum"`` = the last digit of the sum of the
            digits in the first two ``asked_colours``' frames (every image holds both; the other frames are
            distractors). Why: reading is one lookup a quantized model keeps easily; adding two read digits
            makes the decoder's MLPs hold a 100-entry table, knowledge stored in weights as in a real model,
            with two sparse targets (2 of 64 tokens) instead of one. ``"count"`` = how many of the page's
            digits are the one the question names (``count_range``; the frames stay, as clutter). Why:
            a transformer counts through its softmax's denominator, so neighbouring counts differ by a
            small change of one attention output; that margin, not a single lookup, is what a quantizer's
            noise can move, and the answer needs every copy of the digit (1-5 of 64 tokens) and no other.
        count_range: (lo, hi) number of cells holding the asked digit (``question="count"``, uniform); every
            other digit on the page is a different one.
        count_digits: the digits a count question may name. One digit (e.g. ``(7,)``) makes the cue fixed,
            as ``asked_colours=("red",)`` does for reading: the answer position's query is then the same in
            every sample, one hop instead of reading the named digit first and then looking for it.
        target_blend: (lo, hi) range of the weight ``a`` of each askable framed digit, overprinted with a
            different digit at weight ``1 - a`` (the answer stays the dominant digit); for a count, of every
            digit on the page, the copies overprinted with another digit and the rest with the named one.
            Why: real images are often hard to read, and a model that learned them is unsure exactly
            there; ``a`` near 0.5 gives calibrated near-ties, the answers a quantizer flips first.
            ``(1.0, 1.0)`` (the default) draws nothing extra, so the samples are those of a config without
            the field.
        blend_cells: how many of those cells (drawn at random per page) are overprinted; ``None`` = all.
            Why: a count is wrong when any one of its 12 cells is misread, so overprinting all of them
            makes most pages unsure and many wrong; a few blended cells per page keep the doubt to a
            share of the answers.
        blend_pages: the share of pages that carry the blended cells, decided per page from a stream of its
            own; the other pages are drawn exactly as if blended but left clean, so every pixel outside the
            blended cell is the same either way. ``1.0`` (the default) blends every page. Why: with a weight
            range such as ``(0.65, 1.0)`` on every page a model sees a faint overprint it cannot weigh and
            hedges the same amount everywhere; near-tie blends (``(0.5, 0.6)``) on a share of the pages are
            a visible either-or, sure on clean pages and a coin flip on blended ones, which is the split a
            calibrated reader of real images has.
        blend_label: what an overprinted cell counts as in the answer. ``"dominant"`` (the default): its own
            digit, the one with the larger weight, so every earlier sample set is unchanged. ``"sampled"``:
            its own digit with probability equal to its weight ``a``, else the digit printed over it, drawn
            per cell from a stream of its own (the image is the same as with ``"dominant"``). Why: with a
            deterministic label a model can learn to resolve a 0.55/0.45 overprint and grows sure of it,
            whatever its depth; when the answer is itself uncertain in proportion to the ink, as with
            images people would label differently, the calibrated answer is a near-tie and no amount of
            training removes that doubt.
        sampled_below: with ``blend_label="sampled"``, only the overprinted cells whose own weight is below
            this are drawn; the clearer ones keep their dominant digit. ``1.0`` (the default) draws every
            one. Why: people disagree about an overprint only near a tie, and a model trained on a clear
            one should still learn to resolve it (the fine reading a quantizer's noise can break), while
            a near-tie stays a coin flip (the doubt). One knob, both kinds of cell on the same page.
        test_fraction, seed: the scan pools and the random streams, as in :mod:`tlq.data.digits`.
    """

    rows: int = 8
    cols: int = 8
    cell_px: int = 28
    frame_px: int = 2
    digit_px: int = 20
    num_framed: int = 3
    num_plain: int = 9
    num_fragments: int = 12
    fragment_intensity: float = 0.35
    intensity_range: tuple[float, float] = (0.6, 1.0)
    noise_std: float = 0.04
    preamble_range: tuple[int, int] = (2, 4)
    preamble: str = "fixed"
    asked_colours: tuple[str, ...] = tuple(FRAME_COLOURS)
    question: str = "read"
    target_blend: tuple[float, float] = (1.0, 1.0)
    blend_cells: int | None = None
    blend_pages: float = 1.0
    blend_label: str = "dominant"
    sampled_below: float = 1.0
    count_range: tuple[int, int] = (1, 5)
    count_digits: tuple[int, ...] = tuple(range(10))
    test_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ConfigError(f"rows and cols must be >= 1, got {self.rows}x{self.cols}")
        if not 1 <= self.num_framed <= len(FRAME_COLOURS):
            raise ConfigError(f"num_framed must be in [1, {len(FRAME_COLOURS)}], got {self.num_framed}")
        if self.num_framed + self.num_plain + self.num_fragments > self.num_cells:
            raise ConfigError(
                f"{self.num_framed} framed + {self.num_plain} plain digits + {self.num_fragments} fragments do not fit "
                f"in {self.num_cells} cells; lower them or enlarge the grid"
            )
        if not 8 <= self.digit_px <= self.cell_px - 2 * self.frame_px:
            raise ConfigError(f"digit_px must be in [8, cell_px - 2 * frame_px], got {self.digit_px}")
        unknown = sorted(set(self.asked_colours) - set(FRAME_COLOURS))
        if not self.asked_colours or unknown:
            raise ConfigError(f"asked_colours must be a non-empty subset of {list(FRAME_COLOURS)}, got {list(self.asked_colours)}")
        if self.question not in QUESTIONS:
            raise ConfigError(f"question must be one of {', '.join(QUESTIONS)}, got {self.question!r}")
        if self.question == "sum" and (len(self.asked_colours) < 2 or self.num_framed < 2):
            raise ConfigError("question='sum' names two frames: give at least two asked_colours and num_framed >= 2")
        c_lo, c_hi = self.count_range
        if self.question == "count" and not 1 <= c_lo <= c_hi <= min(9, self.num_framed + self.num_plain):
            raise ConfigError(
                f"count_range must satisfy 1 <= lo <= hi <= min(9, num_framed + num_plain) (a one-digit answer), got {self.count_range}"
            )
        if not self.count_digits or not set(self.count_digits) <= set(range(10)):
            raise ConfigError(f"count_digits must be a non-empty subset of 0..9, got {list(self.count_digits)}")
        b_lo, b_hi = self.target_blend
        if not 0.5 <= b_lo <= b_hi <= 1.0:
            raise ConfigError(f"target_blend must satisfy 0.5 <= lo <= hi <= 1 (the answer's digit dominates), got {self.target_blend}")
        if self.blend_cells is not None and (not isinstance(self.blend_cells, int) or self.blend_cells < 1):
            raise ConfigError(f"blend_cells must be None (every candidate cell) or >= 1, got {self.blend_cells}")
        if not isinstance(self.blend_pages, (int, float)) or not 0.0 < self.blend_pages <= 1.0:
            raise ConfigError(f"blend_pages must be a share in (0, 1] (no blends at all: target_blend=(1.0, 1.0)), got {self.blend_pages!r}")
        if self.blend_label not in BLEND_LABELS:
            raise ConfigError(f"blend_label must be one of {', '.join(BLEND_LABELS)}, got {self.blend_label!r}")
        if not isinstance(self.sampled_below, (int, float)) or not 0.5 < self.sampled_below <= 1.0:
            raise ConfigError(f"sampled_below must be in (0.5, 1] (a weight below which labels are drawn), got {self.sampled_below!r}")
        if self.sampled_below < 1.0 and self.blend_label != "sampled":
            raise ConfigError(f"sampled_below={self.sampled_below} only applies to blend_label='sampled'; set it or drop sampled_below")
        blended = self.num_framed + self.num_plain if self.blend_cells is None else self.blend_cells
        if self.blend_label == "sampled" and self.question == "count" and c_hi + blended > 9:
            raise ConfigError(
                f"blend_label='sampled' can raise a count by one per blended cell: count_range's hi ({c_hi}) + blended "
                f"cells ({blended}) must be <= 9 (a one-digit answer); set blend_cells or lower count_range"
            )
        if self.preamble not in PREAMBLE_SOURCES:
            raise ConfigError(f"preamble must be one of {', '.join(PREAMBLE_SOURCES)}, got {self.preamble!r}")
        lo, hi = self.preamble_range
        most = len(PREAMBLE) if self.preamble == "fixed" else 16
        if not 0 <= lo <= hi <= most:
            raise ConfigError(f"preamble_range must satisfy 0 <= lo <= hi <= {most} for preamble={self.preamble!r}, got {self.preamble_range}")


def _digit_patch(scan: np.ndarray, px: int) -> np.ndarray:
    img = Image.fromarray((scan * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return np.asarray(img.resize((px, px), Image.Resampling.BILINEAR), np.float32) / 255.0


def _place(ink: np.ndarray, patch: np.ndarray, cell: int, cfg: NeedleVQAConfig, rng: np.random.Generator) -> None:
    """Draw ``patch`` (0..1) into ``cell``, centred inside the frame area with a small jitter."""
    r, c = divmod(cell, cfg.cols)
    inner = cfg.cell_px - 2 * cfg.frame_px
    free = inner - patch.shape[0]
    dy, dx = (int(v) for v in rng.integers(0, free + 1, size=2))
    y0 = r * cfg.cell_px + cfg.frame_px + dy
    x0 = c * cfg.cell_px + cfg.frame_px + dx
    region = ink[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]]
    np.maximum(region, patch, out=region)


def _frame(rgb: np.ndarray, cell: int, colour: tuple[int, int, int], cfg: NeedleVQAConfig) -> None:
    r, c = divmod(cell, cfg.cols)
    y0, x0, s, f = r * cfg.cell_px, c * cfg.cell_px, cfg.cell_px, cfg.frame_px
    col = np.asarray(colour, np.float32)
    rgb[y0 : y0 + f, x0 : x0 + s] = col
    rgb[y0 + s - f : y0 + s, x0 : x0 + s] = col
    rgb[y0 : y0 + s, x0 : x0 + f] = col
    rgb[y0 : y0 + s, x0 + s - f : x0 + s] = col


def _render(
    cells: dict[int, tuple[int, float]],
    frames: dict[int, str],
    fragments: dict[int, int],
    cfg: NeedleVQAConfig,
    rng: np.random.Generator,
    overprint: dict[int, tuple[int, float, int]] | None = None,
) -> Image.Image:
    """cells: cell -> (scan id, brightness); frames: cell -> colour name; fragments: cell -> scan id;
    overprint: cell -> (second scan id, weight of the cell's own digit, second digit)."""
    images, _ = load_scans()
    w, h = cfg.image_size
    ink = np.zeros((h, w), np.float32)
    overprint = overprint or {}
    for cell, (sid, bright) in sorted(cells.items()):
        patch = _digit_patch(images[sid], cfg.digit_px)
        if cell in overprint:
            other, weight, _digit = overprint[cell]
            patch = weight * patch + (1.0 - weight) * _digit_patch(images[other], cfg.digit_px)
        _place(ink, patch * bright, cell, cfg, rng)
    for cell, sid in sorted(fragments.items()):
        patch = _digit_patch(images[sid], cfg.digit_px)
        keep = rng.integers(0, 2, size=2)  # keep one half (top/bottom x left/right): a stroke, not a digit
        half = cfg.digit_px // 2
        frag = np.zeros_like(patch)
        frag[keep[0] * half : keep[0] * half + half, :] = patch[keep[0] * half : keep[0] * half + half, :]
        if keep[1]:
            frag = frag.T
        _place(ink, frag * cfg.fragment_intensity, cell, cfg, rng)
    ink += rng.normal(0.0, cfg.noise_std, size=ink.shape).astype(np.float32)
    rgb = np.repeat(np.clip(ink, 0.0, 1.0)[..., None] * 255.0, 3, axis=2)
    for cell, name in sorted(frames.items()):
        _frame(rgb, cell, FRAME_COLOURS[name], cfg)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")


def _generated_sentence(rng: np.random.Generator) -> str:
    """One sentence of the preamble grammar (nonsense, but varied and well-formed)."""

    def pick(words: tuple[str, ...]) -> str:
        return words[int(rng.integers(len(words)))]

    form = _SENTENCE_FORMS[int(rng.integers(len(_SENTENCE_FORMS)))]
    return form.format(a=pick(_ADJECTIVES), b=pick(_ADJECTIVES), n=pick(_NOUNS), m=pick(_NOUNS), o=pick(_NOUNS), v=pick(_VERBS), d=pick(_ADVERBS))


def _question(templates: tuple[str, ...], cfg: NeedleVQAConfig, rng: np.random.Generator, **names: object) -> str:
    """Preamble sentences, then one of ``templates`` filled with ``names``."""
    lo, hi = cfg.preamble_range
    k = int(rng.integers(lo, hi + 1))
    if cfg.preamble == "generated":
        sentences = [_generated_sentence(rng) for _ in range(k)]
    else:
        sentences = [PREAMBLE[int(i)] for i in sorted(rng.choice(len(PREAMBLE), size=k, replace=False))]
    template = templates[int(rng.integers(len(templates)))]
    return " ".join([*sentences, template.format(**names)])


def _make_sample(split: str, index: int, cfg: NeedleVQAConfig) -> Sample:
    split = "calibration" if split == "calib" else split
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    pool_name, code = SPLITS[split]
    per_label = label_pools(cfg.seed, cfg.test_fraction, pool_name)

    def stream(k: int) -> np.random.Generator:
        """The sample's k-th independent random stream (0 image, 1 question, 2 drawn labels, 3 clean page):
        one per purpose, so a new option drawing from its own stream leaves every earlier set unchanged."""
        return np.random.default_rng([cfg.seed, 7000 + code, index, k])

    img_rng, q_rng = stream(0), stream(1)

    def scan(label: int) -> int:
        return int(per_label[label][img_rng.integers(len(per_label[label]))])

    n_digits = cfg.num_framed + cfg.num_plain
    order = img_rng.permutation(cfg.num_cells)
    digit_cells = [int(c) for c in order[:n_digits]]
    frag_cells = [int(c) for c in order[n_digits : n_digits + cfg.num_fragments]]
    labels = [int(v) for v in img_rng.integers(10, size=n_digits)]
    asked_digit = None  # the digit a count question names
    if cfg.question == "count":
        asked_digit, labels = _count_labels(n_digits, cfg, img_rng)
    lo, hi = cfg.intensity_range
    cells = {cell: (scan(lab), float(img_rng.uniform(lo, hi))) for cell, lab in zip(digit_cells, labels)}
    names = list(FRAME_COLOURS)
    colours = [names[int(i)] for i in img_rng.choice(len(names), size=cfg.num_framed, replace=False)]
    if cfg.question == "sum":  # both summed colours framed, the other frames drawn from the rest
        pair = list(cfg.asked_colours[:2])
        rest = [c for c in colours if c not in pair]
        colours = pair + rest[: cfg.num_framed - 2]
        colours = [colours[int(i)] for i in img_rng.permutation(len(colours))]
    elif not set(colours) & set(cfg.asked_colours):  # never with the default (every colour may be asked)
        free = [c for c in cfg.asked_colours if c not in colours]
        colours[0] = free[int(img_rng.integers(len(free)))]
    frames = dict(zip(digit_cells[: cfg.num_framed], colours))
    fragments = {cell: scan(int(img_rng.integers(10))) for cell in frag_cells}
    cell_label = dict(zip(digit_cells, labels))
    overprint = _overprints(frames, cell_label, cfg, img_rng, scan, asked_digit)
    if overprint and cfg.blend_pages < 1.0 and stream(3).random() >= cfg.blend_pages:
        overprint = {}  # drawn above all the same, so the rest of the page is what a blended one shows
    image = _render(cells, frames, fragments, cfg, img_rng, overprint)

    grid_labels = tuple(cell_label.get(c, -1) for c in range(cfg.num_cells))  # what is drawn dominant
    if cfg.blend_label == "sampled":
        cell_label = _sampled_labels(cell_label, overprint, stream(2), cfg.sampled_below)
    marks = tuple(1 + names.index(frames[c]) if c in frames else 0 for c in range(cfg.num_cells))
    if cfg.question == "sum":
        at = {colour: cell for cell, colour in frames.items()}
        a, b = (at[c] for c in cfg.asked_colours[:2])
        turns = [(_question(SUM_TEMPLATES, cfg, q_rng, c=cfg.asked_colours[0], d=cfg.asked_colours[1]), str((cell_label[a] + cell_label[b]) % 10))]
        extra = {"relevant_tokens": sorted((a, b)), "token_grid": [cfg.rows, cfg.cols], "frame": "+".join(cfg.asked_colours[:2])}
        if overprint:
            extra["blend"] = [round(_own_weight(overprint, a), 4), round(_own_weight(overprint, b), 4)]
        return Sample(image, turns[0][0], turns[0][1], "needle-sum", turns, grid_labels, extra=extra, marks=marks)
    if cfg.question == "count":
        held = sorted(cell for cell, lab in cell_label.items() if lab == asked_digit)
        turns = [(_question(COUNT_TEMPLATES, cfg, q_rng, d=asked_digit), str(len(held)))]
        extra = {"relevant_tokens": held, "token_grid": [cfg.rows, cfg.cols], "digit": asked_digit}
        if overprint:
            extra["blend"] = [round(_own_weight(overprint, c), 4) for c in held]
        return Sample(image, turns[0][0], turns[0][1], "needle-count", turns, grid_labels, extra=extra, marks=marks)
    framed = [(cell, c) for cell, c in frames.items() if c in cfg.asked_colours]  # one turn per asked colour
    first = int(q_rng.integers(len(framed)))
    framed = framed[first:] + framed[:first]
    turns = [(_question(QUESTION_TEMPLATES, cfg, q_rng, c=colour), str(cell_label[cell])) for cell, colour in framed]
    target = framed[0][0]
    extra = {"relevant_tokens": [target], "token_grid": [cfg.rows, cfg.cols], "frame": framed[0][1]}
    if overprint:
        extra["blend"] = round(_own_weight(overprint, target), 4)
    return Sample(image, turns[0][0], turns[0][1], "needle", turns, grid_labels, extra=extra, marks=marks)


def _count_labels(n_digits: int, cfg: NeedleVQAConfig, rng: np.random.Generator) -> tuple[int, list[int]]:
    """``question="count"``: the asked digit, and the page's labels with exactly ``k ~ count_range`` of
    them equal to it, at random slots (frames fall on random slots too, so they say nothing of the count)."""
    digit = cfg.count_digits[int(rng.integers(len(cfg.count_digits)))]
    k = int(rng.integers(cfg.count_range[0], cfg.count_range[1] + 1))
    holders = set(int(i) for i in rng.choice(n_digits, size=k, replace=False))
    labels = [digit if i in holders else (digit + 1 + int(rng.integers(9))) % 10 for i in range(n_digits)]
    return digit, labels


def _overprints(
    frames: dict[int, str],
    cell_label: dict[int, int],
    cfg: NeedleVQAConfig,
    rng: np.random.Generator,
    scan: Any,
    counted: int | None = None,
) -> dict[int, tuple[int, float, int]]:
    """Cell -> (a scan of another digit, the weight of its own, that other digit), weights from
    ``cfg.target_blend``.

    Reading: each askable framed cell gets a different digit. Counting (``counted`` = the named digit): every
    digit cell is a candidate, the copies overprinted with a different digit and every other cell with the
    named one, so each cell is in doubt both ways and the count is unsure exactly where some weights are
    near 0.5. ``cfg.blend_cells`` (if set) keeps only that many candidates, drawn per page."""
    lo, hi = cfg.target_blend
    if lo == hi == 1.0:
        return {}
    out = {}
    if counted is None:
        cells = sorted(c for c, colour in frames.items() if colour in cfg.asked_colours)
    else:
        cells = sorted(cell_label)
    if cfg.blend_cells is not None and cfg.blend_cells < len(cells):
        cells = sorted(int(c) for c in rng.choice(cells, size=cfg.blend_cells, replace=False))
    for cell in cells:
        own = cell_label[cell]
        other = counted if counted is not None and own != counted else (own + 1 + int(rng.integers(9))) % 10
        out[cell] = (scan(other), float(rng.uniform(lo, hi)), other)
    return out


def _sampled_labels(
    cell_label: dict[int, int], overprint: dict[int, tuple[int, float, int]], rng: np.random.Generator, below: float = 1.0
) -> dict[int, int]:
    """``blend_label="sampled"``: each overprinted cell whose own weight is below ``below`` keeps its own
    digit with probability its weight, else takes the digit printed over it (cells in sorted order, one
    draw each whether used or not, so the labels are fixed by the seed and the sample index alone)."""
    out = dict(cell_label)
    for cell in sorted(overprint):
        _scan, weight, other = overprint[cell]
        if rng.random() >= weight and weight < below:
            out[cell] = other
    return out


def _own_weight(overprint: dict[int, tuple[int, float, int]], cell: int) -> float:
    """The weight of a cell's own digit: 1.0 where ``blend_cells`` left it clean."""
    return overprint[cell][1] if cell in overprint else 1.0


def generate_samples(
    split: str, n: int | None = None, cfg: NeedleVQAConfig | None = None, *, start: int = 0
) -> list[Sample]:
    """Samples ``start .. start + n - 1`` of ``split``; ``labels`` holds each cell's digit (-1 = none).

    ``n=None`` uses ``DEFAULT_SIZES`` (128 calibration, 300 val, 1,000 test).
    """
    cfg = cfg or NeedleVQAConfig()
    name = "calibration" if split == "calib" else split
    if n is None:
        if name not in DEFAULT_SIZES:
            raise ValueError(f"split {split!r} has no default size; pass n")
        n = DEFAULT_SIZES[name]
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    return [_make_sample(name, start + i, cfg) for i in range(n)]


def corpus(cfg: NeedleVQAConfig | None = None) -> list[str]:
    """Every sentence, question and answer the task can produce (for tokenizer training)."""
    texts = list(PREAMBLE)
    if cfg is not None and cfg.preamble == "generated":
        texts += [form.format(a=a, b=a, n=n, m=n, o=n, v=v, d=d)
                  for form in _SENTENCE_FORMS for a, n, v, d in zip(_ADJECTIVES * 2, _NOUNS, _VERBS * 2, _ADVERBS * 3)]
    texts += [t.format(c=c) for t in QUESTION_TEMPLATES for c in FRAME_COLOURS]
    if cfg is not None and cfg.question == "count":
        texts += [t.format(d=d) for t in COUNT_TEMPLATES for d in range(10)]
    if cfg is not None and cfg.question == "sum":
        texts += [t.format(c=c, d=d) for t in SUM_TEMPLATES for c in FRAME_COLOURS for d in FRAME_COLOURS if c != d]
    return texts + [str(d) for d in range(10)]
