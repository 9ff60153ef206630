"""The sparse-relevance needle VQA task: determinism, ground truth, JSONL round trip, importance enrichment."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tlq.config import ConfigError
from tlq.data.digits import write_jsonl
from tlq.data.needle import FRAME_COLOURS, PREAMBLE, QUESTION_TEMPLATES, NeedleVQAConfig, generate_samples
from tlq.data.records import read_jsonl, relevant_visual_tokens
from tlq.importance import ImportanceConfig, run_importance
from tlq.importance.visualize import _enrichment
from tlq.models.base import grid_boxes


def test_samples_are_deterministic_and_prefix_stable():
    a = generate_samples("val", 6)
    b = generate_samples("val", 3)
    c = generate_samples("val", 3, start=3)
    for x, y in zip(a, b + c):
        assert x.question == y.question and x.answer == y.answer and x.extra == y.extra
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(generate_samples("test", 1)[0].image))


def test_ground_truth_token_holds_the_named_frame_and_the_answer():
    cfg = NeedleVQAConfig()
    for s in generate_samples("test", 20, cfg):
        (target,) = s.extra["relevant_tokens"]
        assert s.extra["token_grid"] == [cfg.rows, cfg.cols]
        colour = s.extra["frame"]
        assert colour in s.question
        assert s.labels[target] == int(s.answer)  # the answer is the digit under the target token
        r, c = divmod(target, cfg.cols)
        px = np.asarray(s.image)[r * cfg.cell_px, c * cfg.cell_px + cfg.cell_px // 2]  # top edge of the frame
        assert tuple(px) == FRAME_COLOURS[colour]
        # exactly num_framed frames, each a different colour, one of them the target
        assert sum(m > 0 for m in s.marks) == cfg.num_framed
        assert s.marks[target] == 1 + list(FRAME_COLOURS).index(colour)
        assert sum(lab >= 0 for lab in s.labels) == cfg.num_framed + cfg.num_plain


def test_relevant_tokens_are_sparse_and_answers_cover_all_digits():
    samples = generate_samples("calibration", 128)
    share = np.mean([len(s.extra["relevant_tokens"]) / 64 for s in samples])
    assert share <= 0.2  # the validity bar: relevant visual tokens at most 20% of the visual tokens
    assert {s.answer for s in samples} == {str(d) for d in range(10)}
    # the instructions in front of the question are long: the answer never needs them
    assert min(len(s.question.split()) for s in samples) >= 15


def test_a_fixed_cue_always_asks_that_colour_among_look_alikes():
    cfg = NeedleVQAConfig(asked_colours=("red",))
    for s in generate_samples("val", 30, cfg):
        assert s.extra["frame"] == "red" and "red" in s.question and len(s.turns) == 1
        assert sum(m > 0 for m in s.marks) == cfg.num_framed  # the other frames stay, as distractors
    # the default (every colour may be asked) is unchanged by the option's existence
    assert generate_samples("val", 1)[0].extra == generate_samples("val", 1, NeedleVQAConfig())[0].extra


def test_overprinted_targets_blend_a_second_digit_and_keep_the_dominant_answer():
    plain_cfg = NeedleVQAConfig(asked_colours=("red",), noise_std=0.0)
    cfg = NeedleVQAConfig(asked_colours=("red",), noise_std=0.0, target_blend=(0.55, 0.7))
    plain, blended = generate_samples("val", 12, plain_cfg), generate_samples("val", 12, cfg)
    for p, b in zip(plain, blended):
        assert 0.55 <= b.extra["blend"] <= 0.7 and "blend" not in p.extra
        assert b.answer == p.answer and b.labels == p.labels  # the answer is the dominant digit
        (target,) = b.extra["relevant_tokens"]
        r, c = divmod(target, cfg.cols)
        cell = (slice(r * cfg.cell_px, (r + 1) * cfg.cell_px), slice(c * cfg.cell_px, (c + 1) * cfg.cell_px))
        assert not np.array_equal(np.asarray(b.image)[cell], np.asarray(p.image)[cell])  # a second digit is printed over it
    # the full-weight default draws nothing extra: the samples equal a config without overprinting
    same = generate_samples("val", 2, NeedleVQAConfig(target_blend=(1.0, 1.0)))
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(same, generate_samples("val", 2)))


def test_config_is_checked():
    with pytest.raises(ConfigError, match="do not fit"):
        NeedleVQAConfig(rows=2, cols=2)
    with pytest.raises(ConfigError, match="num_framed"):
        NeedleVQAConfig(num_framed=5)
    with pytest.raises(ConfigError, match="asked_colours"):
        NeedleVQAConfig(asked_colours=("purple",))
    with pytest.raises(ConfigError, match="target_blend"):
        NeedleVQAConfig(target_blend=(0.3, 1.0))


def test_jsonl_keeps_ground_truth_that_calibration_ignores(tmp_path):
    path = write_jsonl(generate_samples("val", 3), tmp_path, "val")
    line = json.loads(path.read_text().splitlines()[0])
    assert line["relevant_tokens"] and line["token_grid"] == [8, 8]
    recs = read_jsonl(path)
    target = line["relevant_tokens"][0]
    mask = relevant_visual_tokens(recs[0], grid_boxes(8, 8))
    assert mask is not None and sum(mask) == 1 and mask[target]
    # tokens of half the cell's side (LLaVA-OneVision's base tile at 14 px patches): the 4 inside the cell
    fine = relevant_visual_tokens(recs[0], grid_boxes(16, 16))
    r, c = divmod(target, 8)
    assert sorted(i for i, t in enumerate(fine) if t) == sorted((2 * r + dr) * 16 + 2 * c + dc for dr in (0, 1) for dc in (0, 1))
    # twice the side: the one token holding the cell; a row separator (no box) never counts
    coarse = relevant_visual_tokens(recs[0], [*grid_boxes(4, 4), None])
    assert [i for i, t in enumerate(coarse) if t] == [(r // 2) * 4 + c // 2]
    assert relevant_visual_tokens(recs[0], None) is None  # the model's layout unknown: no comparison
    assert recs[0].messages[0]["content"][1]["text"] == line["question"]


def test_enrichment_is_mass_share_over_token_share():
    visual = torch.tensor([False, True, True, True, True, False])
    target = torch.tensor([False, False, True, False, False, False])
    x = torch.tensor([[9.0, 1.0, 1.0, 1.0, 1.0, 9.0], [0.0, 0.0, 2.0, 1.0, 1.0, 5.0]])
    e = _enrichment(x, visual, target)
    assert e[0] == pytest.approx(1.0)  # uniform over visual tokens: no enrichment, text mass ignored
    assert e[1] == pytest.approx((2 / 4) / (1 / 4))


@pytest.mark.parametrize(
    ("family", "share"),
    # Qwen2-VL: a 28 px merged token per 28 px cell, 1 of 64. The tiny LLaVA-OneVision: a 56 px tile of
    # 4x4 tokens of 56 px each (2x2 cells), as the base tile and as the one anyres tile + 4 row
    # separators: the token holding the target in each, 2 of 36.
    [("qwen2_vl", 1 / 64), ("llava_onevision", 2 / 36)],
)
def test_importance_report_measures_target_enrichment(tiny_vlm_dir, tmp_path, family, share):
    model = tiny_vlm_dir(family)
    calib = write_jsonl(generate_samples("calibration", 2), tmp_path / "data", "calib")
    summary = run_importance(model, calib, tmp_path / "imp", num_samples=2, cfg=ImportanceConfig(), device="cpu")
    te = summary["target_enrichment"]
    assert te["num_samples"] == 2 and te["target_share_of_visual_tokens"] == pytest.approx(share)
    assert len(te["weight_per_layer"]) == summary["num_layers"]
    assert all(v is None or v >= 0 for v in te["grad2_per_layer"])
    assert all(s["target_tokens"] and s["target_enrichment_per_layer"] for s in summary["samples"])
    assert (tmp_path / "imp" / "sample_000.png").is_file()


def test_generated_preambles_are_varied_hint_free_and_leave_the_images_alone():
    fixed = NeedleVQAConfig(asked_colours=("red",))
    varied = NeedleVQAConfig(asked_colours=("red",), preamble="generated", preamble_range=(3, 6))
    a, b = generate_samples("val", 20, fixed), generate_samples("val", 20, varied)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) and x.answer == y.answer for x, y in zip(a, b))
    words = {w.strip(".,").lower() for s in b for w in s.question.split()}
    assert len(words) > 2 * len({w.strip(".,").lower() for s in a for w in s.question.split()})
    for s in b:
        (asked,) = [t.format(c="red") for t in QUESTION_TEMPLATES if s.question.endswith(t.format(c="red"))]
        preamble = s.question[: -len(asked)].strip()
        assert preamble.count(".") >= 3 and not any(sentence + "." in PREAMBLE for sentence in preamble.rstrip(".").split(". "))
        assert not set(preamble.lower().replace(".", " ").replace(",", " ").split()) & {*FRAME_COLOURS, *map(str, range(10))}
    assert [s.question for s in generate_samples("val", 5, varied)] == [s.question for s in b[:5]]  # deterministic
    with pytest.raises(ConfigError, match="preamble must be one of"):
        NeedleVQAConfig(preamble="lorem")


def test_training_text_loss_predicts_the_prompt_words_only(tiny_vlm_dir, script):
    """scripts/train_digits.py --lm-weight: the next-token loss covers the user's text tokens, never the
    image's placeholder tokens, the padding or the answer (the answer loss has those)."""
    from tlq.pipeline import load_model

    train = script("train_digits")
    _adapter, model, processor, *_ = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    batcher = train.Batcher(processor, "qwen2_vl")
    cfg = NeedleVQAConfig(rows=2, cols=2, num_framed=1, num_plain=1, num_fragments=0, asked_colours=("red",), preamble="generated")
    enc = batcher.train_batch(generate_samples("train", 2, cfg))
    vocab = model.config.text_config.vocab_size
    # logits that put all mass on the true next token wherever the loss looks: zero loss iff the mask is right
    target = enc["input_ids"][:, 1:]
    text = enc["attention_mask"][:, 1:].bool() & (target != processor.image_token_id) & (enc["labels"][:, 1:] == -100)
    logits = torch.zeros(*enc["input_ids"].shape, vocab)
    logits[:, :-1].scatter_(-1, target[..., None], 30.0)
    assert float(train.text_lm_loss(logits, enc, batcher)) < 1e-6
    logits[:, :-1][text] = 0.0  # uniform exactly where the text is: the loss is log(vocab)
    assert abs(float(train.text_lm_loss(logits, enc, batcher)) - np.log(vocab)) < 1e-4
    assert int(text.sum()) > 20 and int((target == processor.image_token_id).sum()) > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_growing_the_decoder_keeps_the_function_and_reloads(family, tiny_vlm_dir, script, tmp_path):
    """scripts/train_digits.py --grow-layers: new layers are spread between the old ones as exact
    identities (residual outputs zeroed), so the deeper model starts where the trained one was; the
    config follows, so the saved model reloads with every layer (both families the script trains)."""
    from transformers import AutoModelForImageTextToText

    train = script("train_digits")
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir(family), dtype=torch.float32).eval()
    old = list(train.decoder_layers(model))
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    train.grow_decoder(model, 2 * len(old) + 1)
    grown = train.decoder_layers(model)
    assert len(grown) == 2 * len(old) + 1 == model.config.text_config.num_hidden_layers
    assert [layer.self_attn.layer_idx for layer in grown] == list(range(len(grown)))
    kept = [i for i, layer in enumerate(grown) if any(layer is o for o in old)]
    assert len(kept) == len(old) and kept[0] == 0
    for i, layer in enumerate(grown):
        if i not in kept:
            assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
            assert layer.self_attn.q_proj.weight.any()  # a copy of its neighbour's reads, not blank
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(again(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    with pytest.raises(SystemExit, match="already has"):
        train.grow_decoder(model, 2)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_widening_the_mlps_keeps_the_function_and_reloads(family, tiny_vlm_dir, script, tmp_path):
    """scripts/train_digits.py --grow-intermediate: every decoder MLP gets the new width, the new neurons
    read like old ones and write nothing (exact), the config follows so the saved model reloads at the new
    width, and a backward pass gives the new neurons' output columns a gradient (training can grow them)."""
    from transformers import AutoModelForImageTextToText

    train = script("train_digits")
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir(family), dtype=torch.float32).eval()
    old = model.config.text_config.intermediate_size
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    wide = old + 128 * 3
    train.widen_mlps(model, wide)
    for layer in train.decoder_layers(model):
        mlp = layer.mlp
        assert mlp.gate_proj.weight.shape[0] == mlp.up_proj.weight.shape[0] == mlp.down_proj.weight.shape[1] == wide
        assert not mlp.down_proj.weight[:, old:].any() and mlp.down_proj.weight[:, :old].any()
        torch.testing.assert_close(mlp.up_proj.weight[old : 2 * old], mlp.up_proj.weight[:old], rtol=0, atol=0)
    after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    after.logsumexp(-1).sum().backward()
    assert train.decoder_layers(model)[0].mlp.down_proj.weight.grad[:, old:].abs().sum() > 0
    model.zero_grad()
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert again.config.text_config.intermediate_size == wide
    torch.testing.assert_close(again(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    with pytest.raises(SystemExit, match="multiple of 128"):
        train.widen_mlps(model, wide + 64)
    with pytest.raises(SystemExit, match="must exceed"):
        train.widen_mlps(model, old)


def test_split_growth_shares_each_layers_outputs_among_its_copies(tiny_vlm_dir, script):
    """--grow-init split: an original layer and its copies each hold 1/k of its output weights (so every
    layer carries a share of the work from the start) and the same reads; the function stays close to the
    trained one (k small steps along one update: closer than stacking k full copies), not exact."""
    from transformers import AutoModelForImageTextToText

    train = script("train_digits")
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir("qwen2_vl"), dtype=torch.float32).eval()
    old = [copy.deepcopy(layer) for layer in train.decoder_layers(model)]
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    stacked = copy.deepcopy(model)  # the naive deepening: k full copies, each adding the whole update
    train.grow_decoder(stacked, 3 * len(old), init="identity")
    with torch.no_grad():
        for i, layer in enumerate(train.decoder_layers(stacked)):
            layer.self_attn.o_proj.weight.copy_(old[i // 3].self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(old[i // 3].mlp.down_proj.weight)
    naive = (stacked(input_ids=ids).logits - before).abs().max().item()
    train.grow_decoder(model, 3 * len(old), init="split")
    grown = train.decoder_layers(model)
    assert len(grown) == 3 * len(old) and [layer.self_attn.layer_idx for layer in grown] == list(range(len(grown)))
    for i, layer in enumerate(grown):
        src = old[i // 3]
        torch.testing.assert_close(layer.self_attn.o_proj.weight, src.self_attn.o_proj.weight / 3)
        torch.testing.assert_close(layer.mlp.down_proj.weight, src.mlp.down_proj.weight / 3)
        torch.testing.assert_close(layer.self_attn.q_proj.weight, src.self_attn.q_proj.weight)
    after = model(input_ids=ids).logits
    drift = (after - before).abs().max().item()
    assert 0 < drift < 0.8 * naive
    with pytest.raises(SystemExit, match="--grow-init"):
        train.grow_decoder(model, 64, init="zeros")


def test_sum_questions_add_the_two_named_frames_digits():
    """question="sum": both named colours are framed in every image, the answer is the last digit of the
    sum of their (dominant) digits, and both cells are the ground truth; the third frame is a look-alike."""
    cfg = NeedleVQAConfig(asked_colours=("red", "blue"), question="sum", target_blend=(0.5, 1.0))
    samples = generate_samples("val", 40, cfg)
    colour_ids = {name: 1 + i for i, name in enumerate(FRAME_COLOURS)}
    for s in samples:
        red, blue = (s.marks.index(colour_ids[c]) for c in ("red", "blue"))
        assert s.answer == str((s.labels[red] + s.labels[blue]) % 10)
        assert s.extra["relevant_tokens"] == sorted((red, blue)) and len(s.turns) == 1
        assert "red" in s.question and "blue" in s.question and sum(m > 0 for m in s.marks) == cfg.num_framed
    assert len({s.answer for s in samples}) >= 8
    with pytest.raises(ConfigError, match="two frames"):
        NeedleVQAConfig(asked_colours=("red",), question="sum")
    with pytest.raises(ConfigError, match="question must be"):
        NeedleVQAConfig(question="difference")


def test_count_questions_answer_how_many_cells_hold_the_named_digit():
    """question="count": the answer is the number of cells whose digit is the one the question names,
    those cells are the ground truth, every count of count_range occurs, and the default sets are unchanged."""
    cfg = NeedleVQAConfig(question="count", count_range=(1, 4))
    samples = generate_samples("val", 60, cfg)
    for s in samples:
        digit = s.extra["digit"]
        held = [cell for cell, lab in enumerate(s.labels) if lab == digit]
        assert s.extra["relevant_tokens"] == held and s.answer == str(len(held)) and f" {digit}" in s.question
        assert sum(lab >= 0 for lab in s.labels) == cfg.num_framed + cfg.num_plain
        assert sum(m > 0 for m in s.marks) == cfg.num_framed  # frames stay, as clutter
    assert {s.answer for s in samples} == {"1", "2", "3", "4"}
    assert len({s.extra["digit"] for s in samples}) == 10
    assert max(len(s.extra["relevant_tokens"]) for s in samples) / 64 <= 0.2
    plain = generate_samples("val", 2)  # a count_range on a read config draws nothing
    again = generate_samples("val", 2, NeedleVQAConfig(count_range=(2, 3)))
    assert [x.question for x in plain] == [y.question for y in again]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(plain, again))
    with pytest.raises(ConfigError, match="count_range"):
        NeedleVQAConfig(question="count", count_range=(0, 3))
    fixed = generate_samples("val", 10, NeedleVQAConfig(question="count", count_digits=(7,)))
    assert {s.extra["digit"] for s in fixed} == {7} and all(s.answer == str(s.labels.count(7)) for s in fixed)
    with pytest.raises(ConfigError, match="count_digits"):
        NeedleVQAConfig(question="count", count_digits=(10,))
    NeedleVQAConfig(num_plain=0, num_framed=1)  # count_range is only checked when counting


def test_blended_counts_overprint_every_digit_both_ways_and_keep_the_count():
    """A count with target_blend: the copies get another digit printed over them and every other digit
    gets the named one (at weight 1 - a), so each cell is in doubt; labels and answer stay the dominant ones."""
    from tlq.data.needle import _overprints

    cfg = NeedleVQAConfig(question="count", count_digits=(7,), target_blend=(0.55, 0.7))
    cell_label = {3: 7, 9: 2, 20: 7, 41: 5}
    printed = _overprints({9: "red"}, cell_label, cfg, np.random.default_rng(0), scan=lambda label: label, counted=7)
    assert sorted(printed) == sorted(cell_label)  # every digit cell, copies or not, framed or not
    for cell, (other, weight, digit) in printed.items():
        assert digit == other  # scan=identity here, so the scan id is the digit
        assert 0.55 <= weight <= 0.7
        assert other == 7 if cell_label[cell] != 7 else other != 7
    base = NeedleVQAConfig(question="count", count_digits=(7,))
    blended = NeedleVQAConfig(question="count", count_digits=(7,), target_blend=(0.55, 0.7))
    for p, b in zip(generate_samples("val", 8, base), generate_samples("val", 8, blended)):
        assert b.answer == p.answer and b.labels == p.labels and b.extra["relevant_tokens"] == p.extra["relevant_tokens"]
        assert len(b.extra["blend"]) == len(b.extra["relevant_tokens"]) and "blend" not in p.extra


def test_blend_cells_overprints_only_that_many_cells_per_page():
    """blend_cells=k: k of the page's digit cells, drawn per page, are overprinted and the rest stay clean
    (their own weight reported as 1.0), so the doubt is a share of the pages, not all of them."""
    from tlq.data.needle import _overprints

    cfg = NeedleVQAConfig(question="count", count_digits=(7,), target_blend=(0.55, 0.7), blend_cells=2)
    cell_label = {3: 7, 9: 2, 20: 7, 41: 5, 50: 1}
    chosen = set()
    for seed in range(12):
        printed = _overprints({}, cell_label, cfg, np.random.default_rng(seed), scan=lambda label: label, counted=7)
        assert len(printed) == 2 and set(printed) <= set(cell_label)
        chosen |= set(printed)
    assert chosen == set(cell_label)  # drawn per page, not a fixed pair
    base = NeedleVQAConfig(question="count", count_digits=(7,))
    for p, b in zip(generate_samples("val", 8, base), generate_samples("val", 8, cfg)):
        assert b.answer == p.answer and b.labels == p.labels
        assert len(b.extra["blend"]) == len(p.extra["relevant_tokens"]) and all(0.55 <= w <= 0.7 or w == 1.0 for w in b.extra["blend"])
    for bad in (0, "3"):
        with pytest.raises(ConfigError, match="blend_cells"):
            NeedleVQAConfig(blend_cells=bad)


def test_sampled_blend_labels_draw_each_cell_by_its_ink_and_leave_the_image_alone():
    """blend_label='sampled': an overprinted cell keeps its own digit with probability its weight (so a
    0.5 overprint is a coin flip and a weight of 1 never flips), from a stream of its own: the pixels are
    those of the dominant labels, and a count still answers how many cells now hold the digit."""
    from tlq.data.needle import _sampled_labels

    rng = np.random.default_rng(0)
    flips = sum(_sampled_labels({1: 7}, {1: (0, 0.5, 3)}, rng)[1] == 3 for _ in range(2000))
    assert 900 < flips < 1100
    assert all(_sampled_labels({1: 7, 2: 4}, {1: (0, 1.0, 3)}, rng) == {1: 7, 2: 4} for _ in range(200))
    opts = dict(question="count", count_digits=(7,), target_blend=(0.5, 0.6), blend_cells=3)
    dominant = generate_samples("val", 30, NeedleVQAConfig(**opts))
    sampled = generate_samples("val", 30, NeedleVQAConfig(**opts, blend_label="sampled"))
    moved = 0
    for d, s in zip(dominant, sampled):
        assert np.array_equal(np.asarray(d.image), np.asarray(s.image)) and d.labels == s.labels
        assert s.answer == str(len(s.extra["relevant_tokens"]))
        moved += s.answer != d.answer
    assert 5 <= moved <= 25  # three cells near a coin flip on every page: many answers move, not all
    reads = generate_samples("val", 30, NeedleVQAConfig(asked_colours=("red",), target_blend=(0.5, 0.5), blend_label="sampled"))
    plain = generate_samples("val", 30, NeedleVQAConfig(asked_colours=("red",), target_blend=(0.5, 0.5)))
    assert 5 <= sum(r.answer != p.answer for r, p in zip(reads, plain)) <= 25


def test_blend_pages_leaves_a_share_of_pages_clean_and_every_other_pixel_alone():
    """blend_pages=p: about a share p of the pages keep their blended cell; a clean page is the blended
    page without the overprint (same cells, scans, noise), and its answer is the dominant one."""
    opts = dict(question="count", count_digits=(7,), target_blend=(0.5, 0.6), blend_cells=1, blend_label="sampled")
    every = generate_samples("val", 120, NeedleVQAConfig(**opts))
    some = generate_samples("val", 120, NeedleVQAConfig(**opts, blend_pages=0.35))
    plain = generate_samples("val", 120, NeedleVQAConfig(question="count", count_digits=(7,)))
    blended = 0
    for e, s, p in zip(every, some, plain):
        img_e, img_s = np.asarray(e.image, np.int16), np.asarray(s.image, np.int16)
        assert s.labels == e.labels == p.labels
        if "blend" in s.extra:
            blended += 1
            assert np.array_equal(img_e, img_s) and s.answer == e.answer
            continue
        assert s.answer == p.answer  # clean: the dominant count, nothing sampled
        (cell,) = [c for c, w in zip(e.extra["relevant_tokens"], e.extra["blend"]) if w < 1.0] or [None]
        differs = np.argwhere(np.abs(img_e - img_s).max(axis=2) > 0)
        assert len(differs) > 0  # the overprint was removed ...
        rows, cols = set(differs[:, 0] // 28), set(differs[:, 1] // 28)
        assert len(rows) == 1 and len(cols) == 1  # ... from one cell only
        if cell is not None:
            assert (rows.pop(), cols.pop()) == divmod(cell, 8)
    assert 25 <= blended <= 60  # 35% of 120 = 42
    for bad in (0.0, 1.5, "half"):
        with pytest.raises(ConfigError, match="blend_pages"):
            NeedleVQAConfig(blend_pages=bad)


def test_sampled_below_draws_only_near_ties_and_keeps_clear_overprints_dominant():
    """sampled_below=b: a cell below weight b is a draw, a cell at or above it keeps its own digit, so
    fewer answers move than under the plain sampled rule (the default, b = 1.0), and none of the pixels."""
    from tlq.data.needle import _sampled_labels

    rng = np.random.default_rng(0)
    near = sum(_sampled_labels({1: 7}, {1: (0, 0.52, 3)}, rng, below=0.55)[1] == 3 for _ in range(2000))
    assert 850 < near < 1070  # 48% flips
    assert all(_sampled_labels({1: 7}, {1: (0, 0.56, 3)}, rng, below=0.55) == {1: 7} for _ in range(500))
    opts = dict(question="count", count_digits=(7,), target_blend=(0.5, 1.0), blend_cells=3, blend_label="sampled")
    every = generate_samples("val", 60, NeedleVQAConfig(**opts))
    near_only = generate_samples("val", 60, NeedleVQAConfig(**opts, sampled_below=0.6))
    dominant = generate_samples("val", 60, NeedleVQAConfig(**{**opts, "blend_label": "dominant"}))
    moved_all = sum(a.answer != d.answer for a, d in zip(every, dominant))
    moved_near = sum(a.answer != d.answer for a, d in zip(near_only, dominant))
    assert 0 < moved_near < moved_all
    for a, d in zip(near_only, dominant):
        assert np.array_equal(np.asarray(a.image), np.asarray(d.image))
    with pytest.raises(ConfigError, match="only applies to blend_label='sampled'"):
        NeedleVQAConfig(sampled_below=0.6)
    for bad in (0.5, 1.2, "x"):
        with pytest.raises(ConfigError, match="sampled_below must be"):
            NeedleVQAConfig(blend_label="sampled", blend_cells=3, question="count", target_blend=(0.5, 1.0), sampled_below=bad)


def test_blend_label_is_checked_where_it_is_configured():
    with pytest.raises(ConfigError, match="blend_label must be one of"):
        NeedleVQAConfig(blend_label="soft")
    with pytest.raises(ConfigError, match="one-digit answer"):  # 12 blended cells could make a count of 12
        NeedleVQAConfig(question="count", target_blend=(0.5, 1.0), blend_label="sampled")
    NeedleVQAConfig(question="count", target_blend=(0.5, 1.0), blend_label="sampled", blend_cells=3)


def test_training_lineage_lists_every_stage_from_random_weights(script):
    """A model trained through --init-from stages records all of their commands in order, so it can be
    rebuilt: a parent that predates the record contributes its own command, a later one its full list."""
    train = script("train_digits")
    assert train.lineage(None, "python a") == ["python a"]
    assert train.lineage({"command": "python a"}, "python b") == ["python a", "python b"]
    assert train.lineage({"command": "python b", "lineage": ["python a", "python b"]}, "python c") == ["python a", "python b", "python c"]


@pytest.mark.parametrize("family, visual_tokens", [("qwen2_vl", 64), ("llava_onevision", 64 + 64 + 8)])
def test_needle_pages_give_each_model_one_token_per_cell(family, visual_tokens, script, tmp_path):
    """The image size the training script builds each family with: Qwen2-VL merges each 28-px cell into one
    token; LLaVA-OneVision's 112-px base tile has one patch per cell, and its anyres tile adds a second
    view of 64 patches plus one newline per row."""
    from transformers import AutoProcessor

    from tlq.data.needle import NeedleVQAConfig, generate_samples
    from tlq.models.tiny import make_tiny_vlm

    train = script("train_digits")
    out = make_tiny_vlm(family, tmp_path / family, num_layers=1, image_size=train.NEEDLE_IMAGE_SIZE[family])
    processor = AutoProcessor.from_pretrained(out)
    sample = generate_samples("val", 1, NeedleVQAConfig())[0]
    ids = train.Batcher(processor, family).prompt(sample.image, sample.question)["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == visual_tokens
