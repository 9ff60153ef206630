"""The CLI driven as a user would, through every mistake and fault we know of (subprocess, no mocks).

Each case asserts the exit code, that the user reads one ``tlq: error:`` line and no traceback, and
that nothing the user owns changed: the whole project tree (model, calibration file, images, notes,
earlier outputs) is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST_SECONDS = 5.0  # checks that need no model must answer within this (the interpreter's start included)


def tlq(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlq", *args], env=env or ENV, capture_output=True, text=True, timeout=600)


def tree_hash(root: Path) -> dict[str, str]:
    """Path -> sha256 of every file under ``root`` (hidden ones included), and every directory."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str, rc: int = 2) -> str:
    assert r.returncode == rc, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("tlq: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def project(tiny_vlm_dir, tiny_calib_jsonl, tmp_path_factory) -> Path:
    """A user's folder: ``model/``, ``calib.jsonl`` + ``images/``, and notes of their own."""
    root = tmp_path_factory.mktemp("user") / "par"
    shutil.copytree(tiny_vlm_dir("qwen2_vl"), root / "model")
    shutil.copytree(tiny_calib_jsonl.parent / "images", root / "images")
    shutil.copy(tiny_calib_jsonl, root / "calib.jsonl")
    (root / "notes.txt").write_text("my experiment notes\n")
    return root


def quantize_args(project: Path, out: Path, *extra: str, calib: Path | None = None, model: Path | None = None, method: str = "rtn") -> list[str]:
    return ["quantize", "--model", str(model or project / "model"), "--calib", str(calib or project / "calib.jsonl"),
            "--out", str(out), "--scheme", "w4a16", "--method", method, "--quiet", *extra]


def test_overwrite_never_deletes_the_folder_holding_the_inputs(project):
    """The data-loss repro: --out = the folder that contains the model and the calibration file."""
    before = tree_hash(project)
    r = tlq(*quantize_args(project, project, "--overwrite"))
    assert_one_line_error(r, "contains the model directory", "outside it")
    assert tree_hash(project) == before


@pytest.mark.parametrize(
    ("make_out", "needles"),
    [
        (lambda p: p / "model", ("is the model directory",)),
        (lambda p: p / "images", ("holds files tlq did not write", "img_0.png")),
        (lambda p: p / "notes.txt", ("exists and is not a directory",)),
        (lambda p: p / "notes.txt" / "out", ("is a file, not a directory",)),
    ],
    ids=["out-is-model", "out-is-user-folder", "out-is-a-file", "parent-is-a-file"],
)
def test_output_paths_refused_before_any_work(project, make_out, needles):
    before = tree_hash(project)
    t0 = time.perf_counter()
    r = tlq(*quantize_args(project, make_out(project), "--overwrite"))
    elapsed = time.perf_counter() - t0
    assert_one_line_error(r, *needles)
    assert tree_hash(project) == before
    assert elapsed < FAST_SECONDS, f"refusal took {elapsed:.1f}s"


def test_report_path_problems_are_refused_first(project, tmp_path):
    before = tree_hash(project)
    r = tlq(*quantize_args(project, tmp_path / "o", "--report", str(project / "notes.txt" / "r.json")))
    assert_one_line_error(r, "--report", "is a file")
    r = tlq(*quantize_args(project, tmp_path / "o", "--report", str(project / "calib.jsonl"), "--overwrite"))
    assert_one_line_error(r, "--report", "is the calibration file")
    assert tree_hash(project) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--group-size", "0", "--group-size must be a positive"), ("--damp", "2", "--damp must be in [0, 1)"),
     ("--block-size", "0", "--block-size must be a positive"), ("--num-samples", "0", "--num-samples must be positive"),
     ("--error-samples", "-1", "--error-samples must be 0"), ("--scheme", "w5a5", "unknown scheme")],
)
def test_bad_options_refused_fast_leaving_nothing(project, tmp_path, flag, value, needle):
    t0 = time.perf_counter()
    r = tlq(*quantize_args(project, tmp_path / "o"), flag, value)
    elapsed = time.perf_counter() - t0
    assert_one_line_error(r, needle)
    assert list(tmp_path.iterdir()) == []  # no output, no resume state
    assert elapsed < FAST_SECONDS, f"refusal took {elapsed:.1f}s"


def test_missing_calib_is_refused_before_the_model_loads(project, tmp_path):
    t0 = time.perf_counter()
    r = tlq("quantize", "--model", str(project / "model"), "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(r, "--calib is required")
    assert time.perf_counter() - t0 < FAST_SECONDS


@pytest.mark.slow
def test_cases_that_already_worked_still_do(project, tmp_path):
    """Missing model, unsupported architecture, a bad JSON line, groups that do not tile the layers."""
    before = tree_hash(project)
    r = tlq(*quantize_args(project, tmp_path / "o", model=tmp_path / "nope"))
    assert_one_line_error(r, "does not exist")
    alien = tmp_path / "alien"
    shutil.copytree(project / "model", alien)
    cfg = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    r = tlq(*quantize_args(project, tmp_path / "o", model=alien))
    assert_one_line_error(r, "model_type 'gpt2' is not supported")
    bad = tmp_path / "data" / "bad.jsonl"
    shutil.copytree(project / "images", tmp_path / "data" / "images")
    bad.write_text((project / "calib.jsonl").read_text() + "{not json\n")
    r = tlq(*quantize_args(project, tmp_path / "o", calib=bad))
    assert_one_line_error(r, f"{bad}:7: invalid JSON")
    r = tlq(*quantize_args(project, tmp_path / "o", "--group-size", "100"))
    assert_one_line_error(r, "group size 100")
    assert tree_hash(project) == before and sorted(p.name for p in tmp_path.iterdir()) == ["alien", "data"]


def _calib_with(tmp_path: Path, project: Path, lines: list[dict]) -> Path:
    shutil.copytree(project / "images", tmp_path / "images", dirs_exist_ok=True)
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot be decoded"), (b"not an image at all", "cannot be decoded")],
    ids=["zero-byte", "truncated-png", "text"],
)
def test_undecodable_image_names_its_line(project, tmp_path, content, reason):
    calib = _calib_with(tmp_path, project, [{"image": "images/img_0.png", "question": "q?", "answer": "a"},
                                            {"image": "images/img_1.png", "question": "q?", "answer": "a"},
                                            {"image": "images/bad.png", "question": "q?", "answer": "a"}])
    (tmp_path / "images" / "bad.png").write_bytes(content)
    t0 = time.perf_counter()
    r = tlq(*quantize_args(project, tmp_path / "o", calib=calib))
    assert_one_line_error(r, f"{calib}:3:", "bad.png", reason)
    assert time.perf_counter() - t0 < FAST_SECONDS


def test_damaged_model_dirs(project, tmp_path):
    bad_json = tmp_path / "bad_json"
    shutil.copytree(project / "model", bad_json)
    (bad_json / "config.json").write_text('{"model_type": "qwen2_vl", ')
    r = tlq(*quantize_args(project, tmp_path / "o", model=bad_json))
    assert_one_line_error(r, "config.json is not valid JSON")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(project / "model", no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    r = tlq(*quantize_args(project, tmp_path / "o", model=no_weights))
    assert_one_line_error(r, "no weight files")
    assert not (tmp_path / "o").exists()


def _model_with(project: Path, dest: Path, key_part: str, fill: float) -> str:
    """A copy of the model with one decoder weight's first row (a norm: all of it) set to ``fill``; returns its key."""
    shutil.copytree(project / "model", dest)
    (f,) = dest.glob("*.safetensors")
    state = load_file(f)
    key = next(k for k in sorted(state) if key_part in k and k.endswith(".weight"))
    state[key] = state[key].clone()
    state[key][0 if state[key].dim() == 2 else slice(None)] = fill
    save_file(state, f, metadata={"format": "pt"})
    return key


@pytest.mark.slow
def test_nan_weight_is_named_at_load_and_nothing_is_written(project, tmp_path):
    key = _model_with(project, tmp_path / "nan_model", "layers.1.mlp.down_proj", float("nan"))
    for method in ("rtn", "gptq"):
        r = tlq(*quantize_args(project, tmp_path / "o", model=tmp_path / "nan_model", method=method))
        line = assert_one_line_error(r, "non-finite", "layers.1.mlp.down_proj.weight", "damaged")
        assert key.split(".")[-2] in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nan_model"]  # no output, no resume state


@pytest.mark.slow
def test_float16_overflow_names_the_layer_and_suggests_bfloat16(project, tmp_path):
    """A weight that fp16 holds but whose activations overflow it (an RMSNorm gain of 60000: its output's
    largest channel exceeds 65504): caught in the layer, named, nothing written."""
    _model_with(project, tmp_path / "hot_model", "layers.0.input_layernorm", 60000.0)
    r = tlq(*quantize_args(project, tmp_path / "o", "--dtype", "float16", "--no-resume", model=tmp_path / "hot_model", method="awq"))
    assert_one_line_error(r, "non-finite", "layer 0", "bfloat16")
    # no scale search, no Hessian: the layer's output itself is where it shows
    r = tlq(*quantize_args(project, tmp_path / "o", "--dtype", "float16", model=tmp_path / "hot_model", method="rtn"))
    assert_one_line_error(r, "decoder layer 0: non-finite values in its output (FP stream)", "bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hot_model"]  # no output, no resume state


@pytest.mark.slow
def test_answers_cut_by_max_seq_len(project, tmp_path):
    long_q = "Please look very carefully at the picture. " * 30 + "What color is the square?"
    calib = _calib_with(tmp_path, project, [{"image": "images/img_0.png", "question": long_q, "answer": "red"}] * 2)
    r = tlq(*quantize_args(project, tmp_path / "o", "--max-seq-len", "64", calib=calib))
    assert_one_line_error(r, "every answer lies past --max-seq-len 64", "raise --max-seq-len")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_success_replaces_only_its_own_output_and_sweeps_leftovers(project, tmp_path):
    """Run twice into the same --out: the second replaces the first (said so), and what killed runs
    left beside it (staging dirs of dead processes, a stale resume dir) is gone afterwards."""
    out, report = tmp_path / "o", tmp_path / "reports" / "r.json"  # the report's folder does not exist yet
    before = tree_hash(project)
    r = tlq(*quantize_args(project, out, "--num-samples", "128", "--report", str(report)))
    assert r.returncode == 0, r.stderr
    assert "fewer than --num-samples 128" in r.stderr  # 6 samples exist
    assert (out / ".tlq-output.json").is_file() and json.loads(report.read_text())["num_samples"] == 6

    host = __import__("socket").gethostname()
    leftovers = [tmp_path / f".o.partial-{host}-999999999-dead0001", tmp_path / ".o.tmp-0123abcd",
                 tmp_path / f".o.old-{host}-999999999-dead0002"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    stale = tmp_path / ".o.tlq-resume"
    stale.mkdir()
    (stale / "state.json").write_text("{}")
    mine = tmp_path / ".o.partial-someone-else"  # not tlq's naming: never touched
    mine.mkdir()

    r = tlq(*quantize_args(project, out, "--no-resume"))  # the flag's name, not the API's keyword
    line = assert_one_line_error(r, "already exists", "pass --overwrite")
    assert "overwrite=True" not in line

    again = tlq(*quantize_args(project, out, "--overwrite", "--no-resume", "--report", str(report)))
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr and "replaced the earlier tlq output" in again.stderr
    assert not any(d.exists() for d in [*leftovers, stale]) and mine.is_dir()
    assert tree_hash(project) == before

    # A file the user later put into the output stays theirs: the marker lists only what tlq wrote.
    (out / "my_results.csv").write_text("1,2\n")
    kept = tree_hash(out)
    r = tlq(*quantize_args(project, out, "--overwrite"))
    assert_one_line_error(r, "holds files tlq did not write (my_results.csv)")
    assert tree_hash(out) == kept


@pytest.fixture(scope="module")
def quantized_out(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "q"
    r = tlq(*quantize_args(project, out, "--no-resume"))
    assert r.returncode == 0, r.stderr
    return out


def eval_args(project: Path, *quantized: Path, data: Path | None = None) -> list[str]:
    args = ["eval", "--model", str(project / "model"), "--data", str(data or project / "calib.jsonl"), "--quiet", "--num-samples", "2"]
    for q in quantized:
        args += ["--quantized", str(q)]
    return args


def test_eval_refuses_an_unquantized_or_foreign_checkpoint(project, quantized_out, tiny_vlm_dir, tmp_path):
    r = tlq(*eval_args(project, project / "model"))
    assert_one_line_error(r, "is the FP reference")
    copy = tmp_path / "fp_copy"
    shutil.copytree(project / "model", copy)
    r = tlq(*eval_args(project, copy))
    assert_one_line_error(r, "is not quantized", "--allow-unquantized")

    other = tmp_path / "other"  # a quantized checkpoint of a different (deeper) model
    shutil.copytree(quantized_out, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 12
    (other / "config.json").write_text(json.dumps(cfg))
    r = tlq(*eval_args(project, other))
    assert_one_line_error(r, "is not a quantization of --model", "num_hidden_layers 12 vs 2")


@pytest.mark.slow
def test_eval_warns_on_empty_answers_and_short_sets(project, quantized_out, tmp_path):
    data = _calib_with(tmp_path, project, [{"image": "images/img_0.png", "question": "What color?", "answer": ""},
                                           {"image": "images/img_1.png", "question": "What color?", "answer": "green"}])
    r = tlq(*eval_args(project, quantized_out, data=data)[:-2], "--num-samples", "5", "--quantized", str(quantized_out))
    assert r.returncode == 0, r.stderr
    assert "1 of 2 reference answers are empty" in r.stderr
    assert "fewer than --num-samples 5" in r.stderr


def test_read_only_parent_and_full_disk(project, tmp_path, monkeypatch):
    """Permission and space checks, in process (root ignores permission bits, and no disk can be filled
    here); the same functions run in the CLI before the model loads."""
    from tlq.preflight import check_quantize
    from tlq.config import SCHEMES
    from tlq.utils import outputs

    kw = {"overwrite": False, "scheme": SCHEMES["w4a16"], "num_samples": 2}
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    with pytest.raises(outputs.OutputError, match="is not writable"):
        check_quantize(project / "model", project / "calib.jsonl", tmp_path / "o", None, **kw)
    monkeypatch.undo()

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1000))
    with pytest.raises(outputs.OutputError, match="GiB free on its disk"):
        check_quantize(project / "model", project / "calib.jsonl", tmp_path / "o", None, **kw)


def test_interrupt_says_the_run_can_resume(monkeypatch, capsys):
    import tlq.api
    from tlq.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tlq.api, "quantize", interrupted)
    assert main(["quantize", "--model", "m", "--out", "o", "--quiet"]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert main(["quantize", "--model", "m", "--out", "o", "--quiet", "--no-resume"]) == 130
    assert "resume" not in capsys.readouterr().err


def test_system_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import tlq.api
    from tlq.cli import main

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", "/data/out")

    monkeypatch.setattr(tlq.api, "quantize", disk_full)
    assert main(["quantize", "--model", "m", "--out", "o", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tlq: error: No space left on device: '/data/out' (rerun with --debug for the traceback)"]
    with pytest.raises(OSError):
        main(["quantize", "--model", "m", "--out", "o", "--quiet", "--debug"])


def test_estimated_output_size_tracks_the_bits(project):
    from tlq.config import SCHEMES
    from tlq.models import adapter_for_dir
    from tlq.preflight import estimate_output_bytes

    ignore = adapter_for_dir(project / "model").spec.ignore
    w4 = estimate_output_bytes(project / "model", SCHEMES["w4a16"], ignore)
    w8 = estimate_output_bytes(project / "model", SCHEMES["w8a8"], ignore)
    source = sum(f.stat().st_size for f in (project / "model").glob("*.safetensors"))
    assert 0 < w4 < w8 < source * 1.1  # the tiny model is saved in float32, the export in 16-bit or less
