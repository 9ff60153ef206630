"""Built-in demo models shipped inside the package, addressed as ``builtin:NAME``.

Each is a normal local Hugging Face directory (weights, processor, tokenizer, chat template) plus its
own ``calib.jsonl`` and ``test.jsonl``, which ``--calib`` and ``--data`` default to.
"""

from __future__ import annotations

from pathlib import Path

from tlq.config import ConfigError

PREFIX = "builtin:"
ROOT = Path(__file__).parent / "builtin"


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
    """``given`` if the user passed one; else a built-in model's own ``calib``/``test`` set."""
    if given is not None:
        return Path(given)
    if is_builtin(model):
        path = builtin_dir(model) / f"{kind}.jsonl"
        if path.is_file():
            return path
    flag = "--calib" if kind == "calib" else "--data"
    raise ConfigError(f"{flag} is required for {str(model)!r} (only built-in models bring their own {kind} set)")
