"""McNemar's exact paired test, and the accuracy benchmark's pairing of runs and validity bars."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tlq.eval.paired import flip_test, flips, mcnemar

def test_mcnemar_exact_values():
    t = mcnemar([True] * 10, [False] * 10)
    assert (t.wins, t.losses) == (10, 0) and t.p == pytest.approx(2 / 1024)
    t = mcnemar([True] * 7 + [False] * 3, [False] * 7 + [True] * 3)
    assert t.p == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)  # 2 * P(X <= 3), X ~ Bin(10, 1/2)
    same = mcnemar([True, False, True], [True, False, True])  # no discordant sample: no evidence
    assert (same.wins, same.losses, same.p) == (0, 0, 1.0)


def test_mcnemar_only_discordant_samples_count():
    # 1,000 shared right answers change nothing: 8 vs 2 discordant stays p = 0.109
    a = [True] * 1000 + [True] * 8 + [False] * 2
    b = [True] * 1000 + [False] * 8 + [True] * 2
    assert mcnemar(a, b).p == pytest.approx(mcnemar(a[1000:], b[1000:]).p) == pytest.approx(2 * 56 / 1024)
    with pytest.raises(ValueError, match="same samples"):
        mcnemar([True], [True, False])


def test_flips_count_changed_answers_both_ways_even_at_equal_accuracy():
    ref = [True, True, False, False, True]
    run = [False, True, True, False, True]  # one right -> wrong, one wrong -> right: same accuracy as ref
    f = flips(ref, run)
    assert (f.lost, f.gained, f.n) == (1, 1, 5) and f.share == pytest.approx(0.4)
    assert f.to_dict() == {"lost": 1, "gained": 1, "n": 5, "share": pytest.approx(0.4)}
    assert flips(ref, ref).share == 0.0
    with pytest.raises(ValueError, match="same samples"):
        flips(ref, run[:4])


def test_flip_test_pairs_keeping_the_reference_answer_not_being_right():
    ref = [True, False, False, True]
    a = [True, False, False, True]  # keeps every FP16 answer, two of them wrong
    b = [True, True, True, True]  # right everywhere: higher accuracy, but two flips
    t = flip_test(ref, a, b)
    assert (t.wins, t.losses) == (2, 0)
    assert mcnemar(a, b).losses == 2  # on accuracy the same pair goes the other way


def _cell(variant: str, scheme: str, runs: list[tuple[int, str]]) -> dict:
    accs = [r.count("1") / len(r) for _, r in runs]
    mean = sum(accs) / len(accs)
    return {"variant": variant, "scheme": scheme, "accuracy": {"mean": mean, "std": 0.0, "n": len(runs)},
            "kl": {"mean": 0.1, "std": 0.0, "n": len(runs)}, "runs": [{"seed": s, "correct": r} for s, r in runs]}


def test_runs_pair_by_seed_and_a_deterministic_run_pairs_with_every_seed(benchmark):
    acc = benchmark("accuracy")
    tlq = _cell("TLQ", "w3a16", [(0, "1100"), (1, "1110")])
    gptq = _cell("GPTQ", "w3a16", [(1, "0000"), (0, "1000")])
    t = acc.paired(tlq, gptq)  # seed 0: 1100 vs 1000 -> 1 win; seed 1: 1110 vs 0000 -> 3 wins
    assert (t["wins"], t["losses"]) == (4, 0)
    rtn = _cell("RTN", "w3a16", [(0, "0001")])
    t = acc.paired(tlq, rtn)  # RTN's one run against both TLQ seeds
    assert (t["wins"], t["losses"]) == (2 + 3, 1 + 1)


def test_summary_judges_tlq_against_its_own_ablation(benchmark):
    acc = benchmark("accuracy")
    cells = {f"w2a16/{c['variant']}": c for c in (
        _cell("TLQ", "w2a16", [(0, "1111"), (1, "1110")]),
        _cell("GPTQ", "w2a16", [(0, "0000"), (1, "0001")]),
        _cell("TLQ w/o token importance", "w2a16", [(0, "1100"), (1, "1100")]),
    )}
    s = acc.summary_rows({"cells": cells}, "w2a16")
    assert s["ablation"]["acc_win"] and not s["ablation"]["acc_loss"]  # 87.5% vs 50%, no seed spread
    assert (s["ablation"]["paired"]["wins"], s["ablation"]["paired"]["losses"]) == (3, 0)
    assert "TLQ ahead; 3/0" in acc._vs_ablation(s["ablation"])
    assert s["ablation"]["flips"] is None  # rows without FP16's per-sample answers: no flips
    del cells["w2a16/TLQ w/o token importance"]
    assert acc.summary_rows({"cells": cells}, "w2a16")["ablation"] is None and acc._vs_ablation(None) == "not run"


def test_flips_against_fp16_per_cell_paired_and_pooled_over_models(benchmark):
    acc = benchmark("accuracy")

    def model(tlq: list[tuple[int, str]], ablation: list[tuple[int, str]], fp: str) -> dict:
        cells = {f"w3a16/{c['variant']}": c for c in (_cell("TLQ", "w3a16", tlq), _cell(acc.ABLATION, "w3a16", ablation),
                                                      _cell("GPTQ", "w3a16", [(0, "0000"), (1, "0000")]))}
        return {"fp16": {"accuracy": fp.count("1") / len(fp), "correct": fp, "num_samples": len(fp)}, "cells": cells}

    # FP16 answers 1100. TLQ keeps it on both seeds; the ablation matches its accuracy with two flips per seed.
    a = model([(0, "1100"), (1, "1100")], [(0, "1010"), (1, "0110")], "1100")
    for c in a["cells"].values():
        c["retained_pct"] = {"mean": 100.0, "std": 0.0}
    f = acc.cell_flips(a["cells"]["w3a16/TLQ"], "1100")
    assert f["share"]["mean"] == 0.0 and (f["lost"], f["gained"]) == (0, 0)
    f = acc.cell_flips(a["cells"][f"w3a16/{acc.ABLATION}"], "1100")
    assert f["share"]["mean"] == pytest.approx(0.5) and (f["lost"], f["gained"]) == (2, 2)
    s = acc.summary_rows(a, "w3a16")["ablation"]
    assert (s["paired"]["wins"], s["paired"]["losses"]) == (2, 2)  # level in accuracy ...
    assert (s["flips"]["paired"]["wins"], s["flips"]["paired"]["losses"]) == (4, 0)  # ... not in FP16's answers
    assert "flips 0.00% / 50.00%, keeps FP16 4/0" in acc._vs_ablation(s)
    assert acc.summary_rows(a, "w3a16")["keeps_win"] is False  # GPTQ flips 2 answers per seed: 4 / 0, p = 0.125
    # a second model where the ablation keeps one answer TLQ flips: pooled over both, seeds paired per model
    b = model([(0, "0111"), (1, "0011")], [(0, "0011"), (1, "0011")], "0011")
    lines = acc.pooled_pair({"models": {"a": a, "b": b}})
    assert any(l.startswith("- w3a16: accuracy 3/2,") and "keeps FP16's answer 4/1," in l and "of 16 answers" in l for l in lines)
    assert not any("every scheme" in l for l in lines)  # one scheme: no second pooled line
    for rows in (a, b):  # the same cells again under a second scheme: the every-scheme line adds both
        rows["cells"].update({k.replace("w3a16", "w4a8"): dict(c, scheme="w4a8") for k, c in list(rows["cells"].items())})
    lines = acc.pooled_pair({"models": {"a": a, "b": b}})
    assert any(l.startswith("- every scheme: accuracy 6/4,") and "keeps FP16's answer 8/2," in l and "of 32 answers" in l for l in lines)
    md = acc.to_markdown({"command": "x", "machine": "m", "torch": "t", "finished": "f", "minutes": 0, "num_calib": 1,
                          "seeds": [0, 1], "num_test": 4, "models": {"a": a}})
    assert "| w3a16 | TLQ w/o token importance | 50.00 ± 0.00 |" in md and "| 50.00 ± 0.00 (-2 / +2) |" in md


def test_validity_bars_judge_fp16_and_baselines_only(benchmark):
    acc = benchmark("accuracy")
    n = 1000
    fp = {"accuracy": 0.85, "margin": {"share_below_1": 0.2}, "num_samples": n}
    cells = {
        "w3a16/GPTQ": _cell("GPTQ", "w3a16", [(0, "1" * 820 + "0" * 180)]),
        "w3a16/TLQ": _cell("TLQ", "w3a16", [(0, "1" * 850 + "0" * 150)]),  # never consulted
        "w4a8/AWQ": _cell("AWQ", "w4a8", [(0, "1" * 840 + "0" * 160)]),
    }
    bars = {bar.split(" at ")[-1] if "baseline" in bar else bar: ok for bar, _v, ok in
            acc.validity({"fp16": fp, "cells": cells, "relevant_token_share": 1 / 64}, n)}
    assert bars["w3a16"] is True  # 85 - 82 = 3 points
    assert bars["w4a8"] is False  # 85 - 84 = 1 point
    assert all(ok for bar, ok in bars.items() if bar not in ("w3a16", "w4a8"))


def test_ratio_upper_bound_matches_a_hand_computed_t_bound():
    from tlq.eval.paired import ratio_upper_bound

    ref = [1.0, 2.0, 4.0, 1.0]
    new = [2.0, 2.0, 2.0, 1.0]  # log ratios: ln2, 0, -ln2, 0 -> mean 0, sample std ln2 * sqrt(2/3)
    b = ratio_upper_bound(new, ref)
    std = math.log(2) * math.sqrt(2 / 3)
    assert b.n == 4 and b.geomean == pytest.approx(1.0)
    assert b.log_std == pytest.approx(std)
    assert b.upper == pytest.approx(math.exp(2.3533634 * std / 2), rel=1e-6)  # t_{0.95, 3} = 2.3534


def test_ratio_upper_bound_tightens_with_more_pairs_and_refuses_bad_input():
    from tlq.eval.paired import ratio_upper_bound

    few = ratio_upper_bound([1.1, 0.9, 1.2], [1.0, 1.0, 1.0])
    many = ratio_upper_bound([1.1, 0.9, 1.2] * 10, [1.0, 1.0, 1.0] * 10)
    assert many.geomean == pytest.approx(few.geomean) and many.upper < few.upper
    with pytest.raises(ValueError, match="positive"):
        ratio_upper_bound([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="two pairs"):
        ratio_upper_bound([1.0], [1.0])


def test_difference_lower_bound_matches_a_hand_computed_t_bound():
    from tlq.eval.paired import difference_lower_bound

    b = difference_lower_bound([0.71, 0.73, 0.70, 0.74], [0.72, 0.72, 0.72, 0.72])  # differences -1, +1, -2, +2 points
    std = math.sqrt((0.01**2 + 0.01**2 + 0.02**2 + 0.02**2) / 3)
    assert b.n == 4 and b.mean == pytest.approx(0.0, abs=1e-12) and b.std == pytest.approx(std)
    assert b.lower == pytest.approx(-2.3533634 * std / 2, rel=1e-6)
    with pytest.raises(ValueError, match="two pairs"):
        difference_lower_bound([0.7], [0.7])


def _accuracy_run(variants: dict[str, list[float]], acc: dict[str, float]) -> dict:
    """A benchmarks/accuracy.py JSON with one model and one scheme: per variant, KL per seed."""
    cells = {v: {"scheme": "w3a16", "variant": v, "accuracy": {"mean": acc[v]}, "runs": [{"seed": s, "kl": k, "accuracy": acc[v]} for s, k in enumerate(kls)]}
             for v, kls in variants.items()}
    return {"command": "x", "data": "val", "num_test": 300, "num_calib": 64, "models": {"m": {"cells": cells}}}


def test_noninferiority_decides_by_the_bound_the_cells_and_accuracy(benchmark):
    ni = benchmark("noninferiority")
    ref = [1e-4, 2e-4, 3e-4, 1e-4, 2e-4, 3e-4]
    same = ni.merged([_accuracy_run({"R": ref, "C": [k * 1.02 for k in ref]}, {"R": 0.9, "C": 0.9})])
    d = ni.decide(same, "C", "R", margin=1.25, max_cell=1.5, confidence=0.95)
    assert d["passed"] and d["bound"]["geomean"] == pytest.approx(1.02)
    worse = ni.merged([_accuracy_run({"R": ref, "C": [k * 1.4 for k in ref]}, {"R": 0.9, "C": 0.9})])
    assert not ni.decide(worse, "C", "R", 1.25, 1.5, 0.95)["passed"]  # bound above the margin
    lost = ni.merged([_accuracy_run({"R": ref, "C": ref}, {"R": 0.9, "C": 0.9 - 2 / 300})])
    d = ni.decide(lost, "C", "R", 1.25, 1.5, 0.95)
    assert not d["passed"] and d["cells"][0]["accuracy_gap_samples"] == pytest.approx(-2.0)
    # two processes of one run merge; a variant in both is refused
    two = ni.merged([_accuracy_run({"R": ref}, {"R": 0.9}), _accuracy_run({"C": ref}, {"C": 0.9})])
    assert ni.decide(two, "C", "R", 1.25, 1.5, 0.95)["passed"]
    with pytest.raises(SystemExit, match="more than one run"):
        ni.decide(ni.merged([_accuracy_run({"R": ref}, {"R": 0.9})] * 2), "C", "R", 1.25, 1.5, 0.95)


def test_noninferiority_accuracy_margin_judges_the_mean_difference_and_one_sided_cells(benchmark):
    """--accuracy-margin: a cell better by many samples passes, one worse by more than --accuracy-cell fails, and
    the pooled lower bound decides even where every cell is within its limit."""
    ni = benchmark("noninferiority")
    ref = [1e-4, 2e-4, 3e-4, 1e-4, 2e-4, 3e-4]

    def run(new_acc: list[float]) -> dict:
        r = ni.merged([_accuracy_run({"R": ref, "C": ref}, {"R": 0.9, "C": sum(new_acc) / len(new_acc)})])
        for cell in r["models"]["m"]["cells"]:
            if cell["variant"] == "C":
                for x, a in zip(cell["runs"], new_acc):
                    x["accuracy"] = a
        return r

    better = run([0.9 + 5 / 300] * 6)
    assert not ni.decide(better, "C", "R", 1.25, 1.5, 0.95)["passed"]  # rule 1 as before: within one sample either way
    d = ni.decide(better, "C", "R", 1.25, 1.5, 0.95, accuracy_margin=0.5, accuracy_cell=3)
    assert d["passed"] and d["accuracy_bound"]["mean"] == pytest.approx(5 / 300)
    worse_cell = run([0.9 - 4 / 300] * 6)
    assert not ni.decide(worse_cell, "C", "R", 1.25, 1.5, 0.95, accuracy_margin=5.0, accuracy_cell=3)["passed"]
    noisy = run([0.9 - 0.03, 0.9 + 0.03, 0.9 - 0.03, 0.9 + 0.03, 0.9 - 0.03, 0.9])  # cell mean -1/600: within 3 samples
    d = ni.decide(noisy, "C", "R", 1.25, 1.5, 0.95, accuracy_margin=0.5, accuracy_cell=3)
    assert d["cells"][0]["accuracy_ok"] and d["accuracy_bound"]["lower"] < -0.005 and not d["passed"]
    assert "lower bound" in "\n".join(ni.to_markdown({"command": "c", "run_command": "r", "decision": d}))


def _stub_accuracy_run(acc, monkeypatch, fp_accuracy: float) -> list[str]:
    """Replace what ``run_model`` loads, calibrates and scores with stand-ins; returns the log of
    calibrations, so a test sees which cells were measured and which were kept."""
    from types import SimpleNamespace

    calibrated: list[str] = []

    def score(name, *_a, **_k):
        accuracy = fp_accuracy if name == "fp16" else 0.5
        s = SimpleNamespace(accuracy=accuracy, nll=1.0, kl=0.1, correct_bits="10",
                            to_dict=lambda: {"accuracy": accuracy, "nll": 1.0, "num_samples": 2, "correct": "10"})
        return s, [torch.tensor([[0.0, -1.0]])]

    monkeypatch.setattr(acc, "resolve_model_dir", lambda ref: ref)
    monkeypatch.setattr(acc, "builtin_set", lambda mdir, split: split)
    monkeypatch.setattr(acc, "read_jsonl", lambda path: [])
    monkeypatch.setattr(acc, "relevant_share", lambda records: None)
    monkeypatch.setattr(acc, "load_model", lambda ref, device: (None, None, None, None, "cpu", None))
    monkeypatch.setattr(acc, "score_model", score)
    monkeypatch.setattr(acc, "calibrate", lambda ref, calib, cfg, progress: calibrated.append(cfg.method) or SimpleNamespace(model=None, token_set=None, result=SimpleNamespace(layers=[SimpleNamespace(rtn_fallback=["experts.3.down_proj"])])))
    return calibrated


def test_resume_keeps_the_earlier_cells_and_measures_only_the_rest(benchmark, monkeypatch, tmp_path):
    import argparse
    import json

    acc = benchmark("accuracy")
    calibrated = _stub_accuracy_run(acc, monkeypatch, fp_accuracy=0.75)
    args = argparse.Namespace(num_test=2, data="test", num_calib=4)
    first = acc.run_model("m", ["w3a16"], ["GPTQ"], [0], args)
    assert calibrated == ["gptq"]
    assert first["cells"]["w3a16/GPTQ"]["runs"][0]["rtn_fallback"] == 1  # the stand-in's one expert linear solved by RTN
    settings = {"num_calib": 4, "num_test": 2, "data": "test", "seeds": [0]}
    out = tmp_path / "table"
    out.with_suffix(".json").write_text(json.dumps({**settings, "finished": "x (partial)", "minutes": 1.0, "models": {"m": first}}))
    earlier = acc.earlier_rows(out, settings, "m")
    rows = acc.run_model("m", ["w3a16"], ["GPTQ", "RTN"], [0], args, earlier=earlier)
    assert calibrated == ["gptq", "rtn"]  # GPTQ was kept, only RTN measured
    assert rows["cells"]["w3a16/GPTQ"] == first["cells"]["w3a16/GPTQ"] and rows["resumed"]["cells"] == ["w3a16/GPTQ"]
    assert "1 cells were kept" in acc.to_markdown({**settings, "command": "c", "machine": "m", "torch": "t", "finished": "f", "minutes": 2.0, "models": {"m": rows}})
    with pytest.raises(SystemExit, match="seeds"):
        acc.earlier_rows(out, {**settings, "seeds": [0, 1]}, "m")
    _stub_accuracy_run(acc, monkeypatch, fp_accuracy=0.8)  # another model or samples: FP16 scores differ
    with pytest.raises(SystemExit, match="FP16 accuracy"):
        acc.run_model("m", ["w3a16"], ["GPTQ"], [0], args, earlier=acc.earlier_rows(out, settings, "m"))


@pytest.mark.slow
def test_resume_keeps_only_cells_whose_configuration_is_unchanged(benchmark, tmp_path, capsys, monkeypatch):
    """A variant's name can outlive its meaning (TLQ's preset changed its token set): --resume keeps a cell
    only when its recorded configuration digest matches what the name resolves to now, and remeasures it
    otherwise, so a resumed table never mixes presets under one name."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the generated val set stays in the test's directory
    acc = benchmark("accuracy")
    out = tmp_path / "run"
    argv = ["--models", "digits-qwen2vl", "--schemes", "w4a16", "--methods", "RTN,GPTQ", "--seeds", "0",
            "--num-calib", "4", "--num-test", "8", "--data", "val", "--out", str(out)]
    assert acc.main(argv) == 0
    first = json.loads(out.with_suffix(".json").read_text())["models"]["digits-qwen2vl"]["cells"]
    assert first["w4a16/GPTQ"]["config_sha256"] == acc.config_digest("w4a16", "GPTQ", 4)
    assert acc.config_digest("w4a16", "TLQ", 4) != acc.config_digest("w4a16", "TLQ before the 10% drawn set", 4)

    stale = json.loads(out.with_suffix(".json").read_text())
    stale["models"]["digits-qwen2vl"]["cells"]["w4a16/GPTQ"]["config_sha256"] = "0" * 64  # as if GPTQ's preset had changed
    stale["models"]["digits-qwen2vl"]["cells"]["w4a16/GPTQ"]["runs"][0]["seconds"] = -1.0  # marks the stale cell
    out.with_suffix(".json").write_text(json.dumps(stale))
    capsys.readouterr()
    assert acc.main([*argv, "--resume"]) == 0
    log = capsys.readouterr().out
    again = json.loads(out.with_suffix(".json").read_text())["models"]["digits-qwen2vl"]
    assert again["cells"]["w4a16/RTN"] == first["w4a16/RTN"]
    assert again["cells"]["w4a16/GPTQ"]["runs"][0]["seconds"] > 0  # measured again, not kept
    assert again["cells"]["w4a16/GPTQ"]["runs"][0]["correct"] == first["w4a16/GPTQ"]["runs"][0]["correct"]
    assert again["resumed"]["cells"] == ["w4a16/RTN"]
    assert "GPTQ                         measured again: its configuration changed" in log


def test_fresh_samples_follow_the_shipped_test_set(benchmark, monkeypatch, tmp_path):
    """--data fresh scores test-split samples from the shipped set's size on: generated by the model's
    recipe, so the same samples every time, and none of them one the test tables scored."""
    import tempfile

    from tlq.builtin import builtin_set, generator_config, resolve_model_dir
    from tlq.data import needle
    from tlq.data.records import read_jsonl

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the generated sets stay in the test's own directory

    acc = benchmark("accuracy")
    mdir = resolve_model_dir("builtin:needle-count-qwen2vl")
    fresh = acc.fresh_records(mdir, 3)
    recipe = json.loads((mdir / "sets.json").read_text())
    expected = needle.generate_samples("test", 3, generator_config(recipe), start=1000)
    text = [" ".join(str(m["content"]) for m in r.messages) for r in fresh]
    assert all(s.question in t and s.answer in t for s, t in zip(expected, text))
    assert [r.image.read_bytes() for r in fresh] == [r.image.read_bytes() for r in acc.fresh_records(mdir, 3)]  # the same every time
    shipped = read_jsonl(builtin_set(mdir, "test"))
    assert len(shipped) == 1000 and not {r.image.read_bytes() for r in fresh} & {r.image.read_bytes() for r in shipped}
    with pytest.raises(SystemExit, match="no recipe"):
        acc.fresh_records(resolve_model_dir("builtin:digits-qwen2vl"), 1)


def test_val_beyond_the_shipped_set_comes_from_the_recipe(benchmark, monkeypatch, tmp_path):
    """--data val --num-test N past the shipped 300: the first 300 are the shipped set's, the rest follow."""
    import tempfile

    from tlq.builtin import builtin_set, resolve_model_dir
    from tlq.data.records import read_jsonl

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    acc = benchmark("accuracy")
    mdir = resolve_model_dir("builtin:needle-count-qwen2vl")
    shipped = read_jsonl(builtin_set(mdir, "val"))
    longer = acc.val_records(mdir, len(shipped) + 2)
    assert len(longer) == len(shipped) + 2
    assert [r.image.read_bytes() for r in longer[-4:-2]] == [r.image.read_bytes() for r in shipped[-2:]]
    assert len({r.image.read_bytes() for r in longer}) == len(longer)  # the two new ones are new images
    assert len(acc.val_records(mdir, 5)) == 5


def test_pair_option_adds_pooled_lines_and_refuses_a_bad_pair(benchmark, tmp_path):
    acc = benchmark("accuracy")
    cells = {f"w2a16/{v}": dict(_cell(v, "w2a16", [(0, bits)]), retained_pct={"mean": 100.0, "std": 0.0})
             for v, bits in (("TLQ", "1100"), ("TLQ mix 0", "1000"))}
    report = {"command": "x", "machine": "m", "torch": "t", "finished": "f", "minutes": 0, "num_calib": 1, "seeds": [0],
              "num_test": 4, "models": {"m": {"fp16": {"accuracy": 0.5, "correct": "1100", "num_samples": 4}, "cells": cells}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    assert acc.main(["--render", str(path), "--pair", "TLQ mix 0,TLQ"]) == 0
    md = path.with_suffix(".md").read_text()
    assert "TLQ mix 0 against 'TLQ', every model pooled" in md and "- w2a16: accuracy 0/1, p=1; keeps FP16's answer 0/1," in md
    assert "scored on the first 4 samples of the model's val split" not in md  # data "test" by default
    # no baseline in the run: no summary table, but TLQ against its ablation still gets its pooled lines
    abl = dict(_cell(acc.ABLATION, "w2a16", [(0, "0100")]), retained_pct={"mean": 100.0, "std": 0.0})
    report["models"]["m"]["cells"][f"w2a16/{acc.ABLATION}"] = abl
    report["data"] = "fresh"
    md = acc.to_markdown(report)
    assert "TLQ against 'TLQ w/o token importance', every model pooled" in md and "fresh test-split samples" in md
    with pytest.raises(SystemExit, match="name two variants"):
        acc.main(["--render", str(path), "--pair", "TLQ"])


def test_flips_chart_draws_lost_and_gained_per_run(benchmark, tmp_path):
    chart = benchmark("flips_chart")
    cells = {"w3a16/TLQ": _cell("TLQ", "w3a16", [(0, "1100"), (1, "1101")]),
             "w3a16/RTN": _cell("RTN", "w3a16", [(0, "0011")]),
             "w4a8/TLQ": _cell("TLQ", "w4a8", [(0, "1100")])}
    report = {"models": {"m": {"fp16": {"accuracy": 0.5, "correct": "1100"}, "cells": cells}}}
    (title, bars), _ = chart.panels(report, None, None)
    assert "m, w3a16" in title and "4 samples" in title
    assert bars == [("TLQ", 0.0, 0.5), ("RTN", 2.0, 2.0)]  # TLQ: one gain over two seeds; RTN's one run as is
    assert [t for t, _ in chart.panels(report, ["w4a8"], None)] == ["m, w4a8 (FP16 50.0% on 4 samples)"]
    out = tmp_path / "flips.png"
    report_path = tmp_path / "r.json"
    report_path.write_text(json.dumps(report))
    assert chart.main([str(report_path), "--out", str(out), "--methods", "RTN"]) == 0
    from PIL import Image

    img = Image.open(out)
    assert img.size[0] > 500 and img.size[1] > 100
    del report["models"]["m"]["fp16"]["correct"]  # a report from before per-sample results: refused
    with pytest.raises(SystemExit, match="no cell"):
        chart.draw(chart.panels(report, None, None))
