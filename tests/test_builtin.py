"""The shipped demo models: addressable as builtin:NAME, loadable, with their own data sets."""

from __future__ import annotations

import json

import pytest

from tlq.api import load_model
from tlq.builtin import available, default_dataset, resolve_model_dir
from tlq.config import ConfigError
from tlq.data.records import read_jsonl


@pytest.mark.parametrize("name", ["digits-qwen2vl", "digits-llavaov"])
def test_builtin_model_loads_with_its_data(name):
    assert name in available()
    ref = f"builtin:{name}"
    path = resolve_model_dir(ref)
    assert (path / "config.json").is_file() and (path / "model.safetensors").stat().st_size < 25 * 2**20
    calib, test = default_dataset(ref, "calib", None), default_dataset(ref, "test", None)
    assert len(read_jsonl(calib)) == 128 and len(read_jsonl(test)) == 500
    adapter, model, processor, *_ = load_model(ref, device="cpu")
    assert len(adapter.decoder_layers(model)) == json.loads((path / "tlq_tiny.json").read_text())["num_layers"]


def test_unknown_builtin_names_the_available_ones():
    with pytest.raises(ConfigError, match="builtin:digits-qwen2vl"):
        resolve_model_dir("builtin:nope")


def test_user_data_overrides_builtin_defaults(tmp_path):
    assert default_dataset("builtin:digits-qwen2vl", "calib", tmp_path / "mine.jsonl") == tmp_path / "mine.jsonl"
