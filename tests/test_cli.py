"""End to end through the CLI: every family x scheme writes a checkpoint that transformers reloads with
the in-memory fake-quantized model's logits; bad input ends in one line, not a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from tlq.api import build_config, calibrate
from tlq.cli import main
from tlq.data.calibration import load_calibration
from tlq.export.reload import load_quantized

SCHEMES = ["w4a16", "w3a16", "w8a8", "w4a8"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_reload_matches_in_memory(tiny_vlm_dir, tiny_calib_jsonl, tmp_path, family, scheme):
    out = _quantize_and_compare(tiny_vlm_dir(family), tiny_calib_jsonl, tmp_path, scheme, "gptq")
    assert (out / "chat_template.jinja").exists() or (out / "chat_template.json").exists() or "chat_template" in (
        out / "tokenizer_config.json"
    ).read_text() + (out / "processor_config.json").read_text()


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("scheme", ["w4a16", "w4a8"])
@pytest.mark.parametrize("method", ["gptq", "tlq"])
def test_quantize_the_2026_families(tiny_vlm_dir, tiny_calib_jsonl, tmp_path, family, scheme, method):
    """`tlq quantize` on Qwen3-VL (DeepStack), its MoE, and Qwen3.5 (hybrid DeltaNet/attention, dense and
    MoE): TLQ and GPTQ at w4a16 and w4a8, each export reloading to the in-memory calibration's logits and
    decoding its tokens (the hybrid layers' recurrent cache and the routed experts on the generation path)."""
    _quantize_and_compare(tiny_vlm_dir(family), tiny_calib_jsonl, tmp_path, scheme, method, generate=True)


def _quantize_and_compare(model_dir, calib, tmp_path, scheme: str, method: str, generate: bool = False):
    """Run `tlq quantize`, check its report, and compare the reloaded export's logits with the same
    (deterministic) calibration run in memory; returns the output directory."""
    out, report = tmp_path / "out", tmp_path / "report.json"
    rc = main(["quantize", "--model", str(model_dir), "--calib", str(calib), "--out", str(out),
               "--scheme", scheme, "--method", method, "--num-samples", "4", "--report", str(report), "--quiet"])
    assert rc == 0
    rep = json.loads(report.read_text())
    run = calibrate(model_dir, calib, build_config(scheme, method, num_samples=4, device="cpu"), progress=False)
    assert rep["scheme"] == scheme and rep["num_samples"] == 4
    assert len(rep["layers"]) == len(run.adapter.decoder_layers(run.model)) and all(layer["rel_error"] > 0 for layer in rep["layers"])
    sample = load_calibration(calib, run.processor, run.adapter, run.model, num_samples=1, max_seq_len=4096, seed=0)[0]
    # tlq's reloader restores routed experts per expert (transformers alone leaves them unloaded)
    reloaded = load_quantized(out, run.adapter.spec.model_class, torch.device("cpu"), torch.float32, adapter=run.adapter)
    with torch.no_grad():
        expected = run.model(**sample.inputs, use_cache=False).logits
        got = reloaded(**sample.inputs, use_cache=False).logits
        if generate:
            prompt = {k: v for k, v in sample.inputs.items() if k != "labels"}
            want = run.model.generate(**prompt, max_new_tokens=4, do_sample=False)
            assert torch.equal(reloaded.generate(**prompt, max_new_tokens=4, do_sample=False), want)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    return out


def _run_cli(capsys, argv):
    capsys.readouterr()  # drop what building the fixtures printed
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in err if not line.startswith("tlq: warning:")]  # warnings (6 of 128 samples) aside


def test_unknown_scheme_is_one_line(capsys, tiny_vlm_dir, tiny_calib_jsonl, tmp_path):
    rc, err = _run_cli(capsys, ["quantize", "--model", str(tiny_vlm_dir("qwen2_vl")), "--calib", str(tiny_calib_jsonl),
                                "--out", str(tmp_path / "o"), "--scheme", "w5a5", "--quiet"])
    assert rc == 2 and len(err) == 1 and "unknown scheme 'w5a5'" in err[0] and "w4a16" in err[0]


def test_missing_model_dir_is_one_line(capsys, tiny_calib_jsonl, tmp_path):
    rc, err = _run_cli(capsys, ["quantize", "--model", str(tmp_path / "nope"), "--calib", str(tiny_calib_jsonl),
                                "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0]


def test_unknown_method_is_one_line(capsys, tiny_vlm_dir, tiny_calib_jsonl, tmp_path):
    rc, err = _run_cli(capsys, ["quantize", "--model", str(tiny_vlm_dir("qwen2_vl")), "--calib", str(tiny_calib_jsonl),
                                "--out", str(tmp_path / "o"), "--method", "magic", "--quiet"])
    assert rc == 2 and len(err) == 1 and "unknown method" in err[0]


def test_existing_output_is_refused_before_work(capsys, tiny_calib_jsonl, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    # the model path is bogus too: the output check must come first and cost nothing
    rc, err = _run_cli(capsys, ["quantize", "--model", str(tmp_path / "nope"), "--calib", str(tiny_calib_jsonl),
                                "--out", str(out), "--quiet"])
    assert rc == 2 and "--overwrite" in err[0]
    assert (out / "keep.txt").read_text() == "precious"


def test_missing_calib_for_a_local_model(capsys, tiny_vlm_dir, tmp_path):
    rc, err = _run_cli(capsys, ["quantize", "--model", str(tiny_vlm_dir("qwen2_vl")), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "--calib is required" in err[0]


def test_group_size_must_divide(capsys, tiny_vlm_dir, tiny_calib_jsonl, tmp_path):
    rc, err = _run_cli(capsys, ["quantize", "--model", str(tiny_vlm_dir("qwen2_vl")), "--calib", str(tiny_calib_jsonl),
                                "--out", str(tmp_path / "o"), "--group-size", "96", "--quiet"])
    assert rc == 2 and len(err) == 1 and "group size 96" in err[0]
    assert not (tmp_path / "o").exists()
