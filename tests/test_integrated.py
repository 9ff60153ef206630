"""QIG-style token weights (tlq.importance.integrated): the path integral, the fence, the engine step."""

from __future__ import annotations

import pytest
import torch

from tlq.api import build_config, load_model
from tlq.config import SCHEMES, ConfigError, WeightQuantSpec
from tlq.data.calibration import load_calibration
from tlq.engine import steps as S
from tlq.engine.layerwise import LayerwiseEngine
from tlq.importance.integrated import integrated_gradients, interquartile_weights, rounded_copy, rounding_error


def _setup(tiny_vlm_dir, tiny_calib_jsonl, n=2):
    adapter, model, processor, _dir, dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=n, max_seq_len=4096, seed=0)
    return adapter, model, samples, dev


def test_integrated_gradients_are_complete(tiny_vlm_dir, tiny_calib_jsonl):
    """The attributions add up to the rounding error they explain, F(x) - F(0) (the IG completeness axiom),
    so a token's weight is its share of this layer's quantization error."""
    adapter, model, samples, _dev = _setup(tiny_vlm_dir, tiny_calib_jsonl, n=1)
    li = adapter.capture_layer0_inputs(model, samples[0].inputs)
    layer = adapter.decoder_layers(model)[0]
    rounded = rounded_copy(layer, SCHEMES["w3a16"].weights)
    x = li.hidden_states
    with torch.no_grad():
        delta = float(rounding_error(layer, rounded, x, li.kwargs) - rounding_error(layer, rounded, torch.zeros_like(x), li.kwargs))
    # the path is steep near the zero input (the input norm's epsilon), so completeness needs many points
    ig = integrated_gradients(layer, rounded, x, li.kwargs, steps=1024)
    assert ig.shape == x.shape and delta > 0
    assert float(ig.sum()) == pytest.approx(delta, rel=0.03)
    assert all(p.requires_grad for p in layer.parameters())  # the flags the pass froze are restored


def test_rounded_copy_rounds_every_linear_but_the_kept_ones(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, _samples, _dev = _setup(tiny_vlm_dir, tiny_calib_jsonl, n=1)
    layer = adapter.decoder_layers(model)[0]
    spec = WeightQuantSpec(bits=2, group_size=None, symmetric=False)
    ref = rounded_copy(layer, spec, keep=lambda n: n == "mlp.down_proj")
    assert torch.equal(ref.mlp.down_proj.weight, layer.mlp.down_proj.weight)
    q = ref.self_attn.q_proj.weight
    assert not torch.equal(q, layer.self_attn.q_proj.weight)
    assert all(row.unique().numel() <= 4 for row in q)  # 2 bits, one scale per row: at most 4 values a row


def test_interquartile_fence_clips_outliers_and_keeps_mean_one():
    raw = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 50.0])
    w = interquartile_weights(raw, fence=1.5)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[-1] / w[0]) < 1.5  # the outlier is pulled to the fence, not 50x its neighbours
    assert torch.equal(interquartile_weights(torch.zeros(5), 1.5), torch.ones(5))  # nothing to say: uniform
    # a zero fence clips everything into the interquartile range
    w0 = interquartile_weights(raw, fence=0.0)
    assert float(w0.max() / w0.min()) <= float(torch.quantile(raw, 0.75) / torch.quantile(raw, 0.25)) + 1e-6


def test_integrated_weighting_needs_every_token():
    with pytest.raises(ConfigError, match="--no-token-select"):
        build_config("w3a16", "tlq", weighting="integrated").layer_steps()
    cfg = build_config("w3a16", "tlq", weighting="integrated", token_select=False)
    assert cfg.layer_steps() == ("integrated_gradients", "scale_search", "solve")
    assert build_config("w3a16", "tlq").layer_steps() == ("scale_search", "solve")


def test_engine_weighs_each_layer_by_its_integrated_gradients(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch):
    """The step runs first in every layer and the scale search and GPTQ then read its weights: the
    result differs from uniform weights, and matches them when every token's attribution is equal."""
    seen: list[tuple[int, str]] = []
    read: list[torch.Tensor] = []

    def spy(name):
        phase, step = S.STEPS[name]

        def wrapped(ctx, state):
            seen.append((ctx.index, name))
            step(ctx, state)
            if name == "integrated_gradients":
                read.append(ctx.weights(0))

        return phase, wrapped

    monkeypatch.setattr(S, "STEPS", {n: spy(n) for n in S.STEPS})

    def run(weighting):
        adapter, model, samples, dev = _setup(tiny_vlm_dir, tiny_calib_jsonl)
        cfg = build_config("w3a16", "tlq", num_samples=2, device="cpu", weighting=weighting, token_select=False)
        return LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)

    qig = run("integrated")
    assert seen[:3] == [(0, "integrated_gradients"), (0, "scale_search"), (0, "solve")]
    assert len(read) == len(qig.layers) and all(float(w.mean()) == pytest.approx(1.0) and float(w.std()) > 0.05 for w in read)
    uniform = run("uniform")
    assert any(not torch.equal(qig.quantized[k].codes, uniform.quantized[k].codes) for k in uniform.quantized)

    import tlq.importance.integrated as I

    monkeypatch.setattr(I, "interquartile_weights", lambda raw, fence: torch.ones_like(raw))
    flat = run("integrated")
    assert all(torch.equal(flat.quantized[k].codes, uniform.quantized[k].codes) for k in uniform.quantized)


def test_enrichment_benchmark_keeps_every_layers_weights(benchmark, tiny_vlm_dir, tiny_calib_jsonl):
    """benchmarks/qig_enrichment.py reads QIG's weights off a real calibration run: one row per (layer,
    sample), each the sample's length with mean 1, and the engine's step table is left as it was."""
    bench = benchmark("qig_enrichment")
    adapter, model, samples, dev = _setup(tiny_vlm_dir, tiny_calib_jsonl)
    cfg = build_config("w3a16", "tlq", num_samples=2, device="cpu", weighting="integrated", token_select=False)
    before = dict(S.STEPS)
    seen = bench.capture_qig_weights(adapter, model, samples, cfg, dev)
    layers = len(adapter.decoder_layers(model))
    assert set(seen) == {(layer, i) for layer in range(layers) for i in range(len(samples))}
    assert all(w.shape == (samples[i].seq_len,) and float(w.mean()) == pytest.approx(1.0) for (_l, i), w in seen.items())
    assert S.STEPS == before
