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
    # flips: answers right in FP16 and wrong here (lost) or the reverse (gained), counted from the same bits
    fp_bits = res["fp16"]["correct"]
    for score in (gentle, harsh):
        lost = sum(f == "1" and q == "0" for f, q in zip(fp_bits, score["correct"]))
        gained = sum(f == "0" and q == "1" for f, q in zip(fp_bits, score["correct"]))
        assert (score["flips"]["lost"], score["flips"]["gained"], score["flips"]["n"]) == (lost, gained, 6)
        assert score["flips"]["share"] == pytest.approx((lost + gained) / 6)
        assert score["accuracy"] == pytest.approx(res["fp16"]["accuracy"] + (gained - lost) / 6)
    assert res["fp16"]["flips"] is None and "flips vs FP16" in table
    keep = pair["keeps_fp16"]
    only_gentle = sum(f == g != h for f, g, h in zip(fp_bits, gentle["correct"], harsh["correct"]))
    only_harsh = sum(f == h != g for f, g, h in zip(fp_bits, gentle["correct"], harsh["correct"]))
    assert (keep["wins"], keep["losses"]) == (only_gentle, only_harsh) and "keeps FP16's right/wrong answer" in table


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


def _score_both_ways(ref: str, n: int, monkeypatch) -> tuple:
    """Score ``n`` test samples of a built-in model with the teacher-forcing shortcut and without it;
    returns both scores and how often each called ``generate``."""
    import tlq.eval.vqa as vqa
    from tlq.api import load_model
    from tlq.builtin import builtin_set, resolve_model_dir
    from tlq.data.records import choose, read_jsonl

    records = choose(read_jsonl(builtin_set(resolve_model_dir(ref), "test")), n, seed=0)
    adapter, model, processor, _d, dev, _dt = load_model(ref, device="cpu")
    calls = {"n": 0}
    real = vqa.greedy_answer

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(vqa, "greedy_answer", counted)
    fast, _ = vqa.score_model("fp16", model, processor, adapter, records, dev, vqa.EvalConfig(), progress=False)
    fast_calls, calls["n"] = calls["n"], 0
    monkeypatch.setattr(vqa, "greedy_from_teacher_forcing", lambda *a, **k: None)
    slow, _ = vqa.score_model("fp16", model, processor, adapter, records, dev, vqa.EvalConfig(), progress=False)
    return fast, slow, fast_calls, calls["n"]


@pytest.mark.parametrize("ref", ["builtin:digits-qwen2vl", "builtin:needle-count-llavaov"])
def test_teacher_forcing_shortcut_predicts_what_generate_does(ref, monkeypatch):
    """A right answer is read off the teacher-forced forward instead of generated: the predictions, the
    right/wrong bits and the NLL are those of generating every answer, and only wrong answers generate."""
    fast, slow, fast_calls, slow_calls = _score_both_ways(ref, 24, monkeypatch)
    assert fast.predictions == slow.predictions and fast.correct == slow.correct and fast.nll == slow.nll
    assert slow_calls == 24 and fast_calls == 24 - sum(fast.correct) < 24


def test_teacher_forcing_shortcut_declines_what_it_cannot_know():
    import torch

    from tlq.data.records import CalibRecord
    from tlq.eval.vqa import greedy_from_teacher_forcing

    one = CalibRecord(image=None, messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "7"}], line=1)
    lp = torch.log_softmax(torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]]), dim=-1)  # arg-max: 1, then 2
    pos, eos = torch.tensor([4, 5]), {2}
    assert greedy_from_teacher_forcing(lp, torch.tensor([1, 2]), pos, one, eos, 8).tolist() == [1, 2]
    assert greedy_from_teacher_forcing(lp, torch.tensor([0, 2]), pos, one, eos, 8) is None  # not the arg-max
    assert greedy_from_teacher_forcing(lp, torch.tensor([1, 2]), pos, one, {1}, 8) is None  # generation would go on
    assert greedy_from_teacher_forcing(lp, torch.tensor([1, 2]), pos, one, eos, 1) is None  # cut by max_new_tokens
    assert greedy_from_teacher_forcing(lp, torch.tensor([1, 2]), torch.tensor([4, 6]), one, eos, 8) is None  # a gap
    two = CalibRecord(image=None, messages=one.messages * 2, line=2)
    assert greedy_from_teacher_forcing(lp, torch.tensor([1, 2]), pos, two, eos, 8) is None  # greedy answers the first only


def test_teacher_forcing_shortcut_is_off_when_greedy_is_more_than_the_arg_max():
    """A released model's repetition penalty (or banned tokens, beams...) changes what greedy decoding
    picks: then every sample is generated."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from tlq.eval.vqa import shortcut_eos_ids

    plain = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[5, 7], repetition_penalty=1.0, suppress_tokens=[]))
    assert shortcut_eos_ids(plain) == {5, 7}
    for setting in ({"repetition_penalty": 1.05}, {"min_new_tokens": 2}, {"suppress_tokens": [3]}, {"num_beams": 4}):
        assert shortcut_eos_ids(SimpleNamespace(generation_config=GenerationConfig(eos_token_id=5, **setting))) == set()
    assert shortcut_eos_ids(SimpleNamespace()) == set()
