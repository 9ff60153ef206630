"""Calibration JSONL parsing and encoding: masks, subsampling, truncation, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlq.api import load_model
from tlq.config import ConfigError
from tlq.data.calibration import build_sample, load_calibration
from tlq.data.records import choose, read_jsonl


@pytest.fixture(scope="module")
def qwen(tiny_vlm_dir):
    adapter, model, processor, *_ = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    return adapter, model, processor


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_answer_mask_covers_exactly_the_answer(qwen, tiny_calib_jsonl):
    adapter, model, processor = qwen
    records = read_jsonl(tiny_calib_jsonl)
    for rec in records:
        sample = build_sample(rec, processor, adapter, model, max_seq_len=4096)
        answer_ids = sample.inputs["input_ids"][0][sample.answer_mask]
        text = processor.tokenizer.decode(answer_ids)
        expected = rec.messages[-1]["content"][0]["text"]
        assert text == expected + "<|im_end|>", text  # the template's trailing newline is not an answer token
        # the answer is the last thing in the sequence, after every visual token
        assert sample.answer_mask.nonzero().min() > sample.visual_mask.nonzero().max()


def test_visual_mask_counts_merged_patches(qwen, tiny_calib_jsonl):
    adapter, model, processor = qwen
    records = read_jsonl(tiny_calib_jsonl)
    sample = build_sample(records[0], processor, adapter, model, max_seq_len=4096)
    grid = sample.inputs["image_grid_thw"][0]
    assert int(sample.visual_mask.sum()) == int(grid.prod()) // 4  # 2x2 merge


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_visual_mask_other_families(tiny_vlm_dir, tiny_calib_jsonl, family):
    adapter, model, processor, *_ = load_model(tiny_vlm_dir(family), device="cpu")
    sample = build_sample(read_jsonl(tiny_calib_jsonl)[0], processor, adapter, model, max_seq_len=4096)
    image_token = model.config.image_token_id
    assert int(sample.visual_mask.sum()) == int((sample.inputs["input_ids"] == image_token).sum()) > 0
    assert sample.answer_mask.any()


def test_messages_format_masks_every_assistant_turn(qwen, tiny_calib_jsonl, tmp_path):
    adapter, model, processor = qwen
    image = json.loads(tiny_calib_jsonl.read_text().splitlines()[0])["image"]
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "first?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "alpha"}]},
        {"role": "user", "content": [{"type": "text", "text": "second?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "beta"}]},
    ]
    path = _write(tmp_path, [json.dumps({"image": str(tiny_calib_jsonl.parent / image), "messages": msgs})])
    sample = build_sample(read_jsonl(path)[0], processor, adapter, model, max_seq_len=4096)
    text = processor.tokenizer.decode(sample.inputs["input_ids"][0][sample.answer_mask])
    assert "alpha" in text and "beta" in text and "second" not in text


def test_choose_is_seeded_and_keeps_order(tiny_calib_jsonl):
    records = read_jsonl(tiny_calib_jsonl)
    a, b = choose(records, 3, seed=1), choose(records, 3, seed=1)
    assert [r.line for r in a] == [r.line for r in b] == sorted(r.line for r in a)
    assert len(choose(records, 100, seed=0)) == len(records)
    with pytest.raises(ConfigError, match="num-samples"):
        choose(records, 0, seed=0)


def test_truncation_keeps_visual_tokens(qwen, tiny_calib_jsonl):
    adapter, model, processor = qwen
    full = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=1, max_seq_len=4096, seed=0)[0]
    cut = full.visual_mask.nonzero().max().item() + 2
    short = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=1, max_seq_len=cut, seed=0)[0]
    assert short.seq_len == cut and short.visual_mask.sum() == full.visual_mask.sum()
    with pytest.raises(ConfigError, match="max-seq-len"):
        load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=1, max_seq_len=3, seed=0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "nope.png", "question": "q", "answer": "a"}', "does not exist"),
        ('{"question": "q"}', "missing key"),
        ("{not json", "invalid JSON"),
        ('["a list"]', "JSON object"),
        ('{"messages": [{"content": "no role"}]}', "messages"),
    ],
)
def test_bad_lines_name_the_line_and_problem(tmp_path, line, message):
    path = _write(tmp_path, ['{"question": "fine", "answer": "a"}', line])
    with pytest.raises(ConfigError, match=message) as info:
        read_jsonl(path)
    assert ":2:" in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(ConfigError, match="no samples"):
        read_jsonl(_write(tmp_path, [""]))


def test_default_cap_is_the_models_context_length(qwen, tiny_calib_jsonl, monkeypatch):
    """No --max-seq-len: text is cut at the decoder's context window, and the sample keeps its full length."""
    adapter, model, processor = qwen
    full = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=1, max_seq_len=None, seed=0)[0]
    assert full.full_len == full.seq_len  # the tiny model's 4,096-token window holds it whole
    cut = full.visual_mask.nonzero().max().item() + 2
    monkeypatch.setattr(model.config.get_text_config(), "max_position_embeddings", cut)
    short = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=1, max_seq_len=None, seed=0)[0]
    assert short.seq_len == cut and short.full_len == full.seq_len


def test_llava_onevision_real_resolution_calibrates_with_default_options(tiny_vlm_dir, tmp_path):
    """SigLIP-384 geometry (27 x 27 patches per tile, anyres up to 2 x 2 tiles): one 448 x 460 image is
    ~3,700 tokens, which the old 2,048 default refused; the default now fits it and the report says so."""
    from tlq.api import quantize

    model_dir = tiny_vlm_dir("llava_onevision", image_size=378, grid_pinpoints=[[378, 378], [378, 756], [756, 378], [756, 756]])
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (460, 448, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"image": "photo.png", "question": "What is shown?", "answer": "noise"}) + "\n")
    report = quantize(model_dir, calib, tmp_path / "out", scheme="w4a16", method="gptq", num_samples=1, progress=False, resume=False)
    seq = report.sequences
    assert seq["max_seq_len"] == 4096 and seq["truncated_samples"] == 0
    assert 3000 < seq["longest_sample_tokens"] == report.num_tokens
    phases = report.phases  # the run's time by phase, each inside the whole
    assert {"load", "calibration data", "vision tower + layer-0 capture", "scale search", "statistics + solve (GPTQ/RTN, FP target)", "export"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= report.total_seconds
