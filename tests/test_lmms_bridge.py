"""The optional lmms-eval bridge of ``tlq eval --lmms-tasks``, tested without lmms-eval installed.

lmms-eval itself is replaced by a fake runner (or a fake ``lmms_eval`` package for the real subprocess
path) that writes results JSON in lmms-eval's real layout: ``OUTPUT/<model>/<date>_results.json`` with
``results[task]["<metric>,<filter>"]``, ``configs[task]["metric_list"]`` and ``higher_is_better``
(lmms_eval/evaluator.py, lmms_eval/evaluator_utils.py, lmms_eval/loggers/evaluation_tracker.py).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tlq.cli import main
from tlq.config import ConfigError
from tlq.eval import lmms
from tlq.eval.lmms import ProcessResult, evaluate_lmms, run_subprocess

W4A16 = {"num_bits": 4, "symmetric": True, "group_size": 128, "strategy": "group", "type": "int"}
W3A16 = {"num_bits": 3, "symmetric": False, "group_size": 128, "strategy": "group", "type": "int"}


def _checkpoint(root: Path, name: str, model_type: str = "qwen2_vl", weights: dict | None = None) -> Path:
    """A directory whose config.json is all the bridge reads (model_type, quantization_config)."""
    d = root / name
    d.mkdir(parents=True)
    cfg: dict[str, Any] = {"model_type": model_type}
    if weights is not None:
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                      "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def lmms_results(textvqa: float, mmmu: float, model_args: str) -> dict[str, Any]:
    """A results JSON as lmms-eval 0.7 writes it (trimmed: no samples, env info or task configs' prompts)."""
    return {
        "results": {
            "textvqa_val": {"alias": "textvqa_val", "exact_match,none": textvqa, "exact_match_stderr,none": 0.0051,
                            "samples": 5000, "submission,none": [], "submission_stderr,none": "N/A"},
            "mmmu_val": {"alias": "mmmu_val", "mmmu_acc,none": mmmu, "mmmu_acc_stderr,none": "N/A", "samples": 900},
        },
        "group_subtasks": {"mmmu_val": [], "textvqa_val": []},
        "configs": {
            "mmmu_val": {"task": "mmmu_val", "metric_list": [{"metric": "mmmu_acc", "aggregation": "<function mmmu_aggregate_results>", "higher_is_better": True}]},
            "textvqa_val": {"task": "textvqa_val", "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True, "ignore_punctuation": True},
                {"metric": "submission", "aggregation": "<function textvqa_aggregate_submissions>", "higher_is_better": True}]},
        },
        "versions": {"mmmu_val": 0.0, "textvqa_val": "Yaml"},
        "n-shot": {"mmmu_val": 0, "textvqa_val": 0},
        "higher_is_better": {"mmmu_val": {"mmmu_acc": True}, "textvqa_val": {"exact_match": True, "submission": True}},
        "n-samples": {"mmmu_val": {"original": 900, "effective": 5}, "textvqa_val": {"original": 5000, "effective": 5}},
        "config": {"model": "qwen2_vl", "model_args": model_args, "batch_size": "1", "batch_sizes": [], "device": None, "limit": 5.0},
        "lmms_eval_version": "0.7.2",
        "task_hashes": {},
        "model_name": model_args.split(",")[0].split("=", 1)[1],
        "date": "20260806_101500",
    }


class FakeLmmsEval:
    """Records each command and writes the results file where lmms-eval would, with preset scores."""

    def __init__(self, scores: dict[str, tuple[float, float]], returncode: int = 0, write: bool = True) -> None:
        self.scores = scores  # checkpoint directory name -> (textvqa exact_match, mmmu_acc)
        self.returncode, self.write = returncode, write
        self.commands: list[list[str]] = []

    def __call__(self, cmd: list[str]) -> ProcessResult:
        self.commands.append(cmd)
        args = dict(zip(cmd[3::2], cmd[4::2]))  # after "python -m lmms_eval", flags come in pairs
        pretrained = Path(args["--model_args"].split(",")[0].removeprefix("pretrained="))
        if self.write:
            out = Path(args["--output_path"]) / f"{pretrained.parent.name}__{pretrained.name}"
            out.mkdir(parents=True)
            results = lmms_results(*self.scores[pretrained.name], args["--model_args"])
            (out / "20260806_101500_results.json").write_text(json.dumps(results, indent=2))
        return ProcessResult(self.returncode, "Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")


@pytest.fixture
def ckpts(tmp_path: Path) -> dict[str, Path]:
    return {"fp": _checkpoint(tmp_path, "fp16"), "w4": _checkpoint(tmp_path, "w4a16", weights=W4A16),
            "w8": _checkpoint(tmp_path, "w8a8", weights={**W4A16, "num_bits": 8, "strategy": "channel"})}


def test_missing_lmms_eval_is_a_clear_config_error(ckpts, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # importlib.util.find_spec -> None: "not installed"
    with pytest.raises(ConfigError, match=r"pip install 'tlq\[lmms\]'"):
        evaluate_lmms(ckpts["fp"], [ckpts["w4"]], "textvqa_val")


def test_missing_lmms_eval_through_the_cli_is_one_line(ckpts, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    rc = main(["eval", "--model", str(ckpts["fp"]), "--quantized", str(ckpts["w4"]), "--lmms-tasks", "textvqa_val"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'tlq[lmms]'" in err[0]


def test_builtin_model_is_refused(ckpts):
    runner = FakeLmmsEval({})
    with pytest.raises(ConfigError, match="built-in demo model.*local Hugging Face checkpoint"):
        evaluate_lmms("builtin:digits-qwen2vl", [ckpts["w4"]], "textvqa_val", runner=runner)
    assert runner.commands == []


@pytest.mark.parametrize(("family", "expected"), [("qwen2_vl", "qwen2_vl"), ("qwen2_5_vl", "qwen2_5_vl"), ("llava_onevision", "llava_hf")])
def test_model_name_comes_from_the_family(tmp_path, family, expected):
    fp, q = _checkpoint(tmp_path, "fp16", family), _checkpoint(tmp_path, "q", family, W4A16)
    runner = FakeLmmsEval({"fp16": (0.5, 0.4), "q": (0.5, 0.4)})
    result = evaluate_lmms(fp, [q], "textvqa_val", runner=runner)
    assert result["lmms_model"] == expected
    assert all(cmd[cmd.index("--model") + 1] == expected for cmd in runner.commands)


def test_commands_and_comparison(ckpts, tmp_path):
    runner = FakeLmmsEval({"fp16": (0.80, 0.50), "w4a16": (0.76, 0.45), "w8a8": (0.80, 0.55)})
    report = tmp_path / "eval.json"
    result = evaluate_lmms(ckpts["fp"], [ckpts["w4"], ckpts["w8"]], " textvqa_val, mmmu_val ", model_args="max_pixels=1003520",
                           limit=5, report_path=report, runner=runner, progress=False)

    assert len(runner.commands) == 3  # one lmms-eval run per checkpoint, FP16 first
    for cmd, d in zip(runner.commands, (ckpts["fp"], ckpts["w4"], ckpts["w8"])):
        assert cmd[:3] == [sys.executable, "-m", "lmms_eval"]
        flags = dict(zip(cmd[3::2], cmd[4::2]))
        assert flags["--model"] == "qwen2_vl"
        assert flags["--model_args"] == f"pretrained={d.resolve()},max_pixels=1003520"
        assert flags["--tasks"] == "textvqa_val,mmmu_val"
        assert flags["--batch_size"] == "1" and flags["--limit"] == "5" and "--device" not in flags
    assert len({c[c.index("--output_path") + 1] for c in runner.commands}) == 3  # a fresh output directory per run

    rows = {r["task"]: r for r in result["comparison"]}
    assert list(rows) == ["textvqa_val", "mmmu_val"]
    tv = rows["textvqa_val"]
    assert tv["metric"] == "exact_match,none" and tv["higher_is_better"] and tv["fp16"] == 0.80  # not the submission metric
    assert [q["name"] for q in tv["quantized"]] == [str(ckpts["w4"]), str(ckpts["w8"])]
    assert tv["quantized"][0]["score"] == 0.76 and tv["quantized"][0]["retained_pct"] == pytest.approx(95.0)
    assert tv["quantized"][1]["retained_pct"] == pytest.approx(100.0)
    mm = rows["mmmu_val"]
    assert mm["metric"] == "mmmu_acc,none"
    assert [q["retained_pct"] for q in mm["quantized"]] == pytest.approx([90.0, 110.0])
    assert [r["name"] for r in result["runs"]] == ["fp16", str(ckpts["w4"]), str(ckpts["w8"])]
    assert result["runs"][0]["lmms_eval_version"] == "0.7.2"

    saved = json.loads(report.read_text())
    assert saved["lmms"]["comparison"] == result["comparison"]


def test_lower_is_better_and_scoreless_entries(ckpts):
    """No ratio for a lower-is-better metric; an entry without a numeric score (a group) is not compared."""

    def runner(cmd: list[str]) -> ProcessResult:
        flags = dict(zip(cmd[3::2], cmd[4::2]))
        value = 2.0 if "fp16" in flags["--model_args"] else 2.5
        res = {"results": {"grp": {"alias": "grp"}, "ppl_task": {"alias": " - ppl_task", "perplexity,none": value, "samples": 10}},
               "configs": {"ppl_task": {"metric_list": [{"metric": "perplexity"}]}},
               "higher_is_better": {"ppl_task": {"perplexity": False}}}
        out = Path(flags["--output_path"]) / "m"
        out.mkdir(parents=True)
        (out / "20260806_101500_results.json").write_text(json.dumps(res))
        return ProcessResult(0, "")

    result = evaluate_lmms(ckpts["fp"], [ckpts["w4"]], "grp", runner=runner)
    [row] = result["comparison"]
    assert row["task"] == "ppl_task" and not row["higher_is_better"]
    assert row["quantized"][0]["score"] == 2.5 and row["quantized"][0]["retained_pct"] is None


def test_failed_run_names_the_command_and_its_output(ckpts):
    with pytest.raises(ConfigError) as exc:
        evaluate_lmms(ckpts["fp"], [ckpts["w4"]], "textvqa_val", runner=FakeLmmsEval({}, returncode=1, write=False))
    msg = str(exc.value)
    assert "exited with code 1" in msg and "-m lmms_eval --model qwen2_vl" in msg and "CUDA out of memory" in msg


def test_exit_zero_without_results_is_a_failure(ckpts):
    """lmms-eval catches evaluation errors and exits 0; the missing results file gives it away."""
    with pytest.raises(ConfigError, match=r"wrote no new \*_results.json(.|\n)*CUDA out of memory"):
        evaluate_lmms(ckpts["fp"], [ckpts["w4"]], "textvqa_val", runner=FakeLmmsEval({}, write=False))


def test_w3a16_is_refused_before_any_run(ckpts, tmp_path):
    w3 = _checkpoint(tmp_path, "w3a16", weights=W3A16)
    runner = FakeLmmsEval({"fp16": (0.8, 0.5), "w3a16": (0.7, 0.4)})
    with pytest.raises(ConfigError, match=r"dequantize=True.*tlq eval --data"):
        evaluate_lmms(ckpts["fp"], [w3], "textvqa_val", runner=runner)
    assert runner.commands == []
    # naming the lmms-eval model leaves the loader (and the refusal) to the user
    result = evaluate_lmms(ckpts["fp"], [w3], "textvqa_val", lmms_model="my_plugin_model", runner=runner)
    assert result["lmms_model"] == "my_plugin_model" and runner.commands[0][4] == "my_plugin_model"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tasks": " , "}, "--lmms-tasks is empty"),
    ({"model_args": "pretrained=/elsewhere"}, "must not set pretrained="),
    ({"quantized": []}, "at least one --quantized"),
])
def test_bad_arguments(ckpts, kwargs, match):
    args = {"model": ckpts["fp"], "quantized": [ckpts["w4"]], "tasks": "textvqa_val", **kwargs}
    with pytest.raises(ConfigError, match=match):
        evaluate_lmms(args.pop("model"), args.pop("quantized"), args.pop("tasks"), runner=FakeLmmsEval({}), **args)


def test_existing_report_is_refused_before_any_run(ckpts, tmp_path):
    report = tmp_path / "eval.json"
    report.write_text("{}")
    runner = FakeLmmsEval({"fp16": (0.8, 0.5), "w4a16": (0.7, 0.4)})
    with pytest.raises(ConfigError, match="--overwrite"):
        evaluate_lmms(ckpts["fp"], [ckpts["w4"]], "textvqa_val", report_path=report, runner=runner)
    assert runner.commands == [] and report.read_text() == "{}"


def test_real_subprocess_against_a_fake_lmms_eval_package(ckpts, tmp_path, monkeypatch):
    """The default runner end to end: ``python -m lmms_eval`` resolves to a stand-in package."""
    pkg = tmp_path / "site" / "lmms_eval"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "template.json").write_text(json.dumps(lmms_results(0.0, 0.0, "pretrained=x")))
    (pkg / "__main__.py").write_text(textwrap.dedent("""
        import json, sys
        from pathlib import Path
        args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
        pretrained = Path(args["--model_args"].split(",")[0].split("=", 1)[1])
        score = {"fp16": 0.5}.get(pretrained.name, 0.25)
        res = json.loads((Path(__file__).parent / "template.json").read_text())
        res["results"]["textvqa_val"]["exact_match,none"] = score
        out = Path(args["--output_path"]) / pretrained.name
        out.mkdir(parents=True)
        (out / "20260806_101500_results.json").write_text(json.dumps(res))
        print("progress |####| 5/5")
    """))
    monkeypatch.syspath_prepend(str(pkg.parent))  # for the importability check
    monkeypatch.setenv("PYTHONPATH", str(pkg.parent))  # for the child process
    result = evaluate_lmms(ckpts["fp"], [ckpts["w4"]], "textvqa_val", output_dir=tmp_path / "lmms-out", progress=False)
    tv = next(r for r in result["comparison"] if r["task"] == "textvqa_val")
    assert tv["fp16"] == 0.5 and tv["quantized"][0]["retained_pct"] == pytest.approx(50.0)
    assert Path(result["runs"][1]["results_file"]).is_file()  # kept under output_dir


def test_run_subprocess_keeps_the_output_tail():
    res = run_subprocess([sys.executable, "-c", "import sys; print('x' * 10000); print('the end'); sys.exit(3)"], echo=False)
    assert res.returncode == 3 and res.output_tail.rstrip().endswith("the end") and len(res.output_tail) <= 4000


# ----------------------------------------------------------------------------- CLI plumbing


def _canned_result(model: str, quantized: list[str]) -> dict[str, Any]:
    return {"model": model, "lmms_model": "qwen2_vl", "tasks": ["textvqa_val"], "limit": 5,
            "runs": [{"name": "fp16"}] + [{"name": q} for q in quantized],
            "comparison": [{"task": "textvqa_val", "metric": "exact_match,none", "higher_is_better": True, "fp16": 0.8,
                            "quantized": [{"name": q, "score": 0.76, "retained_pct": 95.0} for q in quantized]}]}


def test_cli_lmms_tasks_plumbing(monkeypatch, capsys, tmp_path):
    calls: list[tuple[tuple, dict]] = []

    def fake(model, quantized, tasks, **kwargs):
        calls.append(((model, quantized, tasks), kwargs))
        return _canned_result(model, quantized)

    monkeypatch.setattr(lmms, "evaluate_lmms", fake)
    report = tmp_path / "r.json"
    rc = main(["eval", "--model", "/m/fp", "--quantized", "/m/q4", "--quantized", "/m/q8", "--lmms-tasks", "textvqa_val,mmmu_val",
               "--lmms-model", "qwen2_5_vl", "--lmms-args", "max_pixels=1003520", "--num-samples", "5", "--device", "cuda:1",
               "--report", str(report), "--overwrite", "--quiet"])
    assert rc == 0
    [(args, kwargs)] = calls
    assert args == ("/m/fp", ["/m/q4", "/m/q8"], "textvqa_val,mmmu_val")
    assert kwargs == {"lmms_model": "qwen2_5_vl", "model_args": "max_pixels=1003520", "limit": 5, "device": "cuda:1",
                      "report_path": str(report), "overwrite": True, "progress": False}
    out = capsys.readouterr().out
    assert "textvqa_val" in out and "95.0%" in out and "q8" in out


def test_cli_lmms_defaults(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(lmms, "evaluate_lmms", lambda m, q, t, **kw: calls.append(kw) or _canned_result(m, q))
    assert main(["eval", "--model", "/m/fp", "--quantized", "/m/q4", "--lmms-tasks", "textvqa_val"]) == 0
    assert calls == [{"lmms_model": None, "model_args": None, "limit": None, "device": None, "report_path": None, "overwrite": False, "progress": True}]


@pytest.mark.parametrize("extra", [["--data", "test.jsonl"], ["--dtype", "float16"]])
def test_cli_lmms_rejects_builtin_scoring_options(monkeypatch, capsys, extra):
    monkeypatch.setattr(lmms, "evaluate_lmms", lambda *a, **k: pytest.fail("must not run"))
    rc = main(["eval", "--model", "/m/fp", "--quantized", "/m/q4", "--lmms-tasks", "textvqa_val", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--lmms-args" in err[0]
