"""Shared fixtures: tiny local VLM checkpoints and a tiny calibration JSONL (no hub, no internet).

Fixtures
--------
``tiny_vlm_dir``      session-scoped factory ``tiny_vlm_dir(family, **make_tiny_vlm_kwargs) -> Path``; one build per
                      (family, kwargs), cached for the session under ``tmp_path_factory``.
``vlm_family``        parametrized over ``tlq.models.tiny.FAMILIES`` (a test using it runs once per family).
``tiny_vlm_path``     ``tiny_vlm_dir(vlm_family)`` with default build options.
``tiny_calib_jsonl``  session-scoped: writes 6 small deterministic RGB PNGs (four 56x56, one 84x56 and one
                      56x84 as WxH) and ``calib.jsonl`` with one ``{"image": "<path relative to the jsonl>",
                      "question": ..., "answer": ...}`` per line; returns the JSONL path.
``benchmark``         session-scoped loader ``benchmark(name) -> module`` of ``benchmarks/<name>.py`` (they are
                      scripts, not a package: loaded by path with their folder importable for their siblings).
``script``            the same for ``scripts/<name>.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tlq.models.tiny import FAMILIES, make_tiny_vlm  # noqa: E402

torch.set_num_threads(1)
random.seed(0)
np.random.seed(0)
torch.manual_seed(0)

_ROOT = Path(__file__).resolve().parents[1]


def _module_loader(folder: Path, prefix: str):
    """``load(name)``: the module of ``folder/<name>.py``, loaded once, with ``folder`` importable while it
    loads (for its sibling helpers) and the module registered in ``sys.modules`` (its dataclasses look it up)."""
    loaded: dict[str, object] = {}

    def load(name: str):
        if name not in loaded:
            sys.path.insert(0, str(folder))
            try:
                spec = importlib.util.spec_from_file_location(f"{prefix}{name}", folder / f"{name}.py")
                mod = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = mod
                spec.loader.exec_module(mod)
                loaded[name] = mod
            finally:
                sys.path.remove(str(folder))
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def benchmark():
    """``benchmark("cost")``: the module of ``benchmarks/cost.py``, loaded once per session."""
    return _module_loader(_ROOT / "benchmarks", "tlq_bench_")


@pytest.fixture(scope="session")
def script():
    """``script("train_digits")``: the module of ``scripts/train_digits.py``, loaded once per session."""
    return _module_loader(_ROOT / "scripts", "tlq_script_")


# (width, height, background RGB, shape, shape RGB, question, answer)
_CALIB_SAMPLES = (
    (56, 56, (255, 255, 255), "square", (255, 0, 0), "What color is the square?", "red"),
    (56, 56, (0, 0, 0), "circle", (0, 255, 0), "What color is the circle?", "green"),
    (56, 56, (128, 128, 128), "bar", (0, 0, 255), "Which shape is in the image?", "bar"),
    (56, 56, (255, 255, 0), "cross", (0, 0, 0), "Describe the image.", "A black cross on a yellow background."),
    (84, 56, (0, 0, 128), "circle", (255, 255, 255), "Where is the circle?", "left"),
    (56, 84, (255, 192, 203), "square", (128, 0, 128), "Is there a purple square? Answer yes or no.", "yes"),
)


def _draw(width: int, height: int, bg, shape: str, fg, idx: int) -> np.ndarray:
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = bg
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx, r = height // 2, (width // 3 if width > height else width // 2), min(width, height) // 4
    if shape == "square":
        mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    elif shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "bar":
        mask = (abs(yy - cy) <= r // 2) & (abs(xx - cx) <= 2 * r)
    else:  # cross
        mask = ((abs(yy - cy) <= 2) & (abs(xx - cx) <= r)) | ((abs(xx - cx) <= 2) & (abs(yy - cy) <= r))
    img[mask] = fg
    # deterministic low-amplitude texture so images are not piecewise constant
    noise = np.random.RandomState(1000 + idx).randint(0, 16, size=img.shape, dtype=np.int16)
    return np.clip(img.astype(np.int16) + noise - 8, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """Factory ``tiny_vlm_dir(family, **kwargs) -> Path`` building (once per session) a tiny local checkpoint."""
    cache: dict[str, Path] = {}

    def factory(family: str, **kwargs) -> Path:
        key = f"{family}|{sorted((k, repr(v)) for k, v in kwargs.items())}"
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{family}")
            cache[key] = make_tiny_vlm(family, out, **kwargs)
        return cache[key]

    return factory


@pytest.fixture(params=FAMILIES)
def vlm_family(request) -> str:
    return request.param


@pytest.fixture
def tiny_vlm_path(tiny_vlm_dir, vlm_family) -> Path:
    return tiny_vlm_dir(vlm_family)


@pytest.fixture(scope="session")
def tiny_calib_jsonl(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_calib")
    (root / "images").mkdir()
    lines = []
    for i, (w, h, bg, shape, fg, q, a) in enumerate(_CALIB_SAMPLES):
        rel = f"images/img_{i}.png"
        Image.fromarray(_draw(w, h, bg, shape, fg, i)).save(root / rel)
        lines.append(json.dumps({"image": rel, "question": q, "answer": a}))
    path = root / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
