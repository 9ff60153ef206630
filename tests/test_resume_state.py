"""tlq.engine.checkpoint: fingerprints and per-layer resume state."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tlq.config import ConfigError, WeightQuantSpec
from tlq.engine import checkpoint as C
from tlq.engine.activations import ActivationStore
from tlq.engine.checkpoint import ResumeState, model_identity, run_fingerprint
from tlq.engine.distributed import DistContext
from tlq.quant.quantizer import QuantizedWeight

PARTS = {"config": {"scheme": "w4a16", "method": "tlq", "gptq": {"damp": 0.01}}, "model": {"config.json": "ab" * 32}, "calibration": "cd" * 32}


def parts(**config) -> dict:
    return {**PARTS, "config": {**PARTS["config"], **config}}


def open_state(path, p=PARTS, **kw) -> ResumeState:
    st = ResumeState(path, run_fingerprint(p), p, **kw)
    st.open()
    return st


def layer_data(i: int):
    g = torch.Generator().manual_seed(i)
    state = {"self_attn.q_proj.weight": torch.randn(8, 16, generator=g), "input_layernorm.weight": torch.rand(16, generator=g).to(torch.bfloat16)}
    state["mlp.tied"] = state["self_attn.q_proj.weight"]  # shared storage must not trip safetensors
    quantized = {
        f"model.layers.{i}.self_attn.q_proj": QuantizedWeight(torch.randint(-8, 8, (8, 16), dtype=torch.int8, generator=g), torch.rand(8, 2, generator=g).to(torch.float16), torch.zeros(8, 2), WeightQuantSpec(4, 8, True)),
        f"model.layers.{i}.mlp.down_proj": QuantizedWeight(torch.randint(-4, 4, (4, 16), dtype=torch.int8, generator=g), torch.rand(4, 1, generator=g), torch.randint(-4, 4, (4, 1), generator=g).float(), WeightQuantSpec(3, None, False)),
    }
    x_fp = [torch.randn(1, 3 + s, 16, generator=g) for s in range(4)]
    x_q = list(x_fp) if i == 0 else [t + 0.01 for t in x_fp]
    report = {"index": i, "rel_error": 0.001 * (i + 1), "search_alphas": {"input_layernorm": float("nan"), "v_proj": 0.5}}
    return state, quantized, {"x_fp": x_fp, "x_q": x_q}, report


def assert_layer_equal(loaded, expected):
    (ls, lq, lr), (es, eq, _, er) = loaded, expected
    assert list(ls) == list(es) and all(torch.equal(ls[k], es[k]) and ls[k].dtype == es[k].dtype for k in es)
    assert list(lq) == list(eq)
    for name, qw in eq.items():
        got = lq[name]
        assert got.spec == qw.spec
        for f in ("codes", "scale", "zero_point"):
            assert torch.equal(getattr(got, f), getattr(qw, f)) and getattr(got, f).dtype == getattr(qw, f).dtype
    assert lr["rel_error"] == er["rel_error"] and math.isnan(lr["search_alphas"]["input_layernorm"])


def assert_streams_equal(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert len(got[name]) == len(expected[name])
        assert all(torch.equal(a, b) for a, b in zip(got[name], expected[name]))


def test_fingerprint_is_canonical():
    a = {"b": 1, "a": {"y": [1, 2], "x": "s"}}
    b = {"a": {"x": "s", "y": (1, 2)}, "b": 1}
    assert run_fingerprint(a) == run_fingerprint(b)
    assert run_fingerprint(a) != run_fingerprint({**a, "b": 2})
    with pytest.raises(TypeError):
        run_fingerprint({"x": object()})


def test_model_identity(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"a": 1}')
    weights = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.arange(50_000, dtype=torch.float32)}, str(weights))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "junk").write_text("ignored")
    monkeypatch.setattr(C, "SMALL_FILE_BYTES", 1000)  # take the sampled path for the weights
    ident = model_identity(tmp_path)
    assert set(ident) == {"config.json", "model.safetensors"} and "sampled_sha256" in ident["model.safetensors"]
    os.utime(weights, (1, 1))  # a copy with new mtimes is the same model
    assert model_identity(tmp_path) == ident
    save_file({"w": torch.arange(50_000, dtype=torch.float32) + 1}, str(weights))  # same size, new weights
    changed = model_identity(tmp_path)
    assert changed["model.safetensors"]["size"] == ident["model.safetensors"]["size"] and changed != ident
    assert "sha256" in model_identity(tmp_path, full_hash=True)["model.safetensors"]
    with pytest.raises(ConfigError):
        model_identity(tmp_path / "missing")


def test_save_load_round_trip(tmp_path):
    d = tmp_path / "resume"
    st = open_state(d, chunk_bytes=300)  # tiny chunks: several stream files per layer
    assert st.completed_layers() == 0
    data = [layer_data(i) for i in range(3)]
    for i, (state, quantized, streams, report) in enumerate(data):
        st.save_layer(i, state, quantized, streams, report)
        assert st.completed_layers() == i + 1
        # only the newest layer's streams stay on disk
        assert {f.name[:6] for f in (d / "streams").iterdir()} == {f"L{i:05d}"}
    assert len(list((d / "streams").glob("*.safetensors"))) > 1
    with pytest.raises(ValueError, match="in order"):
        st.save_layer(5, *data[0])
    st.close()

    again = open_state(d)  # a restarted run
    assert again.completed_layers() == 3
    for i in range(3):
        assert_layer_equal(again.load_layer(i), data[i])
    streams = again.load_streams(2)
    assert_streams_equal(streams, data[2][2])
    with pytest.raises(ValueError, match="newest"):
        again.load_streams(1)
    with pytest.raises(ValueError, match="not finished"):
        again.load_layer(3)
    again.cleanup()
    assert not d.exists()


def test_aliased_streams_and_stores(tmp_path):
    st = open_state(tmp_path / "r")
    state, quantized, streams, report = layer_data(0)  # x_q is list(x_fp): the same tensors
    st.save_layer(0, state, quantized, streams, report)
    files = list((tmp_path / "r" / "streams").glob("*.safetensors"))
    from safetensors import safe_open

    assert sum(len(list(safe_open(str(f), "pt").keys())) for f in files) == 4  # stored once
    loaded = st.load_streams(0)
    assert_streams_equal(loaded, streams)
    assert all(a is b for a, b in zip(loaded["x_fp"], loaded["x_q"]))  # shared again, like the saved lists
    with ActivationStore(0, tmp_path / "spill") as fp_store:  # streams can be ActivationStores, and reload into them
        fp_store.extend(layer_data(1)[2]["x_fp"])
        _, q1, s1, r1 = layer_data(1)
        st.save_layer(1, state, q1, {"x_fp": fp_store, "x_q": s1["x_q"]}, r1)
    stores = st.load_streams(1, container=lambda _name: ActivationStore(0, tmp_path / "spill"))
    try:
        assert isinstance(stores["x_fp"], ActivationStore) and stores["x_fp"].num_spilled == 4
        assert_streams_equal({k: list(v) for k, v in stores.items()}, s1)
    finally:
        for s in stores.values():
            s.close()


def test_crash_before_marker_keeps_previous_layer(tmp_path, monkeypatch):
    d = tmp_path / "resume"
    st = open_state(d)
    data = [layer_data(i) for i in range(3)]
    st.save_layer(0, *data[0])
    st.save_layer(1, *data[1])
    real_replace = os.replace

    def crash_on_marker(src, dst):
        if str(dst).endswith(C.PROGRESS_FILE):
            raise KeyboardInterrupt("killed")  # the process dies after the data, before the marker
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_marker)
    with pytest.raises(KeyboardInterrupt):
        st.save_layer(2, *data[2])
    monkeypatch.setattr(os, "replace", real_replace)
    assert (d / "layers" / "L00002.json").exists()  # layer 2's data made it to disk ...
    st.close()

    again = open_state(d)
    assert again.completed_layers() == 2  # ... but layer 1 is the last finished one
    assert not (d / "layers" / "L00002.json").exists()  # the partial save was cleared
    assert not list(d.rglob("*.tmp"))
    assert_streams_equal(again.load_streams(1), data[1][2])  # its streams were not deleted yet
    assert_layer_equal(again.load_layer(1), data[1])
    again.save_layer(2, *data[2])  # and the run goes on
    assert again.completed_layers() == 3
    assert_streams_equal(again.load_streams(2), data[2][2])


def test_changed_run_refuses_to_resume(tmp_path):
    d = tmp_path / "resume"
    st = open_state(d)
    st.save_layer(0, *layer_data(0))
    st.close()
    with pytest.raises(ConfigError) as exc:
        open_state(d, parts(scheme="w3a16"))
    msg = str(exc.value)
    assert "config.scheme changed from w4a16 to w3a16" in msg and "--overwrite" in msg and "method" not in msg
    new_model = {**PARTS, "model": {"config.json": "ef" * 32}}
    with pytest.raises(ConfigError, match=r"model\.config\.json changed from abababababab\.\.\. to efefefefefef\.\.\."):
        open_state(d, new_model)
    with pytest.raises(ConfigError, match="config.group_size is new"):
        open_state(d, parts(group_size=64))
    with pytest.raises(ConfigError, match="command line or input changed"):
        ResumeState(d, "0" * 64).open()  # no parts to diff
    with pytest.raises(ConfigError, match="started with 1 process"):
        open_state(d, ctx=DistContext(rank=0, world_size=2))
    fresh = ResumeState(d, run_fingerprint(parts(scheme="w3a16")), parts(scheme="w3a16"))
    assert fresh.open(overwrite=True) == 0  # --overwrite starts over
    fresh.close()
    assert open_state(d, parts(scheme="w3a16")).completed_layers() == 0


def test_refuses_foreign_or_busy_directories(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a TLQ resume directory"):
        ResumeState(foreign, run_fingerprint(PARTS), PARTS).open(overwrite=True)
    assert (foreign / "precious.txt").exists()
    busy = open_state(tmp_path / "busy")
    with pytest.raises(ConfigError, match="in use"):
        open_state(tmp_path / "busy")
    busy.close()
    open_state(tmp_path / "busy").close()
    with pytest.raises(ValueError, match="does not match"):
        ResumeState(tmp_path / "x", "0" * 64, PARTS)


def test_damaged_layer_is_detected(tmp_path):
    d = tmp_path / "resume"
    st = open_state(d)
    st.save_layer(0, *layer_data(0))
    path = d / "layers" / "L00000.quant.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="damaged"):
        st.load_layer(0)
    (d / "layers" / "L00000.json").unlink()
    st.close()
    with pytest.raises(ConfigError, match="damaged"):
        open_state(d)


def test_empty_streams_and_cleanup(tmp_path):
    d = tmp_path / "resume"
    st = open_state(d)
    state, quantized, _streams, report = layer_data(0)
    st.save_layer(0, state, quantized, {}, report)  # a rank with an empty shard, or replay instead of streams
    assert st.load_streams(0) == {}
    st.save_layer(1, state, quantized, {"x_fp": [], "x_q": []}, report)
    assert st.load_streams(1) == {"x_fp": [], "x_q": []}
    st.cleanup()
    assert not d.exists()
