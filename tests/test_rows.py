"""Row cuts of a decoder layer (tlq.engine.rows): with only some rows kept, a layer's output at those
rows is unchanged, and attention computes queries at the kept rows only."""

from __future__ import annotations

import pytest
import torch

from tlq.api import load_model
from tlq.data.calibration import load_calibration
from tlq.engine import rows as rows_module
from tlq.engine.rows import QueryRows, RowsOnly, outermost_row_blocks, query_cut
from tlq.models.base import get_submodule, run_layer
from tlq.models.tiny import FAMILIES


def _layer_inputs(tiny_vlm_dir, tiny_calib_jsonl, family, attn_implementation=None):
    adapter, model, processor, _d, _dev, _dt = load_model(tiny_vlm_dir(family), device="cpu")
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    sample = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=1, max_seq_len=4096, seed=0)[0]
    li = adapter.capture_layer0_inputs(model, sample.inputs)
    return adapter, adapter.decoder_layers(model), li


def _query_lengths(attn: torch.nn.Module, seen: list[tuple[int, int]]):
    """Record the (query, key) lengths of every attention call of ``attn`` (the module's own implementation)."""
    cut = attn._tlq_query_rows
    inner = cut.inner

    def spy(module, query, key, *args, **kwargs):
        seen.append((query.shape[2], key.shape[2]))
        return inner(module, query, key, *args, **kwargs)

    cut.inner = spy


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cut_layer_gives_the_same_outputs_at_the_kept_rows(tiny_vlm_dir, tiny_calib_jsonl, family, monkeypatch):
    """Row-wise blocks and attention queries at every third row: the kept rows' outputs are the layer's,
    and the queries go in causal chunks, each reading the keys up to its own last row only."""
    monkeypatch.setattr(rows_module, "_MIN_CHUNK", 4)  # several chunks even in a tiny sequence
    adapter, layers, li = _layer_inputs(tiny_vlm_dir, tiny_calib_jsonl, family)
    h = li.hidden_states
    seq = h.shape[1]
    rows = [torch.arange(1, seq, 3)]  # every third token from the second: the first one is not kept
    cut_any = False
    for i, layer in enumerate(layers):
        kwargs = adapter.layer_kwargs(i, li.kwargs, li.between)
        full = run_layer(layer, h, kwargs)
        attn = get_submodule(layer, adapter.spec.attention) if hasattr(layer, adapter.spec.attention) else None
        cuts = [RowsOnly(layer.get_submodule(n), rows) for n in outermost_row_blocks(adapter.smooth_mappings(layer))]
        q = query_cut(attn, rows)
        seen: list[tuple[int, int]] = []
        if q is not None:
            _query_lengths(attn, seen)
            cuts.append(q)
            cut_any = True
        try:
            part = run_layer(layer, h, kwargs)
        finally:
            for c in cuts:
                c.remove()
        torch.testing.assert_close(part[:, rows[0]], full[:, rows[0]], rtol=1e-5, atol=1e-6)
        if q is not None:
            chunks = rows[0].split(max(4, -(-rows[0].numel() // rows_module._CHUNKS)))
            assert len(chunks) > 1 and seen == [(c.numel(), int(c[-1]) + 1) for c in chunks]
        else:
            assert seen == []
        assert not hasattr(attn, "_tlq_query_rows") and (attn is None or attn.config._attn_implementation == "sdpa")
        h = adapter.layer_step(i, layer, h, li.kwargs, li.between)
    assert cut_any  # every family has at least one causal attention layer


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_query_cut_follows_the_model_implementation_and_mask(tiny_vlm_dir, tiny_calib_jsonl, implementation):
    """eager gets an explicit 4-D mask whose query rows are sliced; sdpa without a mask gets the causal one."""
    adapter, layers, li = _layer_inputs(tiny_vlm_dir, tiny_calib_jsonl, "qwen2_vl", implementation)
    layer = layers[0]
    h = li.hidden_states
    rows = [torch.tensor([0, 2, h.shape[1] - 1])]
    full = run_layer(layer, h, li.kwargs)
    cut = query_cut(layer.self_attn, rows)
    assert isinstance(cut, QueryRows) and cut.name == implementation
    attn_out: list[torch.Tensor] = []
    hook = layer.self_attn.register_forward_hook(lambda _m, _a, out: attn_out.append(out[0]))
    try:
        part = run_layer(layer, h, li.kwargs)
        rows[0] = None  # every row: the module's own call, unsliced
        again = run_layer(layer, h, li.kwargs)
    finally:
        cut.remove()
        hook.remove()
    idx = torch.tensor([0, 2, h.shape[1] - 1])
    torch.testing.assert_close(part[:, idx], full[:, idx], rtol=1e-5, atol=1e-6)
    skipped = torch.ones(h.shape[1], dtype=torch.bool)
    skipped[idx] = False
    assert attn_out[0][:, skipped].abs().max() == 0 and attn_out[0][:, idx].abs().amin(-1).max() > 0  # never computed: zeros
    torch.testing.assert_close(again, full)


def test_query_cut_skips_what_it_cannot_wrap():
    class NotCausal(torch.nn.Module):
        is_causal = False

    assert query_cut(None, [None]) is None
    assert query_cut(NotCausal(), [None]) is None
