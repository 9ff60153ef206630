"""Tests for the digits VQA task generator (tlq.data.digits)."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tlq.config import ConfigError
from tlq.data import digits as dg
from tlq.data.digits import DigitsVQAConfig, corpus, generate_samples, load_scans, scan_pools, write_jsonl

CFG = DigitsVQAConfig()


@pytest.fixture(scope="module")
def test_samples():
    return generate_samples("test", 700, CFG)


def _same(a, b) -> bool:
    return (
        a.question == b.question
        and a.answer == b.answer
        and a.turns == b.turns
        and a.scan_ids == b.scan_ids
        and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    )


# ---------------------------------------------------------------- determinism


def test_same_seed_same_samples_regardless_of_global_rng():
    np.random.seed(1)
    a = generate_samples("calibration", 20, CFG)
    np.random.seed(2)
    np.random.rand(100)
    b = generate_samples("calib", 20, DigitsVQAConfig())
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))


def test_prefix_and_start_are_consistent():
    full = generate_samples("train", 12, CFG)
    assert all(_same(x, y) for x, y in zip(full[:5], generate_samples("train", 5, CFG)))
    assert all(_same(x, y) for x, y in zip(full[7:], generate_samples("train", 5, CFG, start=7)))


def test_other_seed_or_split_differs():
    a = generate_samples("test", 10, CFG)
    b = generate_samples("test", 10, DigitsVQAConfig(seed=1))
    c = generate_samples("val", 10, CFG)
    assert not all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))


def test_default_sizes_and_bad_split():
    assert len(generate_samples("calibration", cfg=CFG)) == 128
    with pytest.raises(ValueError):
        generate_samples("train", cfg=CFG)  # no default size
    with pytest.raises(ValueError):
        generate_samples("nope", 3, CFG)


# ---------------------------------------------------------------- splits


def test_pools_disjoint_cover_all_and_stratified():
    pools = scan_pools(CFG)
    train, test = set(pools["train"].tolist()), set(pools["test"].tolist())
    assert not train & test
    assert len(train) + len(test) == 1797
    _, labels = load_scans()
    for pool in (train, test):
        assert set(labels[sorted(pool)].tolist()) == set(range(10))
    assert abs(len(test) / 1797 - CFG.test_fraction) < 0.01
    # the pool split depends on the seed
    assert set(scan_pools(DigitsVQAConfig(seed=3))["test"].tolist()) != test


def test_splits_draw_from_their_pool(test_samples):
    pools = scan_pools(CFG)
    train, test = set(pools["train"].tolist()), set(pools["test"].tolist())
    for split, pool in (("train", train), ("calibration", train), ("val", test)):
        for s in generate_samples(split, 100, CFG):
            assert set(s.scan_ids) <= pool, split
    used_test = {i for s in test_samples for i in s.scan_ids}
    used_train = {i for s in generate_samples("train", 300, CFG) for i in s.scan_ids}
    assert used_test <= test and not used_test & used_train


# ---------------------------------------------------------------- answers


def _expected(question: str, labels: list[int], names: list[str]) -> str:
    """Independent re-implementation of the answer, from the question text and true labels."""
    yn = lambda b: "yes" if b else "no"  # noqa: E731

    def pos(phrase: str) -> int:
        m = re.fullmatch(r"the digit at position (\d+)", phrase)
        if m:
            return int(m.group(1)) - 1
        m = re.fullmatch(r"the (.+) digit", phrase)
        return names.index(m.group(1))

    if m := re.fullmatch(r"What is (the digit at position \d+|the [a-z ]+ digit)\?", question):
        if question not in ("What is the largest digit?", "What is the smallest digit?"):
            return str(labels[pos(m.group(1))])
    if question == "What is the largest digit?":
        return str(max(labels))
    if question == "What is the smallest digit?":
        return str(min(labels))
    if question == "What is the sum of all digits?":
        return str(sum(labels))
    if question == "Is the sum of all digits even?":
        return yn(sum(labels) % 2 == 0)
    if question == "Is the sum of all digits odd?":
        return yn(sum(labels) % 2 == 1)
    if m := re.fullmatch(r"How many times does the digit (\d) appear\?", question):
        return str(labels.count(int(m.group(1))))
    if m := re.fullmatch(r"Is (.+) (larger|smaller) than (.+)\?", question):
        a, b = labels[pos(m.group(1))], labels[pos(m.group(3))]
        return yn(a > b if m.group(2) == "larger" else a < b)
    raise AssertionError(f"unparsed question {question!r}")


@pytest.mark.parametrize("cfg", [CFG, DigitsVQAConfig(rows=1, cols=3), DigitsVQAConfig(rows=3, cols=3)])
def test_answers_match_true_labels(cfg):
    _, true = load_scans()
    names = cfg.position_names()
    for s in generate_samples("test", 150, cfg):
        labels = [int(true[i]) for i in s.scan_ids]
        assert list(s.labels) == labels
        assert s.turns[0] == (s.question, s.answer)
        for q, a in s.turns:
            assert a == _expected(q, labels, names), (q, a, labels)


def test_constructed_case():
    cfg = CFG
    labels = (3, 3, 7, 1)  # top left, top right, bottom left, bottom right
    seen = {}
    for k in range(300):
        rng = np.random.default_rng(k)
        for t in dg.QUESTION_TYPES:
            q, a, _ = dg._question(t, labels, cfg, rng)
            seen[q] = a
    assert seen["What is the sum of all digits?"] == "14"
    assert seen["Is the sum of all digits even?"] == "yes"
    assert seen["Is the sum of all digits odd?"] == "no"
    assert seen["What is the largest digit?"] == "7"
    assert seen["What is the smallest digit?"] == "1"
    assert seen["What is the bottom left digit?"] == seen["What is the digit at position 3?"] == "7"
    assert seen["What is the digit at position 4?"] == "1"
    assert seen["How many times does the digit 3 appear?"] == "2"
    assert seen["How many times does the digit 7 appear?"] == "1"
    # equal digits: neither larger nor smaller
    assert seen["Is the top left digit larger than the top right digit?"] == "no"
    assert seen["Is the digit at position 1 smaller than the digit at position 2?"] == "no"
    assert seen["Is the bottom left digit larger than the top left digit?"] == "yes"
    assert seen["Is the digit at position 4 larger than the digit at position 3?"] == "no"
    assert seen["Is the digit at position 4 smaller than the digit at position 3?"] == "yes"


# ---------------------------------------------------------------- images


def test_image_geometry():
    assert CFG.image_size == (56, 56)  # 2x2 merged visual tokens of 28x28 px
    s = generate_samples("test", 1, CFG)[0]
    assert s.image.size == (56, 56) and s.image.mode == "RGB"
    row = DigitsVQAConfig(rows=1, cols=3)
    assert generate_samples("val", 1, row)[0].image.size == row.image_size == (84, 28)


def test_each_digit_stays_in_its_cell():
    cfg = DigitsVQAConfig(noise_std=0.0, jitter_px=4)  # max jitter gets clipped to the cell
    images, _ = load_scans()
    for s in generate_samples("train", 30, cfg):
        px = np.asarray(s.image)[..., 0].astype(np.int64)
        for pos, sid in enumerate(s.scan_ids):
            r, c = divmod(pos, cfg.cols)
            cell = px[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28]
            # all of the scan's ink lands in its cell: ink mass ~ scan mass * upscale^2 * gain
            expected = images[sid].sum() * 255 / 16 * (24 / 8) ** 2
            assert 0.6 * expected <= cell.sum() <= 1.05 * expected


def test_cell_tint_marks_cells_and_changes_nothing_else():
    plain_cfg = DigitsVQAConfig(noise_std=0.0)
    tint_cfg = DigitsVQAConfig(noise_std=0.0, cell_tint=0.3)
    colours = dg.cell_colours(tint_cfg)
    assert colours.shape == (4, 3) and len({tuple(c) for c in colours.tolist()}) == 4  # one colour per cell
    assert np.isclose(colours.max(), 0.3 * 255)
    for p, t in zip(generate_samples("train", 10, plain_cfg), generate_samples("train", 10, tint_cfg)):
        # same digits, scans, questions and turns: the tint draws nothing from the random streams
        assert (p.labels, p.scan_ids, p.question, p.answer, p.turns) == (t.labels, t.scan_ids, t.question, t.answer, t.turns)
        gray = np.asarray(p.image)[..., 0].astype(np.float64)
        rgb = np.asarray(t.image).astype(np.float64)
        assert t.image.mode == "RGB" and t.image.size == p.image.size
        for pos in range(4):
            r, c = divmod(pos, 2)
            sl = (slice(r * 28, (r + 1) * 28), slice(c * 28, (c + 1) * 28))
            ink, cell = gray[sl], rgb[sl]
            bg = ink == 0  # background pixels show exactly the cell's colour
            assert bg.any() and np.allclose(cell[bg], np.rint(colours[pos]), atol=0.5)
            # ink stays legible: white strokes blended over the tint, never darker than the grey image
            expected = ink[..., None] + colours[pos] * (1 - ink[..., None] / 255)
            assert np.abs(cell - expected).max() <= 1.0  # two roundings to uint8
    # default off: grey images, identical to before
    assert DigitsVQAConfig().cell_tint == 0.0
    with pytest.raises(ConfigError):
        DigitsVQAConfig(cell_tint=1.0)
    with pytest.raises(ConfigError):
        DigitsVQAConfig(cell_tint=-0.1)


# ---------------------------------------------------------------- distributions


def test_question_types_balanced(test_samples):
    counts = Counter(s.qtype for s in test_samples)
    assert set(counts) == set(dg.QUESTION_TYPES)
    expected = len(test_samples) / len(dg.QUESTION_TYPES)
    for t, c in counts.items():
        assert 0.7 * expected <= c <= 1.3 * expected, (t, c)


def test_answers_not_degenerate(test_samples):
    turns = [(q, a) for s in test_samples for q, a in s.turns]
    for kind in ("larger", "smaller", "even", "odd"):
        answers = [a for q, a in turns if kind in q]
        assert len(answers) > 50
        assert 0.3 <= answers.count("yes") / len(answers) <= 0.7, kind
    digit_answers = Counter(a for q, a in turns if "position" in q and not q.startswith("Is"))
    assert set(digit_answers) == {str(d) for d in range(10)}
    counts = Counter(a for q, a in turns if q.startswith("How many"))
    assert counts["0"] / sum(counts.values()) < 0.6 and counts["1"] > 0 and counts["2"] > 0
    overall = Counter(s.answer for s in test_samples)
    assert overall.most_common(1)[0][1] / len(test_samples) < 0.2


def test_turns_distinct():
    cfg = DigitsVQAConfig(turns_per_sample=6)
    for s in generate_samples("train", 50, cfg):
        assert len(s.turns) == 6
        qs = [q for q, _ in s.turns]
        assert len(set(qs)) == 6
        # never both parity phrasings in one image (one would give the other away)
        assert sum("sum of all digits even" in q or "sum of all digits odd" in q for q in qs) <= 1


# ---------------------------------------------------------------- files and text


def test_jsonl_round_trip(tmp_path):
    samples = generate_samples("test", 6, CFG)
    path = write_jsonl(samples, tmp_path / "out", "test")
    assert path == tmp_path / "out" / "test.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6
    for line, s in zip(lines, samples):
        rec = json.loads(line)
        assert list(rec) == ["image", "question", "answer"]
        assert not rec["image"].startswith("/")
        assert (rec["question"], rec["answer"]) == (s.question, s.answer)
        with Image.open(path.parent / rec["image"]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(s.image))
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    # rewriting is idempotent
    assert write_jsonl(samples, tmp_path / "out", "test").read_text() == path.read_text()


def test_corpus_covers_everything(test_samples):
    for cfg, samples in ((CFG, test_samples), (DigitsVQAConfig(rows=1, cols=3), None)):
        text = set(corpus(cfg))
        samples = samples or generate_samples("train", 200, cfg)
        for s in samples:
            for q, a in s.turns:
                assert q in text and a in text, (q, a)
    assert {"yes", "no", "0", "36"} <= set(corpus())


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rows": 0},
        {"digit_px": 30},
        {"question_types": ("digit", "colour")},
        {"question_types": ()},
        {"rows": 1, "cols": 1},  # compare needs two digits
        {"rows": 4, "cols": 4, "position_style": "name"},
        {"test_fraction": 1.0},
        {"intensity_range": (0.0, 1.0)},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        DigitsVQAConfig(**kwargs)


def test_single_digit_and_big_grid_work():
    one = DigitsVQAConfig(rows=1, cols=1, question_types=("digit", "parity"))
    s = generate_samples("test", 3, one)[0]
    assert s.image.size == (28, 28) and len(s.labels) == 1
    big = DigitsVQAConfig(rows=4, cols=4)  # 16 visual tokens, numbered positions only
    for s in generate_samples("test", 20, big):
        assert "top" not in " ".join(q for q, _ in s.turns)
