"""The accuracy table: every method x scheme on the built-in models, side by side with FP16, in one run.

    python benchmarks/accuracy.py                       # the full table (docs/accuracy.md + .json)
    python benchmarks/accuracy.py --models digits-qwen2vl --schemes w3a16 --methods rtn,tlq --seeds 0

Each (model, scheme, method, seed) is calibrated in memory on the model's own calibration set (``seed``
draws the calibration subset) and scored on the model's test set by the same functions ``tlq eval`` uses
(exact-match accuracy, answer NLL, KL to FP16). In-memory scoring equals scoring the exported
checkpoint: tests/test_cli.py checks that reloaded logits match the in-memory model's. The FP16
reference runs once per model in the same process, on the same samples.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import torch

from tlq.api import build_config, calibrate, load_model
from tlq.builtin import builtin_set, resolve_model_dir
from tlq.config import ActQuantSpec, QuantizeConfig, QuantScheme, WeightQuantSpec
from tlq.data.records import choose, read_jsonl
from tlq.engine import smoothing
from tlq.engine.checkpoint import run_fingerprint
from tlq.engine.layerwise import count_rtn_fallbacks
from tlq.eval.paired import flip_test, flips, mcnemar
from tlq.eval.vqa import EvalConfig, score_model
from tlq.utils.io import atomic_write_json, atomic_write_text

# Methods and ablations: name -> (method preset, overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "RTN": ("rtn", {}),
    "SmoothQuant": ("smoothquant", {}),
    "AWQ": ("awq", {}),
    "GPTQ": ("gptq", {}),
    "MBQ": ("mbq", {}),
    "TLQ": ("tlq", {}),
    "TLQ w/o scale search": ("tlq", {"scale_search": "none"}),
    "TLQ w/o token importance": ("tlq", {"weighting": "uniform", "token_select": False}),
    "TLQ w/o token selection": ("tlq", {"token_select": False}),
    "TLQ w/o quantized inputs": ("tlq", {"quantized_inputs": False}),
    "TLQ layer-output importance": ("tlq", {"grad_at": "output"}),
    "TLQ w/o FP target": ("tlq", {"gptq_target": "quantized"}),
}
TABLE_VARIANTS = tuple(VARIANTS)
# Settings of the token-weight integration and of the token budget, compared on the held-out val split
# (``--data val``) to choose the defaults; "importance" entries override ImportanceConfig fields.
VARIANTS.update({
    # ranked sets (what "tokens" meant while the preset ranked, before the 10% drawn set)
    "TLQ 75% tokens": ("tlq", {"token_fraction": 0.75, "token_rank": "importance"}),
    "TLQ 90% tokens": ("tlq", {"token_fraction": 0.9, "token_rank": "importance"}),
    "TLQ 25% tokens": ("tlq", {"token_fraction": 0.25, "token_rank": "importance"}),
    "TLQ mix 0.7": ("tlq", {"importance": {"modality_mix": 0.7}}),
    "TLQ mix 0": ("tlq", {"importance": {"modality_mix": 0.0}}),  # pure token weights (and draw chances)
    "TLQ mix 0.7 (all tokens)": ("tlq", {"importance": {"modality_mix": 0.7}, "token_select": False}),
    "TLQ mix 0 (all tokens)": ("tlq", {"importance": {"modality_mix": 0.0}, "token_select": False}),
    "TLQ |g| (all tokens)": ("tlq", {"importance": {"kind": "grad"}, "token_select": False}),
    "TLQ one weight per token (all tokens)": ("tlq", {"importance": {"per_layer": False}, "token_select": False}),
    "TLQ modality weights (all tokens)": ("tlq", {"weighting": "modality", "token_select": False}),
    "TLQ with input gradients": ("tlq", {"grad_at": "input"}),
    "TLQ per-linear importance": ("tlq", {"grad_at": "linear"}),
    "TLQ per-linear importance (all tokens)": ("tlq", {"grad_at": "linear", "token_select": False}),
    "TLQ layer-output importance (all tokens)": ("tlq", {"grad_at": "output", "token_select": False}),
    # QIG's token weights (integrated gradients of each layer's rounding error) in TLQ's place
    "TLQ with QIG weights (all tokens)": ("tlq", {"weighting": "integrated", "token_select": False}),
    # each sample's weights scaled by its answer's softmax curvature (near-ties count more than sure answers)
    "TLQ with curvature sample weights": ("tlq", {"sample_weights": "curvature"}),
    # importance where TLQ's pipeline has accuracy to gain: GPTQ toward the FP target without the scale search
    "TLQ w/o scale search (all tokens)": ("tlq", {"scale_search": "none", "token_select": False}),
    "TLQ w/o scale search or token importance": ("tlq", {"scale_search": "none", "weighting": "uniform", "token_select": False}),
    "TLQ w/o scale search (sampled tokens)": ("tlq", {"scale_search": "none", "token_rank": "sampled", "token_fraction": 0.5}),
    "TLQ w/o scale search (10% sampled tokens)": ("tlq", {"scale_search": "none", "token_rank": "sampled", "token_fraction": 0.1}),
    # the earlier preset's 50% budget drawn in proportion to importance, and that draw with a layer's rows coupled
    "TLQ sampled tokens": ("tlq", {"token_rank": "sampled", "token_fraction": 0.5}),
    "TLQ coupled tokens": ("tlq", {"token_rank": "coupled", "token_fraction": 0.5}),
    # a compact drawn set, floor kept: the candidate that became TLQ's preset (docs/methods.md, "A 10% drawn token set")
    "TLQ 10% sampled tokens": ("tlq", {"token_fraction": 0.1, "token_rank": "sampled"}),
    "TLQ before the 10% drawn set": ("tlq", {"token_fraction": 0.5, "token_rank": "importance"}),  # the preset it replaced
    # what ranking tokens by importance buys at a tight budget: importance-ranked sets against seeded random
    # subsets of the same size, with and without importance weights, a draw in proportion to the weights,
    # and that draw with a layer's rows coupled (no floor, so the budget binds)
    **{name: ("tlq", {"token_fraction": frac, "token_floor": 0, **extra})
       for pct, frac in (("10%", 0.1), ("25%", 0.25))
       for name, extra in ((f"TLQ {pct} tokens (no floor)", {"token_rank": "importance"}),
                           (f"TLQ {pct} random tokens (no floor)", {"token_rank": "random"}),
                           (f"TLQ {pct} random tokens with uniform weights (no floor)", {"token_rank": "random", "weighting": "uniform"}),
                           (f"TLQ {pct} sampled tokens (no floor)", {"token_rank": "sampled"}),
                           (f"TLQ {pct} coupled tokens (no floor)", {"token_rank": "coupled"}))},
    "TLQ FP target": ("tlq", {"gptq_target": "fp"}),
    "TLQ FP target (all tokens)": ("tlq", {"gptq_target": "fp", "token_select": False}),
    "TLQ FP target 25% tokens": ("tlq", {"gptq_target": "fp", "token_fraction": 0.25, "token_rank": "importance"}),
    "TLQ FP target 75% tokens": ("tlq", {"gptq_target": "fp", "token_fraction": 0.75, "token_rank": "importance"}),
    "GPTQ FP target": ("gptq", {"gptq_target": "fp"}),
    # the scope decision (docs/accuracy-scope.md); "layer scope" is TLQ's preset, named for that run's command
    "TLQ block scope": ("tlq", {"search_scope": "block"}),
    "TLQ layer scope": ("tlq", {"search_scope": "layer"}),
    # AWQ and MBQ as they were before their presets took their papers' block-output loss
    "AWQ layer scope": ("awq", {"search_scope": "layer"}),
    "MBQ layer scope": ("mbq", {"search_scope": "layer"}),
    # the coarse-to-fine scale search (docs/search_coarse.md): same grid, a third of it first
    "TLQ coarse 3": ("tlq", {"search_coarse": 3}),  # TLQ's preset since run 10 (docs/methods.md)
    "TLQ full grid": ("tlq", {"search_coarse": 1}),
    "AWQ coarse 3": ("awq", {"search_coarse": 3}),
    # bf16 candidate forwards in the scale search (docs/cost.md): the same grid, a noisier loss
    "TLQ search bf16": ("tlq", {"search_dtype": "bfloat16"}),
    "AWQ search bf16": ("awq", {"search_dtype": "bfloat16"}),
    # one FP record pass per layer and bf16 importance matmuls (docs/methods.md: neither became the default)
    "TLQ one record pass + bf16 importance": ("tlq", {"search_record": "layer", "importance_dtype": "auto"}),
    "TLQ record per mapping": ("tlq", {"search_record": "mapping", "importance_dtype": "auto"}),
    "TLQ importance float32": ("tlq", {"search_record": "layer", "importance_dtype": "compute"}),
    "TLQ before record and importance cuts": ("tlq", {"search_record": "mapping", "importance_dtype": "compute"}),
    # kept-rows statistics/record passes and the deferred FP-target shift (docs/methods.md: not adopted alone)
    "TLQ kept-rows passes + deferred shift": ("tlq", {"kept_rows_passes": True, "gptq_fp_shift": "deferred", "search_record": "mapping"}),
    # the three rounding-level cuts together, judged by a paired non-inferiority test (docs/methods.md): adopted,
    # so the first entry is TLQ's preset today and the second is the preset the test compared it against.
    # Variants above that name one of the three ran when the other two were off (their docs give the commit).
    "TLQ three rounding-level cuts": ("tlq", {"kept_rows_passes": True, "gptq_fp_shift": "deferred", "search_record": "layer"}),
    "TLQ before the three rounding-level cuts": ("tlq", {"kept_rows_passes": False, "gptq_fp_shift": "applied", "search_record": "mapping"}),
    # the preset's 10% set without its floor, so that it thins a small set too, with a MoE's routed experts
    # taking every row the router sends them, not only the set's (docs/methods.md, "On a trained MoE")
    "TLQ 10% sampled tokens (no floor; experts every row)": ("tlq", {"token_fraction": 0.1, "token_floor": 0, "token_rank": "sampled",
                                                                    "experts_every_row": True}),
})
# Stress schemes, harsher than any the library exports (no vLLM kernel serves them), for asking where on
# the built-in models accuracy starts to separate the methods at all (docs/accuracy-stress.md). Each runs
# with the presets of the library scheme named beside it (same search kind, same defaults).
STRESS_SCHEMES: dict[str, tuple[QuantScheme, str]] = {
    "w2a16": (QuantScheme("w2a16", WeightQuantSpec(bits=2, group_size=128, symmetric=False)), "w3a16"),
    "w4a4": (QuantScheme("w4a4", WeightQuantSpec(bits=4, group_size=None, symmetric=True), ActQuantSpec(4)), "w4a8"),
}
DETERMINISTIC = {"RTN"}  # no calibration data: one run stands for every seed
BASELINES = ("RTN", "SmoothQuant", "AWQ", "GPTQ", "MBQ")  # what TLQ is compared with in the summary
ABLATION = "TLQ w/o token importance"  # ... and the ablation the method's claim is judged against


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-qwen2vl,digits-llavaov",
                   help="built-in names, or directories of trained candidates (a path with '/': scripts/train_digits.py --out)")
    p.add_argument("--schemes", default="w3a16,w4a16,w4a8", help="library schemes, or the stress schemes " + ", ".join(STRESS_SCHEMES))
    p.add_argument("--methods", default=",".join(TABLE_VARIANTS), help="comma-separated variant names, of: " + ", ".join(VARIANTS).replace("%", "%%"))
    p.add_argument("--data", choices=("test", "val", "fresh"), default="test",
                   help="score on the model's test set, on its val split (held out, for choosing defaults), or on fresh "
                        "test-split samples beyond the shipped set (a recipe-built model only: for a confirmation on "
                        "samples no earlier run has scored)")
    p.add_argument("--seeds", default="0,1,2", help="calibration subsampling seeds")
    p.add_argument("--num-calib", type=int, default=64, help="calibration samples drawn per seed (of the model's 128)")
    p.add_argument("--num-test", type=int, default=500, help="test samples (seeded subset of the model's test set; with --data val, the first N of the val split, "
                        "from the model's recipe beyond the shipped val set; "
                        "with --data fresh, the N test-split samples after the shipped set)")
    p.add_argument("--out", default="docs/accuracy", help="writes OUT.md and OUT.json")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rewrite the Markdown of an earlier run's JSON (next to it), with the current table format")
    p.add_argument("--pair", action="append", default=[], metavar="FIRST,SECOND",
                   help="also report FIRST against SECOND with every model pooled, on accuracy and on keeping FP16's "
                        "answers (repeatable; kept in the JSON; with --render, added to the pairs it has)")
    p.add_argument("--parallel", action="store_true",
                   help="one child process per model (one core each), merged into one report when all are done")
    p.add_argument("--resume", action="store_true",
                   help="keep the cells an earlier, stopped run of the same settings wrote to OUT.json (with --parallel: "
                        "each model's OUT-MODEL.json) whose configuration is unchanged, and measure the rest")
    return p.parse_args(argv)


def run_parallel(args: argparse.Namespace, argv: list[str], models: list[str]) -> dict[str, Any]:
    """Each model in its own ``accuracy.py --models M`` child process, all at once; returns their results
    by model. A child that fails fails the run (its partial report stays in OUT-MODEL.json)."""
    import subprocess

    rest = [a for a in argv if a != "--parallel"]
    children = []
    for model in models:
        out = f"{args.out}-{model}"  # no dot: OUT.json and OUT.md are derived by suffix
        cmd = [sys.executable, __file__, *rest, "--models", model, "--out", out]
        children.append((model, out, subprocess.Popen(cmd)))
    results = {}
    for model, out, child in children:
        if child.wait() != 0:
            raise SystemExit(f"the run for {model} failed (exit {child.returncode}); partial results: {out}.json")
        results[model] = json.loads(Path(out).with_suffix(".json").read_text())["models"][model]
        for suffix in (".json", ".md"):
            Path(out).with_suffix(suffix).unlink()
    return results


def val_jsonl(model_dir: Path, n: int) -> Path:
    """The model's held-out ``val`` split (disjoint from calibration and test) as a JSONL file: its shipped
    (or recipe-generated) ``val.jsonl`` if it has one, else ``n`` samples of the digits val split with the
    model's benchmark question types, written into a temporary directory."""
    import tempfile

    from tlq.data import digits

    val = builtin_set(model_dir, "val")
    if val is not None:
        return val
    info = json.loads((model_dir / "tlq_tiny.json").read_text())
    cfg = digits.DigitsVQAConfig(seed=info["digits_config"]["seed"], question_types=tuple(info["bench_question_types"]))
    return digits.write_jsonl(digits.generate_samples("val", n, cfg), Path(tempfile.mkdtemp(prefix="tlq-val-")), "val")


def val_records(model_dir: Path, n: int) -> list[Any]:
    """The first ``n`` samples of the model's held-out ``val`` split (:func:`val_jsonl`), as JSONL records.
    Beyond the shipped set's size they come from the model's recipe (:func:`recipe_records`): a sample
    depends only on its split and index, so the first ones are the shipped set's, and a decision that
    needs more answers than the shipped set has can take them without touching the test split."""
    records = read_jsonl(val_jsonl(model_dir, n))[:n]
    if len(records) < n and (model_dir / "sets.json").is_file():
        return recipe_records(model_dir, "val", n, start=0)
    return records


def recipe_records(model_dir: Path, kind: str, n: int, start: int | None = 0) -> list[Any]:
    """Samples ``start .. start + n - 1`` of the split of the model's set ``kind``, generated from its
    recipe into a temporary directory; ``start=None``: from the shipped set's size on (samples it lacks)."""
    import tempfile

    from tlq.builtin import SETS_FILE, write_set

    recipe_path = model_dir / SETS_FILE
    if not recipe_path.is_file():
        raise SystemExit(f"{model_dir.name} has no recipe ({SETS_FILE}) to generate samples from; use --data test or val")
    recipe = json.loads(recipe_path.read_text())
    entry = recipe["sets"][kind]
    out = Path(tempfile.mkdtemp(prefix=f"tlq-{kind}-"))
    return read_jsonl(write_set(recipe, entry["split"], n, out, kind, start=entry["samples"] if start is None else start))


def fresh_records(model_dir: Path, n: int) -> list[Any]:
    """``n`` samples of the model's test split that follow its shipped test set (indices from the set's
    size on), generated from its recipe. A sample depends only on its split and index, so they are as held
    out as the test set and have never been scored: a confirmation planned after reading the test tables
    is judged on them, not on the samples it was planned from."""
    return recipe_records(model_dir, "test", n, start=None)


def answer_margins(logps: list[torch.Tensor]) -> dict[str, float]:
    """How far each FP16 answer is from flipping: top-1 minus top-2 log-probability (nats) at the first
    answer token, as median and as the share of samples under 1 nat. A quantized model changes a greedy
    answer only where its perturbation of the logits exceeds this margin, so it bounds how much accuracy
    can tell methods apart on a test set."""
    top2 = torch.stack([lp[0].topk(2).values for lp in logps])
    margins = top2[:, 0] - top2[:, 1]
    return {"median": float(margins.median()), "share_below_1": float((margins < 1.0).float().mean())}


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "n": len(values)}


RESUME_KEYS = ("num_calib", "num_test", "data", "seeds")  # settings a resumed run must share with the earlier one


def earlier_rows(out: Path, settings: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The rows an earlier run of the same settings measured for ``model`` (its OUT.json), or None when
    there is none. Refuses (one line) when the settings differ, since its cells would not be comparable."""
    path = out.with_suffix(".json")
    if not path.exists():
        return None
    earlier = json.loads(path.read_text())
    for key in RESUME_KEYS:
        if earlier.get(key) != settings[key]:
            raise SystemExit(f"--resume: {path} was run with {key}={earlier.get(key)!r}, this run has {settings[key]!r}; "
                             "use the same settings or another --out")
    rows = earlier["models"].get(model)
    if rows is not None:
        rows["resumed"] = {"finished": earlier.get("finished"), "minutes": earlier.get("minutes"), "cells": []}  # filled as cells are kept
    return rows


def check_same_reference(fp: dict[str, Any], earlier: dict[str, Any], model: str) -> None:
    """A resumed run keeps cells only when FP16 scores the same samples exactly as the earlier run did: the
    same model, samples and scoring code, so the kept cells and the new ones form one table."""
    for key in ("accuracy", "nll", "num_samples"):
        if fp[key] != earlier["fp16"][key]:
            raise SystemExit(f"--resume: {model}'s FP16 {key} is {fp[key]!r} now and was {earlier['fp16'][key]!r}; "
                             "the model, samples or scoring changed since that run, so start afresh (no --resume)")


def cell_config(scheme: str, name: str, num_calib: int, seed: int) -> QuantizeConfig:
    """The configuration one (scheme, variant, seed) run calibrates with: the variant's method preset and
    overrides, on the library scheme (a stress scheme runs with the presets of the one beside it)."""
    method, overrides = VARIANTS[name]
    overrides = dict(overrides)
    importance = overrides.pop("importance", {})
    stress, preset_scheme = STRESS_SCHEMES.get(scheme, (None, scheme))
    cfg = build_config(preset_scheme, method, num_samples=num_calib, seed=seed, device="cpu", **overrides)
    if stress is not None:
        cfg.scheme = stress
    cfg.importance = dc_replace(cfg.importance, **importance)
    return cfg


def config_digest(scheme: str, name: str, num_calib: int) -> str:
    """sha256 of a cell's resolved configuration (seed 0 standing for its seeds). A resumed run keeps a cell
    only when this is unchanged: a variant's name outlives its meaning when a preset changes (TLQ's token
    set did), and a kept cell must describe what the name runs now."""
    return run_fingerprint(cell_config(scheme, name, num_calib, 0).to_dict())


def run_model(model: str, schemes: list[str], variants: list[str], seeds: list[int], args: argparse.Namespace,
              checkpoint: Any = None, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    ref = model if "/" in model else f"builtin:{model}"  # a directory: a candidate from scripts/train_digits.py --out
    mdir = resolve_model_dir(ref)
    records = {"test": lambda: choose(read_jsonl(builtin_set(mdir, "test")), args.num_test, seed=0),
               "val": lambda: val_records(mdir, args.num_test), "fresh": lambda: fresh_records(mdir, args.num_test)}[args.data]()
    calib = builtin_set(mdir, "calib")  # resolved (and its digest checked) once, not per run
    adapter, fp_model, processor, _d, dev, _dt = load_model(ref, device="cpu")
    ecfg = EvalConfig()
    fp_scores, ref_logps = score_model("fp16", fp_model, processor, adapter, records, dev, ecfg, progress=False)
    del fp_model
    print(f"[{model}] FP16 accuracy {fp_scores.accuracy:.4f} nll {fp_scores.nll:.4f}", flush=True)
    rows: dict[str, Any] = {"fp16": {**fp_scores.to_dict(), "margin": answer_margins(ref_logps)}, "cells": {}}
    rows["relevant_token_share"] = relevant_share(records)
    if earlier is not None:
        check_same_reference(rows["fp16"], earlier, model)
        rows["resumed"] = earlier["resumed"]
    for scheme in schemes:
        for name in variants:
            key = f"{scheme}/{name}"
            digest = config_digest(scheme, name, args.num_calib)
            kept = earlier["cells"].get(key) if earlier is not None else None
            if kept is not None and kept.get("config_sha256") == digest:
                rows["cells"][key] = kept
                rows["resumed"]["cells"].append(key)
                print(f"[{model}] {scheme:6s} {name:28s} kept from the earlier run", flush=True)
                continue
            if kept is not None:
                why = "its configuration changed since" if "config_sha256" in kept else "no configuration was recorded by"
                print(f"[{model}] {scheme:6s} {name:28s} measured again: {why} the earlier run", flush=True)
            runs = []
            for seed in seeds[:1] if name in DETERMINISTIC else seeds:
                t0 = time.perf_counter()
                cfg = cell_config(scheme, name, args.num_calib, seed)
                run = calibrate(ref, calib, cfg, progress=False)
                scores, _ = score_model(name, run.model, processor, adapter, records, dev, ecfg, reference=ref_logps, progress=False)
                runs.append({"seed": seed, "accuracy": scores.accuracy, "nll": scores.nll, "kl": scores.kl, "seconds": time.perf_counter() - t0,
                             "token_union": run.token_set["union_share"] if run.token_set else None, "correct": scores.correct_bits,
                             "rtn_fallback": count_rtn_fallbacks(run.result.layers)})
                cost = "" if runs[-1]["token_union"] is None else f", union {runs[-1]['token_union']:.0%}"
                cost += f", {runs[-1]['rtn_fallback']} expert linears by RTN" if runs[-1]["rtn_fallback"] else ""
                print(f"[{model}] {scheme:6s} {name:28s} seed {seed}: acc {scores.accuracy:.4f} kl {scores.kl:.4f} ({runs[-1]['seconds']:.0f}s{cost})", flush=True)
            acc = summarize([r["accuracy"] for r in runs])
            rows["cells"][key] = {
                "scheme": scheme,
                "variant": name,
                "accuracy": acc,
                "retained_pct": summarize([100 * r["accuracy"] / max(fp_scores.accuracy, 1e-12) for r in runs]),
                "kl": summarize([r["kl"] for r in runs]),
                "nll": summarize([r["nll"] for r in runs]),
                "runs": runs,
                "config_sha256": digest,
            }
            if checkpoint is not None:  # keep what is measured so far: a long run that dies still reports
                checkpoint(rows)
    return rows


def relevant_share(records: list[Any]) -> float | None:
    """Mean share of the visual tokens that hold the answer, from the set's ground truth (None without)."""
    shares = [len(r.extra["relevant_tokens"]) / (r.extra["token_grid"][0] * r.extra["token_grid"][1])
              for r in records if r.extra.get("relevant_tokens") is not None and r.extra.get("token_grid")]
    return statistics.fmean(shares) if shares else None


def paired_bits(first: dict[str, Any], second: dict[str, Any]) -> tuple[str, str, int] | None:
    """The two cells' right/wrong answers, runs paired by seed (a deterministic method's one run pairs with
    every seed of the other) and concatenated, and the number of pairs; None for runs recorded before
    per-sample results were kept."""
    a_runs, b_runs = first["runs"], second["runs"]
    if not all("correct" in r for r in a_runs + b_runs):
        return None
    if len(a_runs) == 1 or len(b_runs) == 1:
        pairs = [(a, b) for a in a_runs for b in b_runs]
    else:
        by_seed = {r["seed"]: r for r in b_runs}
        pairs = [(a, by_seed[a["seed"]]) for a in a_runs if a["seed"] in by_seed]
    return "".join(a["correct"] for a, _ in pairs), "".join(b["correct"] for _, b in pairs), len(pairs)


def _bools(bits: str) -> list[bool]:
    return [c == "1" for c in bits]


def paired(first: dict[str, Any], second: dict[str, Any], reference: str | None = None) -> dict[str, Any] | None:
    """McNemar over the same test samples, runs paired by seed and pooled (:func:`paired_bits`): on being
    right, or, given FP16's right/wrong answers ``reference``, on keeping them (fewer flips wins)."""
    bits = paired_bits(first, second)
    if bits is None:
        return None
    a, b, n_pairs = bits
    if reference is None:
        return mcnemar(_bools(a), _bools(b)).to_dict()
    return flip_test(_bools(reference * n_pairs), _bools(a), _bools(b)).to_dict()


def cell_flips(cell: dict[str, Any], reference: str) -> dict[str, Any] | None:
    """A cell's flips against FP16 (:class:`tlq.eval.paired.Flips`): share per run summarised over seeds, and
    the answers lost (right -> wrong) and gained summed over its runs; None without per-sample results."""
    if not reference or not all("correct" in r for r in cell["runs"]):
        return None
    per_run = [flips(_bools(reference), _bools(r["correct"])) for r in cell["runs"]]
    return {"share": summarize([f.share for f in per_run]), "lost": sum(f.lost for f in per_run), "gained": sum(f.gained for f in per_run)}


# The needle benchmark's validity bars (docs/needle.md), fixed before any TLQ row is computed and judged
# on FP16 and the baselines only: a benchmark where accuracy has headroom and token relevance varies.
VALIDITY_FP_RANGE = (0.70, 0.97)
VALIDITY_MIN_UNSURE = 0.15  # share of FP16 answers within 1 nat of the runner-up
VALIDITY_MIN_DROP = 0.02  # the best baseline loses at least 2 points ...
VALIDITY_SCHEMES = ("w3a16", "w4a8")  # ... in each of these schemes
VALIDITY_MAX_RELEVANT = 0.20
VALIDITY_MIN_TEST = 1000


def validity(rows: dict[str, Any], num_test: int) -> list[tuple[str, str, bool | None]]:
    """(bar, measured, passed) per validity bar; ``passed`` None where the run lacks the cells to judge it."""
    fp = rows["fp16"]
    lo, hi = VALIDITY_FP_RANGE
    out = [
        (f"FP16 accuracy in [{100 * lo:.0f}%, {100 * hi:.0f}%)", f"{100 * fp['accuracy']:.2f}%", lo <= fp["accuracy"] < hi),
        (f"FP16 answers within 1 nat of the runner-up >= {100 * VALIDITY_MIN_UNSURE:.0f}%", f"{100 * fp['margin']['share_below_1']:.1f}%",
         fp["margin"]["share_below_1"] >= VALIDITY_MIN_UNSURE),
    ]
    for scheme in VALIDITY_SCHEMES:
        base = [c for c in rows["cells"].values() if c["scheme"] == scheme and c["variant"] in BASELINES]
        if not base:
            out.append((f"best baseline loses >= {100 * VALIDITY_MIN_DROP:.0f} points at {scheme}", "not run", None))
            continue
        best = max(base, key=lambda c: c["accuracy"]["mean"])
        drop = fp["accuracy"] - best["accuracy"]["mean"]
        out.append((f"best baseline loses >= {100 * VALIDITY_MIN_DROP:.0f} points at {scheme}", f"{best['variant']}: {100 * drop:.2f} points",
                    drop >= VALIDITY_MIN_DROP))
    share = rows.get("relevant_token_share")
    out.append((f"relevant visual tokens <= {100 * VALIDITY_MAX_RELEVANT:.0f}%", "-" if share is None else f"{100 * share:.1f}%",
                None if share is None else share <= VALIDITY_MAX_RELEVANT))
    out.append((f"test samples >= {VALIDITY_MIN_TEST}", str(num_test), num_test >= VALIDITY_MIN_TEST))
    return out


def beyond_spread(better: dict[str, float], worse: dict[str, float], higher_is_better: bool) -> bool:
    """Whether ``better`` beats ``worse`` by more than both seed spreads (mean ± std intervals apart).

    Differences inside the spread are what another calibration draw could undo; they are not wins."""
    sign = 1.0 if higher_is_better else -1.0
    return sign * (better["mean"] - worse["mean"]) > better["std"] + worse["std"]


def _paired_win(test: dict[str, Any] | None) -> bool:
    return test is not None and test["p"] < 0.05 and test["wins"] > test["losses"]


def summary_rows(rows: dict[str, Any], scheme: str) -> dict[str, Any] | None:
    """TLQ against the baselines of one (model, scheme) cell: the best by accuracy and by KL, and whether
    TLQ beats *every* baseline beyond the spread (:func:`beyond_spread`); ``None`` when the cell lacks
    TLQ or every baseline."""
    cells = {c["variant"]: c for c in rows["cells"].values() if c["scheme"] == scheme}
    base = [cells[b] for b in BASELINES if b in cells]
    if "TLQ" not in cells or not base:
        return None
    tlq = cells["TLQ"]
    best_acc = max(base, key=lambda c: (c["accuracy"]["mean"], -c["kl"]["mean"]))
    best_kl = min(base, key=lambda c: c["kl"]["mean"])
    tests = {b["variant"]: paired(tlq, b) for b in base}
    ablation = cells.get(ABLATION)
    reference = rows.get("fp16", {}).get("correct")
    return {
        "ablation": None if ablation is None else {
            "accuracy": ablation["accuracy"],
            "paired": paired(tlq, ablation),
            "flips": None if not reference else {"tlq": cell_flips(tlq, reference), "ablation": cell_flips(ablation, reference),
                                                  "paired": paired(tlq, ablation, reference)},
            "acc_win": beyond_spread(tlq["accuracy"], ablation["accuracy"], higher_is_better=True),
            "acc_loss": beyond_spread(ablation["accuracy"], tlq["accuracy"], higher_is_better=True),
        },
        "paired_vs_best": tests[best_acc["variant"]],
        "paired_win": all(_paired_win(t) for t in tests.values()),
        # fewer flips than every baseline, by McNemar on keeping FP16's answers (None: no per-sample FP16)
        "keeps_win": None if not reference else all(_paired_win(paired(tlq, b, reference)) for b in base),
        "tlq": tlq,
        "best_acc": best_acc,
        "best_kl": best_kl,
        "acc_win": all(beyond_spread(tlq["accuracy"], b["accuracy"], higher_is_better=True) for b in base),
        "acc_loss": beyond_spread(best_acc["accuracy"], tlq["accuracy"], higher_is_better=True),
        "kl_win": all(beyond_spread(tlq["kl"], b["kl"], higher_is_better=False) for b in base),
        "kl_ratio": best_kl["kl"]["mean"] / max(tlq["kl"]["mean"], 1e-30),
    }


def _pm(stat: dict[str, float], scale: float = 1.0, fmt: str = ".2f") -> str:
    return f"{scale * stat['mean']:{fmt}} ± {scale * stat['std']:{fmt}}"


def _mcnemar(test: dict[str, Any] | None) -> str:
    return f"{test['wins']}/{test['losses']}, p={test['p']:.3g}" if test else "-"


def _flips(f: dict[str, Any] | None) -> str:
    return "-" if f is None else f"{_pm(f['share'], 100)} (-{f['lost']} / +{f['gained']})"


def _vs_ablation(ablation: dict[str, Any] | None) -> str:
    if ablation is None:
        return "not run"
    verdict = "TLQ ahead" if ablation["acc_win"] else ("TLQ behind" if ablation["acc_loss"] else "within spread")
    text = f"{_pm(ablation['accuracy'], 100)}: {verdict}; {_mcnemar(ablation['paired'])}"
    f = ablation.get("flips")
    if f and f["tlq"] and f["ablation"]:
        text += f"; flips {100 * f['tlq']['share']['mean']:.2f}% / {100 * f['ablation']['share']['mean']:.2f}%, keeps FP16 {_mcnemar(f['paired'])}"
    return text


def _pooled_line(label: str, a: str, b: str, ref: str) -> str:
    ra, rb, rf = _bools(a), _bools(b), _bools(ref)
    acc, keep = mcnemar(ra, rb), flip_test(rf, ra, rb)
    return (f"- {label}: accuracy {acc.wins}/{acc.losses}, p={acc.p:.3g}; keeps FP16's answer {keep.wins}/{keep.losses}, "
            f"p={keep.p:.3g} (flips {100 * flips(rf, ra).share:.2f}% / {100 * flips(rf, rb).share:.2f}% of {len(a)} answers)")


def pooled_pair(result: dict[str, Any], first: str = "TLQ", second: str = ABLATION) -> list[str]:
    """Per scheme, ``first`` against ``second`` with every model's runs pooled (paired by model and seed):
    on accuracy and on keeping FP16's right/wrong answers. Small per-model gaps add up here, or cancel."""
    lines = []
    schemes = dict.fromkeys(c["scheme"] for rows in result["models"].values() for c in rows["cells"].values())
    every: list[str] = ["", "", ""]  # the same, every scheme pooled too
    for scheme in schemes:
        a = b = ref = ""
        for rows in result["models"].values():
            cells = {c["variant"]: c for c in rows["cells"].values() if c["scheme"] == scheme}
            bits = paired_bits(cells[first], cells[second]) if first in cells and second in cells else None
            if bits is None or not rows["fp16"].get("correct"):
                continue
            a, b, ref = a + bits[0], b + bits[1], ref + rows["fp16"]["correct"] * bits[2]
        if a:
            lines.append(_pooled_line(scheme, a, b, ref))
            every = [every[0] + a, every[1] + b, every[2] + ref]
    if not lines:
        return []
    if len(lines) > 1:
        lines.append(_pooled_line("every scheme", *every))
    return [f"{first} against '{second}', every model pooled (wins/losses = samples only {first} is right / keeps FP16's right-or-wrong answer):",
            "", *lines, ""]


def summary_markdown(result: dict[str, Any]) -> list[str]:
    """The computed summary: per (model, scheme), TLQ against the best baseline by accuracy (% of FP16)
    and by KL, and whether each gap is beyond the seed spread. Written from the numbers, never by hand."""
    lines = ["## Summary (computed from the table below)", "",
             "A gap counts only when the mean ± std intervals over calibration seeds do not overlap.", "",
             "Paired test: McNemar (exact) on the same test samples, runs paired by seed and pooled; "
             "wins/losses = samples only TLQ / only the baseline answers right.", "",
             f"The last column is TLQ against its own '{ABLATION}' ablation (accuracy verdict; paired wins/losses, p; "
             "then flips, TLQ / ablation, and McNemar on keeping FP16's right/wrong answer).", "",
             "Flips (Dutta et al., NeurIPS 2024): answers right in FP16 and wrong in the run, or the reverse, in % of the "
             "samples; a run can match FP16's accuracy with many of them.", "",
             "| model | scheme | TLQ accuracy (%) | best baseline by accuracy | accuracy verdict | paired vs best (wins/losses, p) | TLQ KL | best baseline by KL | KL ratio (baseline / TLQ) | KL verdict | vs w/o token importance |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    counts = {"acc_win": 0, "kl_win": 0, "keeps_win": 0, "keeps_cells": 0, "cells": 0}
    for model, rows in result["models"].items():
        for scheme in dict.fromkeys(c["scheme"] for c in rows["cells"].values()):
            s = summary_rows(rows, scheme)
            if s is None:
                continue
            counts["cells"] += 1
            counts["acc_win"] += s["acc_win"]
            counts["kl_win"] += s["kl_win"]
            counts["keeps_cells"] += s["keeps_win"] is not None
            counts["keeps_win"] += bool(s["keeps_win"])
            acc_verdict = "TLQ ahead" if s["acc_win"] else ("TLQ behind" if s["acc_loss"] else "within spread")
            kl_verdict = "TLQ lower" if s["kl_win"] else "within spread or higher"
            ba, bk = s["best_acc"], s["best_kl"]
            t = s["paired_vs_best"]
            lines.append(
                f"| {model} | {scheme} | {_pm(s['tlq']['accuracy'], 100)} | {ba['variant']} {_pm(ba['accuracy'], 100)} | {acc_verdict} | {_mcnemar(t)} | "
                f"{_pm(s['tlq']['kl'], fmt='.1e')} | {bk['variant']} {_pm(bk['kl'], fmt='.1e')} | {s['kl_ratio']:.2f}x | {kl_verdict} | {_vs_ablation(s['ablation'])} |"
            )
    if counts["cells"] == 0:  # a run without TLQ and a baseline side by side (e.g. choosing a default)
        return pooled_pair(result)
    lines += ["", f"TLQ is ahead of every baseline beyond the spread in accuracy in {counts['acc_win']} of {counts['cells']} cells, "
              f"and in KL(FP16 || quantized) in {counts['kl_win']} of {counts['cells']}."
              + (f" It flips fewer of FP16's answers than every baseline (McNemar on keeping them, p < 0.05) in {counts['keeps_win']} "
                 f"of {counts['keeps_cells']}." if counts["keeps_cells"] else ""), ""]
    return lines + pooled_pair(result)


def scored_on(data: str, n: int) -> str:
    """The report's sentence naming the samples scored (``--data``)."""
    return {
        "test": f"test: {n} samples of each model's test.jsonl. ",
        "val": f"scored on the first {n} samples of the model's val split (held out from calibration and test; for choosing defaults). ",
        "fresh": f"scored on {n} fresh test-split samples, those after each model's shipped test set (never scored by the test tables). ",
    }[data]


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Accuracy: every method against FP16 on the built-in models",
        "",
        f"Command: `{result['command']}`",
        f"Machine: {result['machine']}; torch {result['torch']}; finished {result['finished']} ({result['minutes']:.0f} min).",
        f"Calibration: {result['num_calib']} samples per seed drawn from each model's calib.jsonl, seeds {result['seeds']}; "
        + scored_on(result.get("data", "test"), result["num_test"])
        + "Accuracy is exact match of greedy answers; "
        "mean ± population std over seeds (RTN uses no data: one run). KL is KL(FP16 || quantized) per answer token.",
        "",
    ]
    if result.get("note"):  # added by hand to a finished run's JSON, e.g. when variants were renamed
        lines += [f"Note: {result['note']}", ""]
    lines += summary_markdown(result)
    for first, second in result.get("pairs", []):
        lines += pooled_pair(result, first, second)
    for model, rows in result["models"].items():
        fp = rows["fp16"]
        lines += [f"## {model} (FP16 accuracy {100 * fp['accuracy']:.2f}%)", ""]
        if "margin" in fp:
            m = fp["margin"]
            lines += [f"FP16 answer margin (top-1 minus top-2 log-probability at the first answer token): median "
                      f"{m['median']:.2f} nats; {100 * m['share_below_1']:.1f}% of the scored samples are under 1 nat.", ""]
        if rows.get("relevant_token_share") is not None:
            lines += ["Validity bars (docs/needle.md; judged on FP16 and the baselines only):", "", "| bar | measured | passed |", "|---|---|---|"]
            lines += [f"| {bar} | {val} | {'-' if ok is None else ('yes' if ok else '**no**')} |" for bar, val, ok in validity(rows, fp["num_samples"])]
            lines.append("")
        if rows.get("resumed"):
            r = rows["resumed"]
            lines += [f"Resumed (`--resume`): {len(r['cells'])} cells were kept from an earlier run of the same settings, stopped "
                      f"after {r['minutes']:.0f} min ({r['finished']}), whose FP16 scores this run reproduced exactly: "
                      + ", ".join(r["cells"]) + ".", ""]
        lines += ["| scheme | method | accuracy (%) | % of FP16 | flips vs FP16 (%, -lost / +gained) | KL(FP16‖q) |", "|---|---|---|---|---|---|"]
        for cell in rows["cells"].values():
            a, r, k = cell["accuracy"], cell["retained_pct"], cell["kl"]
            lines.append(
                f"| {cell['scheme']} | {cell['variant']} | {100 * a['mean']:.2f} ± {100 * a['std']:.2f} | "
                f"{r['mean']:.1f} ± {r['std']:.1f} | {_flips(cell_flips(cell, fp.get('correct', '')))} | {k['mean']:.2e} ± {k['std']:.1e} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def parse_pair(text: str) -> list[str]:
    """``--pair 'A,B'`` -> ``["A", "B"]``; one line naming the fix otherwise."""
    names = [n.strip() for n in text.split(",")]
    if len(names) != 2 or not all(names):
        raise SystemExit(f"--pair {text!r}: name two variants, FIRST,SECOND")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pairs = [parse_pair(p) for p in args.pair]
    if args.render:
        report = Path(args.render)
        result = json.loads(report.read_text())
        result["pairs"] = [*result.get("pairs", []), *(p for p in pairs if p not in result.get("pairs", []))]
        atomic_write_text(report.with_suffix(".md"), to_markdown(result))
        return 0
    torch.manual_seed(0)
    t0 = time.perf_counter()
    variants = [v.strip() for v in args.methods.split(",") if v.strip()]
    unknown = [v for v in variants + [name for pair in pairs for name in pair] if v not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    if any(VARIANTS[v][1].get("search_dtype") == "bfloat16" for v in variants):
        # every linear of the built-ins is under the bf16 size floor: lowered, so the rounding is measured at all
        smoothing.BF16_MIN_WEIGHTS = 0
    seeds = [int(s) for s in args.seeds.split(",")]
    schemes = [s.strip() for s in args.schemes.split(",")]
    result: dict[str, Any] = {
        "command": "python benchmarks/accuracy.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "num_calib": args.num_calib,
        "num_test": args.num_test,
        "data": args.data,
        "seeds": seeds,
        "pairs": pairs,
        "models": {},
    }
    out = Path(args.out)

    def write(partial: bool) -> None:
        result["minutes"] = (time.perf_counter() - t0) / 60
        result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + (" (partial)" if partial else "")
        atomic_write_json(out.with_suffix(".json"), result)
        atomic_write_text(out.with_suffix(".md"), to_markdown(result))

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.parallel and len(models) > 1:
        result["models"] = run_parallel(args, list(argv if argv is not None else sys.argv[1:]), models)
    for model in models if not result["models"] else []:

        def checkpoint(rows: dict[str, Any], model: str = model) -> None:
            result["models"][model] = rows
            write(partial=True)

        earlier = earlier_rows(out, result, model) if args.resume else None
        result["models"][model] = run_model(model, schemes, variants, seeds, args, checkpoint, earlier)
    write(partial=False)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
