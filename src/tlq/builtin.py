"""Built-in demo models shipped inside the package, addressed as ``builtin:NAME``.

Each is a normal local Hugging Face directory (weights, processor, tokenizer, chat template) plus its
own data sets (``calib``, ``test``, and ``val`` where it has one), which ``--calib`` and ``--data``
default to. A model ships its sets either as files (``calib.jsonl`` + images) or as a recipe
(``sets.json``: the generator, its config, split and size of each set, and a SHA-256 over each set's
JSONL and image bytes). Recipes exist because image sets can be far larger than the model (the needle
sets' 1,428 noisy 224-px PNGs are ~75 MB, the model 4 MB): a recipe set is generated once, on first use,
into ``$TLQ_CACHE_DIR`` (default ``~/.cache/tlq``) and checked against its digest, so a generator that
no longer reproduces the data the model was measured on is an error, never a silent change.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from tlq.config import ConfigError

PREFIX = "builtin:"
ROOT = Path(__file__).parent / "builtin"
SETS_FILE = "sets.json"
# generator name in sets.json -> (module, config class); each module has generate_samples(split, n, cfg)
GENERATORS = {"digits": ("tlq.data.digits", "DigitsVQAConfig"), "needle": ("tlq.data.needle", "NeedleVQAConfig")}


def available() -> list[str]:
    if not ROOT.is_dir():
        return []
    return sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())


def is_builtin(model: str | Path) -> bool:
    return str(model).startswith(PREFIX)


def builtin_dir(model: str | Path) -> Path:
    name = str(model)[len(PREFIX):]
    path = ROOT / name
    if not (path / "config.json").is_file():
        names = ", ".join(PREFIX + n for n in available()) or "none installed"
        raise ConfigError(f"unknown built-in model {name!r}; available: {names}")
    return path


def resolve_model_dir(model: str | Path) -> Path:
    """A local directory, or the directory of a ``builtin:NAME`` model."""
    return builtin_dir(model) if is_builtin(model) else Path(model)


def default_dataset(model: str | Path, kind: str, given: str | Path | None) -> Path:
    """``given`` if the user passed one; else a built-in model's own ``calib``/``test``/``val`` set."""
    if given is not None:
        return Path(given)
    if is_builtin(model):
        path = builtin_set(builtin_dir(model), kind)
        if path is not None:
            return path
    flag = "--calib" if kind == "calib" else "--data"
    raise ConfigError(f"{flag} is required for {str(model)!r} (only built-in models bring their own {kind} set)")


def builtin_set(model_dir: Path, kind: str) -> Path | None:
    """The JSONL of set ``kind`` of a built-in model: shipped, or generated from its recipe (cached)."""
    shipped = model_dir / f"{kind}.jsonl"
    if shipped.is_file():
        return shipped
    recipe_path = model_dir / SETS_FILE
    if not recipe_path.is_file():
        return None
    recipe = json.loads(recipe_path.read_text())
    entry = recipe["sets"].get(kind)
    return None if entry is None else _materialize(model_dir.name, recipe, kind, entry)


def cache_root() -> Path:
    return Path(os.environ.get("TLQ_CACHE_DIR") or Path.home() / ".cache" / "tlq")


def set_digest(jsonl: Path) -> str:
    """SHA-256 over a set's JSONL bytes and, in line order, the bytes of every image it names."""
    h = hashlib.sha256(jsonl.read_bytes())
    for line in jsonl.read_text().splitlines():
        image = json.loads(line).get("image")
        if image:
            h.update((jsonl.parent / image).read_bytes())
    return h.hexdigest()


def generator_config(recipe: dict[str, Any]) -> Any:
    """The recipe's data config object (JSON lists back to the dataclass's tuples)."""
    import importlib

    module_name, class_name = GENERATORS[recipe["generator"]]
    cls = getattr(importlib.import_module(module_name), class_name)
    tuples = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
    return cls(**{k: tuple(v) if k in tuples else v for k, v in recipe["config"].items()})


def write_set(recipe: dict[str, Any], split: str, n: int, out: Path, stem: str, start: int = 0) -> Path:
    """Generate samples ``start .. start + n - 1`` of ``split`` with the recipe's generator into
    ``out/<stem>.jsonl`` (+ images)."""
    import importlib

    from tlq.data.digits import write_jsonl

    module = importlib.import_module(GENERATORS[recipe["generator"]][0])
    return write_jsonl(module.generate_samples(split, n, generator_config(recipe), start=start), out, stem)


def _materialize(name: str, recipe: dict[str, Any], kind: str, entry: dict[str, Any]) -> Path:
    out = cache_root() / "builtin" / name / entry["sha256"][:16]
    path = out / f"{kind}.jsonl"
    if path.is_file() and set_digest(path) == entry["sha256"]:
        return path
    from tlq.utils.io import notice

    notice(f"generating the {kind} set of builtin:{name} ({entry['samples']} samples) into {out} (once)")
    write_set(recipe, entry["split"], entry["samples"], out, kind)
    if set_digest(path) != entry["sha256"]:
        path.unlink()
        raise ConfigError(
            f"the {kind} set generated for builtin:{name} does not match the one the model was measured on "
            f"(sha256 differs): this tlq's {recipe['generator']} generator changed; install the tlq version the model shipped with"
        )
    return path
