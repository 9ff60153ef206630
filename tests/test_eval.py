"""``tlq eval``: FP16 and quantized checkpoints side by side on one VQA set, in one run."""

from __future__ import annotations

import json

import pytest

from tlq.cli import main
from tlq.eval.vqa import normalize_answer


@pytest.fixture(scope="module")
def exports(tiny_vlm_dir, tiny_calib_jsonl, tmp_path_factory):
    """A gentle (w8a8) and a harsh (w3a16 RTN) export of the same tiny model."""
    root = tmp_path_factory.mktemp("eval_exports")
    model = tiny_vlm_dir("qwen2_vl")
    outs = {}
    for scheme, method in (("w8a8", "gptq"), ("w3a16", "rtn")):
        out = root / scheme
        assert main(["quantize", "--model", str(model), "--calib", str(tiny_calib_jsonl), "--out", str(out),
                     "--scheme", scheme, "--method", method, "--quiet", "--no-resume"]) == 0
        outs[scheme] = out
    return model, outs


def test_eval_reports_fp16_and_every_quantized_model(exports, tiny_calib_jsonl, tmp_path, capsys):
    model, outs = exports
    report = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(model), "--quantized", str(outs["w8a8"]), "--quantized", str(outs["w3a16"]),
               "--data", str(tiny_calib_jsonl), "--report", str(report), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "FP16" in table and "w8a8" in table and "w3a16" in table
    res = json.loads(report.read_text())
    for key in ("accuracy", "nll"):
        assert key in res["fp16"] and key in res["quantized"]
    assert 0.0 <= res["fp16"]["accuracy"] <= 1.0 and 0.0 <= res["quantized"]["accuracy"] <= 1.0
    assert res["num_samples"] == 6 and len(res["comparisons"]) == 2
    gentle, harsh = res["comparisons"]
    assert res["kl"] == gentle["kl"] and res["quantized"]["name"] == str(outs["w8a8"])
    # 8-bit barely moves the distribution; 3-bit RTN moves it far more
    assert 0.0 <= gentle["kl"] < harsh["kl"]
    assert abs(gentle["nll"] - res["fp16"]["nll"]) < abs(harsh["nll"] - res["fp16"]["nll"])
    # per-sample results agree with the accuracy, and the pair gets McNemar's test on them
    for score in (res["fp16"], gentle, harsh):
        assert len(score["correct"]) == 6 and score["correct"].count("1") == round(6 * score["accuracy"])
    (pair,) = res["paired"]
    wins = sum(a == "1" and b == "0" for a, b in zip(gentle["correct"], harsh["correct"]))
    losses = sum(a == "0" and b == "1" for a, b in zip(gentle["correct"], harsh["correct"]))
    assert (pair["first"], pair["wins"], pair["losses"]) == (str(outs["w8a8"]), wins, losses) and 0 < pair["p"] <= 1
    assert "paired (McNemar" in table


def test_eval_of_an_unquantized_copy_has_zero_kl(exports, tiny_calib_jsonl, tmp_path):
    """The reference against itself: KL 0, NLL and accuracy identical (the metric is not biased)."""
    model, _ = exports
    report = tmp_path / "self.json"
    assert main(["eval", "--model", str(model), "--quantized", str(model), "--data", str(tiny_calib_jsonl),
                 "--report", str(report), "--quiet", "--allow-unquantized"]) == 0  # on purpose (refused without)
    res = json.loads(report.read_text())
    assert res["kl"] == pytest.approx(0.0, abs=1e-6)
    assert res["quantized"]["nll"] == pytest.approx(res["fp16"]["nll"], rel=1e-6)
    assert res["quantized"]["accuracy"] == res["fp16"]["accuracy"]


def test_eval_bad_quantized_dir_is_one_line(exports, tiny_calib_jsonl, tmp_path, capsys):
    model, _ = exports
    capsys.readouterr()
    rc = main(["eval", "--model", str(model), "--quantized", str(tmp_path / "nope"), "--data", str(tiny_calib_jsonl), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a checkpoint directory" in err[0]


@pytest.mark.parametrize(("pred", "ref", "same"), [("7.", "7", True), (" Yes ", "yes", True), ("1 3", "13", False)])
def test_normalize_answer(pred, ref, same):
    assert (normalize_answer(pred) == normalize_answer(ref)) is same
