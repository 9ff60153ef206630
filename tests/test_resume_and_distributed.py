"""Scale features end to end: resume after a kill, 2-rank gloo == 1 process, activation spilling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlq.api import build_config, calibrate, RunOptions
from tlq.export.compressed_tensors import read_stored_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _tlq(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlq", *args], env=env or ENV, capture_output=True, text=True, timeout=600)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def deep_model(tiny_vlm_dir):
    return tiny_vlm_dir("qwen2_vl", num_layers=4)


def _quantize_args(model: Path, calib: Path, out: Path, *extra: str, scheme: str = "w4a8", method: str = "tlq") -> list[str]:
    return ["quantize", "--model", str(model), "--calib", str(calib), "--out", str(out), "--scheme", scheme,
            "--method", method, "--quiet", *extra]


@pytest.mark.slow
def test_killed_run_resumes_byte_identical(deep_model, tiny_calib_jsonl, tmp_path):
    ref = _tlq(*_quantize_args(deep_model, tiny_calib_jsonl, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "out"
    crashed = _tlq(*_quantize_args(deep_model, tiny_calib_jsonl, out), env={**ENV, "TLQ_FAULT_AFTER_LAYER": "1"})
    assert crashed.returncode == -9  # SIGKILL after layer 1 was checkpointed
    assert not out.exists()
    resume_dir = tmp_path / ".out.tlq-resume"
    assert (resume_dir / "progress.json").exists()

    changed = _tlq(*_quantize_args(deep_model, tiny_calib_jsonl, out, "--num-samples", "5"))
    assert changed.returncode == 2 and "num_samples changed" in changed.stderr, changed.stderr
    assert resume_dir.exists()  # a refused resume loses nothing

    resumed = _tlq(*_quantize_args(deep_model, tiny_calib_jsonl, out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "2 decoder layer(s) already calibrated" in resumed.stderr
    assert _files(out) == _files(tmp_path / "ref")
    assert not resume_dir.exists()  # cleaned up once the output is complete


def _calib_tokens(model: Path, calib: Path) -> int:
    """Valid tokens of the whole calibration set, as a run of the CLI's defaults encodes it."""
    from tlq.api import load_model
    from tlq.data.calibration import load_calibration

    adapter, hf_model, processor, *_ = load_model(model, device="cpu")
    samples = load_calibration(calib, processor, adapter, hf_model, num_samples=128, max_seq_len=None, seed=0)
    return sum(s.seq_len for s in samples)


@pytest.mark.parametrize(
    ("scheme", "method", "common_extra", "two_rank_extra"),
    [("w4a8", "tlq", (), ()), ("w3a16", "mbq", (), ()), ("w4a16", "gptq", ("--gptq-target", "fp"), ("--stream",)),
     ("w3a16", "tlq", ("--weighting", "integrated", "--no-token-select"), ()), ("w3a16", "tlq", ("--sample-weights", "curvature"), ())],
    ids=["tlq-w4a8", "mbq-w3a16", "gptq-fp-target-w4a16-2-ranks-streamed", "tlq-qig-weights-w3a16", "tlq-curvature-sample-weights-w3a16"],
)
@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(deep_model, tiny_calib_jsonl, tmp_path, scheme, method, common_extra, two_rank_extra):
    """TLQ (importance, token selection, weighted GPTQ) and MBQ (modality weights, scale search); and
    GPTQ with the FP target (its cross statistics all-reduced too), 2 ranks each streaming the layers
    from disk against 1 in-memory process; TLQ with QIG's weights (each rank weighs its own samples); TLQ
    with curvature sample weights (their mean is the whole set's, over both ranks).
    TLQ's token floor sits between one rank's tokens and the set's: a floor counted per rank would keep
    every token on both ranks and change the codes."""
    if method == "tlq":
        common_extra = (*common_extra, "--token-floor", str(3 * _calib_tokens(deep_model, tiny_calib_jsonl) // 4))
    for nproc in ("1", "2"):
        extra = (*common_extra, *(two_rank_extra if nproc == "2" else ()))
        args = _quantize_args(deep_model, tiny_calib_jsonl, tmp_path / f"n{nproc}", "--nproc", nproc, "--no-resume", *extra,
                              scheme=scheme, method=method)
        r = _tlq(*args)
        assert r.returncode == 0, r.stderr
    one, two = read_stored_weights(tmp_path / "n1"), read_stored_weights(tmp_path / "n2")
    assert one.keys() == two.keys() and len(one) == 28
    total = sum(w.codes.numel() for w in one.values())
    flipped = sum(int((one[k].codes != two[k].codes).sum()) for k in one)
    # Reduction order can flip a rounding tie; anything beyond a handful of codes is a real divergence.
    print(f"codes differing between 1 and 2 ranks: {flipped} of {total}")
    assert flipped <= total * 1e-4
    for k in one:
        torch.testing.assert_close(one[k].scale, two[k].scale, rtol=1e-5, atol=0)


def test_spilling_activations_changes_nothing(tiny_vlm_dir, tiny_calib_jsonl, tmp_path):
    cfg = build_config("w4a16", "gptq", num_samples=6, device="cpu")
    plain = calibrate(tiny_vlm_dir("qwen2_vl"), tiny_calib_jsonl, cfg, progress=False)
    spill = tmp_path / "spill"
    spill.mkdir()
    budget = calibrate(tiny_vlm_dir("qwen2_vl"), tiny_calib_jsonl, cfg,
                       options=RunOptions(progress=False, max_cpu_memory=20_000, spill_dir=str(spill)))
    for name, qw in plain.result.quantized.items():
        assert torch.equal(qw.codes, budget.result.quantized[name].codes)
    assert list(spill.iterdir()) == []  # spill files removed after the run
