"""The shipped demo models: addressable as builtin:NAME, loadable, with their own data sets."""

from __future__ import annotations

import json

import pytest

from tlq.api import load_model
from tlq.builtin import available, default_dataset, resolve_model_dir
from tlq.config import ConfigError
from tlq.data.records import read_jsonl


@pytest.mark.parametrize("name", ["digits-qwen2vl", "digits-llavaov", "digits-qwen3vlmoe"])
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


def _needle_recipe(tmp_path, sizes: dict[str, int]) -> dict:
    from dataclasses import asdict

    from tlq.builtin import set_digest, write_set
    from tlq.data.needle import NeedleVQAConfig

    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(NeedleVQAConfig(asked_colours=("red",))).items()}
    recipe = {"generator": "needle", "config": cfg, "sets": {}}
    for stem, n in sizes.items():
        split = {"calib": "calibration"}.get(stem, stem)
        path = write_set(recipe, split, n, tmp_path / "reference", stem)
        recipe["sets"][stem] = {"split": split, "samples": n, "sha256": set_digest(path)}
    return recipe


def test_recipe_sets_are_generated_once_and_checked(tmp_path, monkeypatch, capsys):
    """A built-in model may ship its sets as a recipe: generated on first use into the cache, reused
    after, and refused if the generator no longer reproduces the digest the model was measured on."""
    from tlq.builtin import SETS_FILE, builtin_set

    model_dir = tmp_path / "needle-test"
    model_dir.mkdir()
    recipe = _needle_recipe(tmp_path, {"calib": 3, "test": 4})
    (model_dir / SETS_FILE).write_text(json.dumps(recipe))
    monkeypatch.setenv("TLQ_CACHE_DIR", str(tmp_path / "cache"))

    calib = builtin_set(model_dir, "calib")
    assert calib is not None and str(calib).startswith(str(tmp_path / "cache"))
    assert len(read_jsonl(calib)) == 3 and len(read_jsonl(builtin_set(model_dir, "test"))) == 4
    assert (tmp_path / "reference" / "calib.jsonl").read_bytes() == calib.read_bytes()
    assert "generating the calib set" in capsys.readouterr().err
    stamp = calib.stat().st_mtime_ns
    assert builtin_set(model_dir, "calib") == calib and calib.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert "generating" not in capsys.readouterr().err
    assert builtin_set(model_dir, "val") is None  # not in the recipe

    recipe["sets"]["test"]["sha256"] = "0" * 64  # a generator that drifted from what the model was measured on
    (model_dir / SETS_FILE).write_text(json.dumps(recipe))
    with pytest.raises(ConfigError, match="does not match"):
        builtin_set(model_dir, "test")


# name -> (decoder layers, recipe fields the model was trained and measured on)
NEEDLE_BUILTINS = {
    "needle-qwen2vl": (4, {"question": "read", "asked_colours": ("red",), "noise_std": 0.25}),
    "needle-count-qwen2vl": (12, {"question": "count", "count_digits": (7,), "blend_label": "sampled", "sampled_below": 0.55}),
    "needle-count-llavaov": (4, {"question": "count", "count_digits": (7,), "blend_label": "dominant", "noise_std": 0.15}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NEEDLE_BUILTINS))
def test_needle_builtin_loads_and_its_calibration_set_reproduces(name, tmp_path, monkeypatch):
    """The needle built-ins ship their sets as a recipe: the generator must still produce, byte for byte,
    the calibration set the model was measured with (its digest), and the model must load."""
    from tlq.builtin import SETS_FILE, builtin_set, generator_config

    layers, fields = NEEDLE_BUILTINS[name]
    monkeypatch.setenv("TLQ_CACHE_DIR", str(tmp_path / "cache"))
    path = resolve_model_dir(f"builtin:{name}")
    recipe = json.loads((path / SETS_FILE).read_text())
    assert {k: v["samples"] for k, v in recipe["sets"].items()} == {"calib": 128, "val": 300, "test": 1000}
    cfg = generator_config(recipe)  # the recipe's fields over the generator's defaults
    assert {k: getattr(cfg, k) for k in fields} == fields
    calib = read_jsonl(builtin_set(path, "calib"))  # generated here; refused on a digest mismatch
    assert len(calib) == 128 and all(r.extra["relevant_tokens"] for r in calib)
    adapter, model, *_ = load_model(f"builtin:{name}", device="cpu")
    assert len(adapter.decoder_layers(model)) == layers
