"""The tiny local VLM checkpoints load with generic hub-free calls, run, generate, and build deterministically."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tlq.models.tiny import FAMILIES, QWEN3_5_FAMILIES, QWEN3_5_ROTARY_FRACTION, QWEN3_VL_FAMILIES, QWEN_FAMILIES as QWEN, build_tokenizer, interleaved_mrope_section, make_tiny_vlm, mrope_section

EXPECTED_CLASSES = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("Qwen3VLProcessor", "Qwen3VLMoeForConditionalGeneration"),
    "qwen3_5": ("Qwen3VLProcessor", "Qwen3_5ForConditionalGeneration"),
    "qwen3_5_moe": ("Qwen3VLProcessor", "Qwen3_5MoeForConditionalGeneration"),
    "llava_onevision": ("LlavaOnevisionProcessor", "LlavaOnevisionForConditionalGeneration"),
}
# visual tokens for a (W, H) image with the default build (Qwen: 14-px patches, 2x2 merge; Qwen3-VL: 16-px
# patches, 2x2 merge, images resized to multiples of 32;
# LLaVA-OV: 56-px SigLIP tiles of 4x4 patches, pinpoints [[56,56],[56,112],[112,56]], image_newline per row)
EXPECTED_IMAGE_TOKENS = {
    "qwen2_vl": {(56, 56): 4, (84, 56): 6, (56, 84): 6},
    "qwen2_5_vl": {(56, 56): 4, (84, 56): 6, (56, 84): 6},
    "qwen3_vl": {(56, 56): 4, (84, 56): 6, (56, 84): 6},
    "qwen3_vl_moe": {(56, 56): 4, (84, 56): 6, (56, 84): 6},
    "qwen3_5": {(56, 56): 4, (84, 56): 6, (56, 84): 6},
    "qwen3_5_moe": {(56, 56): 4, (84, 56): 6, (56, 84): 6},
    "llava_onevision": {(56, 56): 36, (84, 56): 44, (56, 84): 46},
}


def _messages(question: str, answer: str | None = None):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    return processor, model.eval(), info


def _num_visual_features(model, family, inputs) -> int:
    with torch.no_grad():
        if family in QWEN:
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            out = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
            )
    return sum(int(f.shape[0]) for f in out.pooler_output)


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_forward_generate(family, tiny_vlm_dir, tiny_calib_jsonl):
    path = tiny_vlm_dir(family)
    processor, model, info = _load(path)
    assert (type(processor).__name__, type(model).__name__) == EXPECTED_CLASSES[family]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    cfg = model.config

    # module layout the model adapters rely on
    layers = model.model.language_model.layers
    assert len(layers) == 2
    if family in QWEN:
        assert hasattr(model.model, "visual") and hasattr(model.model.visual, "merger")
        split = interleaved_mrope_section if family in QWEN3_VL_FAMILIES + QWEN3_5_FAMILIES else mrope_section
        rotary = int(128 // 4 * QWEN3_5_ROTARY_FRACTION) if family in QWEN3_5_FAMILIES else 128 // 4
        assert cfg.text_config.rope_parameters["mrope_section"] == split(rotary)
        if family in QWEN3_VL_FAMILIES:  # DeepStack fires: one merger per intermediate vision block
            assert cfg.vision_config.deepstack_visual_indexes == [0, 1]
            assert len(model.model.visual.deepstack_merger_list) == 2
    else:
        assert hasattr(model.model, "vision_tower") and hasattr(model.model, "multi_modal_projector")
        assert model.model.image_newline.shape == (128,)
    for name, mod in layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 128 == 0, name
    tok = processor.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids(processor.image_token)
    assert len(tok) <= model.get_input_embeddings().num_embeddings

    # chat template: user turn with an image, assistant answer, generation prompt
    full = processor.apply_chat_template(_messages("What color is the square?", "red"))
    prompt = processor.apply_chat_template(_messages("What color is the square?"), add_generation_prompt=True)
    assert full.startswith(prompt) and full[len(prompt) :].startswith("red")
    assert prompt.count(processor.image_token) == 1

    root = tiny_calib_jsonl.parent
    samples = [json.loads(line) for line in tiny_calib_jsonl.read_text().splitlines()]
    images = {}
    for s in samples:
        img = Image.open(root / s["image"]).convert("RGB")
        images.setdefault(img.size, img)
    assert set(images) == {(56, 56), (84, 56), (56, 84)}

    for size, img in images.items():
        inputs = processor(text=[prompt], images=[img], return_tensors="pt")
        ids = inputs["input_ids"]
        n_img = int((ids == cfg.image_token_id).sum())
        assert n_img == EXPECTED_IMAGE_TOKENS[family][size], (size, n_img)
        assert n_img == _num_visual_features(model, family, inputs)
        if family in QWEN:
            assert torch.equal(inputs["mm_token_type_ids"].bool(), ids == cfg.image_token_id)
            assert int(inputs["image_grid_thw"].prod(-1).sum()) == inputs["pixel_values"].shape[0]
        with torch.no_grad():
            out = model(**inputs)
        assert out.logits.shape == (1, ids.shape[1], cfg.text_config.vocab_size)
        assert torch.isfinite(out.logits).all()

    # batched (left-padded) forward with labels, then generation
    texts = [
        processor.apply_chat_template(_messages(s["question"], s["answer"])) for s in samples[:2]
    ] + [processor.apply_chat_template(_messages(samples[4]["question"], samples[4]["answer"]))]
    imgs = [images[(56, 56)], images[(56, 56)], images[(84, 56)]]
    batch = processor(text=texts, images=imgs, return_tensors="pt", padding=True)
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    assert torch.isfinite(loss)

    inputs = processor(text=[prompt], images=[images[(56, 56)]], return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 1 and inputs["input_ids"].shape[1] < gen.shape[1] <= inputs["input_ids"].shape[1] + 3
    assert isinstance(processor.batch_decode(gen[:, inputs["input_ids"].shape[1] :])[0], str)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_roundtrip(family, tiny_vlm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_vlm_dir(family))
    texts = [
        "What color is the circle?",
        "The answer is 42.",
        "  Leading spaces, trailing\ttabs\t and\nnew lines\n\n",
        "Unicode: héllo wörld, 日本語, emoji 🙂, math ∑x²",
        "",
    ]
    for s in texts:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    specials = ["<|im_start|>", "<|im_end|>"] + (["<image>"] if family == "llava_onevision" else ["<|image_pad|>"])
    for t in specials:
        assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]
    # an answer followed by EOS decodes exactly once special tokens are skipped
    ids = tok.encode("blue square", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "blue square"


def test_build_tokenizer_deterministic():
    a = build_tokenizer(["a tiny corpus", "of a few tiny lines"] * 3, "qwen2_vl", vocab_size=300)
    b = build_tokenizer(["a tiny corpus", "of a few tiny lines"] * 3, "qwen2_vl", vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 300
    with pytest.raises(ValueError):
        build_tokenizer(None, "qwen2_vl", vocab_size=200)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_deterministic(family, tiny_vlm_dir, tmp_path):
    ref = tiny_vlm_dir(family)
    again = make_tiny_vlm(family, tmp_path / "again")
    other = make_tiny_vlm(family, tmp_path / "other", seed=1)
    sd_ref, sd_again, sd_other = (load_file(str(p / "model.safetensors")) for p in (ref, again, other))
    assert sd_ref.keys() == sd_again.keys() == sd_other.keys()
    assert all(torch.equal(sd_ref[k], sd_again[k]) for k in sd_ref)
    assert any(not torch.equal(sd_ref[k], sd_other[k]) for k in sd_ref)
    for name in ("tokenizer.json", "config.json", "processor_config.json", "chat_template.jinja"):
        assert (ref / name).read_text() == (again / name).read_text(), name


def test_rng_untouched_and_bf16(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    path = make_tiny_vlm("qwen2_vl", tmp_path / "bf16", dtype=torch.bfloat16, num_layers=1)
    assert torch.equal(torch.rand(3), expected)
    sd = load_file(str(path / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in sd.values())


def test_validation(tmp_path):
    with pytest.raises(ValueError, match="multiples of 128"):
        make_tiny_vlm("qwen2_vl", tmp_path / "x", hidden_size=96)
    with pytest.raises(ValueError, match="multiples of 128"):
        make_tiny_vlm("llava_onevision", tmp_path / "x", intermediate_size=200)
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_vlm("llava", tmp_path / "x")
    for hd in (16, 32, 64, 128):
        assert sum(mrope_section(hd)) == hd // 2
        t, h, w = interleaved_mrope_section(hd)
        assert t + h + w == hd // 2 and 3 * max(h, w) <= hd // 2  # h and w take every third frequency
    assert interleaved_mrope_section(128) == [24, 20, 20]  # the real Qwen3-VL split
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        make_tiny_vlm("qwen3_vl", tmp_path / "x", vision_depth=2, deepstack_visual_indexes=[2])


def test_calib_jsonl_fixture(tiny_calib_jsonl):
    lines = tiny_calib_jsonl.read_text().splitlines()
    assert len(lines) == 6
    for line in lines:
        rec = json.loads(line)
        assert list(rec) == ["image", "question", "answer"]
        img = Image.open(tiny_calib_jsonl.parent / rec["image"])
        assert img.mode == "RGB"
