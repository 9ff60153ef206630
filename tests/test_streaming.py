"""Streaming: decoder layers loaded one at a time from safetensors give exactly the in-memory results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tlq
from tlq.config import ConfigError
from tlq.data.calibration import load_calibration
from tlq.importance.gradients import token_gradients
from tlq.models import adapter_for_dir
from tlq.models.streaming import StreamedLayers, StreamedModel

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CPU = torch.device("cpu")


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _loaded_and_streamed(model_dir: Path):
    adapter = adapter_for_dir(model_dir)
    model, processor = adapter.load(model_dir, CPU, torch.float32)
    return adapter, model, processor, StreamedModel(adapter, model_dir, CPU, torch.float32)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
def test_streamed_model_loads_the_same_tensors_as_from_pretrained(tiny_vlm_dir, vlm_family, tie):
    model_dir = tiny_vlm_dir(vlm_family, tie_word_embeddings=tie)
    adapter, ref, _proc, streamed = _loaded_and_streamed(model_dir)
    layers = adapter.decoder_layers(streamed.model)
    assert all(p.device.type == "meta" for p in layers.parameters())  # nothing of the decoder in memory
    for i in range(len(layers)):
        streamed.load_layer(i)
    got, want = dict(streamed.model.state_dict()), ref.state_dict()
    assert set(got) == set(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    bufs, ref_bufs = dict(streamed.model.named_buffers()), dict(ref.named_buffers())  # rotary inv_freq, position ids
    assert [k for k in ref_bufs if not torch.equal(bufs[k], ref_bufs[k])] == []
    if tie:
        head = streamed.model.get_submodule(adapter.spec.lm_head).weight
        assert head is streamed.model.get_input_embeddings().weight
    streamed.release_layer(0)
    assert all(p.device.type == "meta" for p in layers[0].parameters())


class _CountingLayers(StreamedLayers):
    """Records loads and checks that at most one decoder layer is materialized at any time."""

    def __init__(self, streamed: StreamedModel) -> None:
        super().__init__(streamed)
        self.loads: list[int] = []

    def load(self, index, state=None):
        resident = [i for i, layer in enumerate(self.streamed.layers) if next(layer.parameters()).device.type != "meta"]
        assert resident == [], f"layers {resident} still materialized when loading {index}"
        self.loads.append(index)
        return super().load(index, state)


@pytest.mark.parametrize(
    ("family", "at"),
    [("qwen2_vl", "output"), ("qwen2_vl", "input"), ("qwen2_vl", "linear"), ("qwen3_vl", "output"), ("qwen3_vl", "input"), ("qwen3_vl_moe", "linear"),
     ("qwen3_5", "linear"), ("qwen3_5_moe", "output")],
)
def test_streamed_importance_equals_the_in_memory_pass(tiny_vlm_dir, tiny_calib_jsonl, family, at):
    """Qwen3-VL: DeepStack after layers 0 and 1 of 3, so the walk both adds and skips between layers."""
    model_dir = tiny_vlm_dir(family, num_layers=3)
    adapter, ref, processor, streamed = _loaded_and_streamed(model_dir)
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, ref, num_samples=4, max_seq_len=512, seed=0)
    want = token_gradients(adapter, ref, samples, at=at)
    source = _CountingLayers(streamed)
    got = token_gradients(adapter, streamed.model, samples, at=at, layers=source)
    for g, w in zip(got, want):
        assert torch.equal(g.grad, w.grad)
        assert g.loss == w.loss and g.curvature == w.curvature and g.num_answer_tokens == w.num_answer_tokens and g.linear_names == w.linear_names
    backward = [2, 1] if at == "output" else [2, 1, 0]  # the output gradient of layer 0 needs no layer-0 pass
    assert source.loads == [0, 1, 2] + backward


@pytest.mark.parametrize(
    ("family", "scheme", "method"),
    [("qwen2_vl", "w4a16", "gptq"), ("llava_onevision", "w3a16", "mbq"), ("qwen2_5_vl", "w4a8", "tlq"), ("qwen3_vl", "w4a8", "tlq"),
     ("qwen3_vl_moe", "w4a16", "gptq"), ("qwen3_5", "w4a8", "tlq"), ("qwen3_5_moe", "w4a8", "awq")],
)
def test_streamed_quantize_writes_the_in_memory_checkpoint(tiny_vlm_dir, tiny_calib_jsonl, tmp_path, family, scheme, method):
    model_dir = tiny_vlm_dir(family, num_layers=3)
    kw = dict(scheme=scheme, method=method, num_samples=4, progress=False, resume=False)
    tlq.quantize(model_dir, tiny_calib_jsonl, tmp_path / "memory", **kw)
    report = tlq.quantize(model_dir, tiny_calib_jsonl, tmp_path / "streamed", stream=True, **kw)
    assert len(report.layers) == 3 and report.streamed
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert set(memory) == set(streamed)
    assert [k for k in memory if not torch.equal(memory[k], streamed[k])] == []
    assert (tmp_path / "memory" / "config.json").read_text() == (tmp_path / "streamed" / "config.json").read_text()
    shards = sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    assert shards == [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]  # one per layer + the rest


@pytest.mark.slow
def test_streamed_run_resumes_after_a_kill_byte_identical(tiny_vlm_dir, tiny_calib_jsonl, tmp_path):
    model_dir = tiny_vlm_dir("qwen2_vl", num_layers=4)

    def run(out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        args = ["quantize", "--model", str(model_dir), "--calib", str(tiny_calib_jsonl), "--out", str(out),
                "--scheme", "w4a8", "--method", "tlq", "--num-samples", "4", "--stream", "--quiet"]
        return subprocess.run([sys.executable, "-m", "tlq", *args], env=env or ENV, capture_output=True, text=True, timeout=600)

    assert run(tmp_path / "ref").returncode == 0
    out = tmp_path / "out"
    crashed = run(out, {**ENV, "TLQ_FAULT_AFTER_LAYER": "1"})
    assert crashed.returncode != 0 and not out.exists()
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {
        p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir() if p.is_file()
    }
    assert not list(tmp_path.glob(".out.partial-*"))  # the killed run's partial export was swept


def test_streaming_refuses_a_checkpoint_without_safetensors(tiny_vlm_dir, tmp_path):
    src = tiny_vlm_dir("qwen2_vl")
    model_dir = tmp_path / "bin-checkpoint"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes((src / "config.json").read_bytes())
    with pytest.raises(ConfigError, match="safetensors"):
        StreamedModel(adapter_for_dir(model_dir), model_dir, CPU, torch.float32)
