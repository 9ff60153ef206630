"""From how many calibration rows on does GPTQ beat RTN on held-out tokens? The evidence for
``GPTQConfig.min_tokens`` (the routed-row count below which a MoE expert is RTN-quantized).

A rarely routed expert gets a Hessian from ``n`` rows. This measures, on real activations of the trained
built-in models, what such a Hessian is worth: every linear's inputs are recorded (forward hooks on the
FP model) for the model's calibration samples and for held-out val samples; for each ``n`` of a grid,
``n`` rows drawn at random from the calibration rows (several draws) give a Hessian, GPTQ solves the
weight from it (``make_calibrator("gptq", ...)``, the engine's calibrator, default ``GPTQConfig``: 1%
damping, no act-order, plain ``W X`` target), and RTN quantizes the same weight. Both are judged on the
val rows: ``sum_t ||(Q - W) x_t||^2`` over every val token. The ratio GPTQ / RTN below 1 means the
``n``-row Hessian helped on tokens it never saw.

Dense layers of small models stand in for an expert that sees ``n`` routed tokens (the limits are in the
report). The vision tower and projector linears (16-bit in tlq) are measured too, as extra input widths
(64) and kinds, and reported apart from the decoder's. The default run takes about 5 minutes on one core.

    python benchmarks/moe_min_tokens.py --out docs/moe-min-tokens
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from _report import command_line, write_report
from accuracy import val_jsonl
from activation_rank import rank_holding
from tlq.api import load_model
from tlq.builtin import builtin_set, resolve_model_dir
from tlq.config import SCHEMES, GPTQConfig, QuantScheme, WeightQuantSpec
from tlq.data.calibration import load_calibration
from tlq.quant.gptq import layer_output_error
from tlq.quant.rtn import rtn_quantize
from tlq.quant.solvers import make_calibrator

DEFAULT_GRID = "4,8,16,32,64,128,256,512,1024,2048"
# The weight part of each scheme (activation quantization is not part of this question). "w4a8" is
# tlq's int4 per-channel weight format.
DEFAULT_SCHEMES = "w4a16,w3a16,w4a8"
SCALE_DTYPE = torch.float32  # the built-in checkpoints' dtype, which the engine stores scales in
# An input channel is "sparse" when its largest |x| over the calibration rows exceeds this multiple of its
# median |x|: it is near zero on most tokens, so a draw of a few rows is likely to miss it.
SPARSE_PEAK = 100.0
# Samples generated for a digits model's val split (it ships none); --num-val of them are drawn.
_DIGITS_VAL = 400


# --------------------------------------------------------------------------------------------------
# Recording the inputs
# --------------------------------------------------------------------------------------------------
def kind_of(name: str, decoder_prefix: str) -> tuple[str, str]:
    """(part, kind): ``decoder``/``q_proj`` for a decoder linear, ``decoder``/``expert down_proj`` for a routed
    expert's (a MoE model's experts are per-expert linears after tlq's load, each called on its routed rows
    only, so its recorded rows are exactly what its GPTQ statistics would see), ``vision``/``visual.blocks.attn.qkv``
    (layer indices dropped) for a vision tower or projector linear."""
    if name.startswith(decoder_prefix + "."):
        kind = name.rsplit(".", 1)[-1]
        return "decoder", f"expert {kind}" if ".experts." in name else kind
    return "vision", re.sub(r"\.\d+(?=\.)", "", name.removeprefix("model."))


@torch.no_grad()
def capture(model_name: str, num_calib: int, num_val: int, parts: set[str]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Per linear: its weight, its calibration input rows ``[rows, in]`` (float32), and the val rows'
    ``sum_t x_t x_t^T`` (float64) with their count; and the linears left out, routed experts that saw no
    calibration or no val row (nothing to draw from, or nothing to score on), with their calibration rows."""
    adapter, model, processor, model_dir, _dev, _dt = load_model(model_name, "cpu", "float32")
    decoder_prefix = adapter.spec.decoder_layers
    linears = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        part, kind = kind_of(name, decoder_prefix)
        if part in parts:
            linears[name] = (m, part, kind)
    sets = {"calib": (builtin_set(model_dir, "calib"), num_calib), "val": (val_jsonl(model_dir, _DIGITS_VAL), num_val)}
    out = {name: {"part": part, "kind": kind, "weight": m.weight.detach().float().clone(), "calib": [],
                  "val_sum": torch.zeros(m.in_features, m.in_features, dtype=torch.float64), "val_rows": 0}
           for name, (m, part, kind) in linears.items()}
    stage = ["calib"]

    def hook(name: str) -> Any:
        def record(_m: torch.nn.Module, args: tuple, _out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if stage[0] == "calib":
                out[name]["calib"].append(x.clone())
            else:
                xd = x.double()
                out[name]["val_sum"] += xd.T @ xd
                out[name]["val_rows"] += x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(name)) for name, (m, _p, _k) in linears.items()]
    try:
        for kind, (path, n) in sets.items():
            stage[0] = kind
            for s in load_calibration(path, processor, adapter, model, num_samples=n, max_seq_len=None, seed=0):
                model(**s.inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    unseen = {n: sum(x.shape[0] for x in rec["calib"]) for n, rec in out.items() if not rec["calib"] or not rec["val_rows"]}
    for name in unseen:
        del out[name]
    for rec in out.values():
        rec["calib"] = torch.cat(rec["calib"])
    return out, unseen


# --------------------------------------------------------------------------------------------------
# GPTQ from n rows against RTN, on the val rows
# --------------------------------------------------------------------------------------------------
def effective_spec(spec: WeightQuantSpec, in_features: int) -> WeightQuantSpec:
    """The scheme's weight spec for this width: a group as wide as the row (or wider: width 64 under g128)
    is one scale per output channel."""
    if spec.group_size is not None and spec.group_size >= in_features:
        return replace(spec, group_size=None)
    return spec


def measure_linear(rec: dict[str, Any], schemes: dict[str, WeightQuantSpec], grid: list[int], draws: int, seed: int,
                   cfg: GPTQConfig) -> dict[str, Any]:
    """GPTQ / RTN held-out error ratios of one linear, per scheme, ``n`` and draw (``n = all``: the whole
    calibration pool, once)."""
    w, xc, hv = rec["weight"], rec["calib"], rec["val_sum"]
    pool, in_f = xc.shape[0], w.shape[1]
    direction_energy = torch.linalg.eigvalsh(hv).clamp(min=0).flip(0)  # per direction, in decreasing order
    energy = float(((w.double() @ hv) * w.double()).sum())
    xa = xc.abs()
    peak = xa.max(0).values / xa.median(0).values.clamp_min(1e-30)  # per input channel: largest |x| over its median
    result = {"part": rec["part"], "kind": rec["kind"], "in_features": in_f, "out_features": w.shape[0],
              "calib_rows": pool, "distinct_calib_rows": int(torch.unique(xc, dim=0).shape[0]), "val_rows": rec["val_rows"],
              "val_rank90": rank_holding(direction_energy, 0.90), "val_rank99": rank_holding(direction_energy, 0.99),
              "sparse_channels": int((peak > SPARSE_PEAK).sum()), "schemes": {}}
    solved: dict[tuple, dict[str, Any]] = {}  # effective spec -> result (w4a16 and w4 per-channel agree at width <= 128)
    for sname, spec in schemes.items():
        eff = effective_spec(spec, in_f)
        if (eff.bits, eff.group_size, eff.symmetric) in solved:
            result["schemes"][sname] = solved[(eff.bits, eff.group_size, eff.symmetric)]
            continue
        scheme = QuantScheme(sname, eff)
        e_rtn = layer_output_error(w, rtn_quantize(w, eff, SCALE_DTYPE).dequantize(torch.float32), hv)
        cells: dict[str, Any] = {}
        for n in [m for m in grid if m < pool] + [pool]:
            ratios = []
            for d in range(draws if n < pool else 1):
                g = torch.Generator().manual_seed(seed + 100_003 * d + n)  # the same tokens for every linear of a model
                rows = xc[torch.randperm(pool, generator=g)[:n]]
                cal = make_calibrator("gptq", w, scheme, cfg, SCALE_DTYPE, "cpu")
                cal.observe(rows)
                q = cal.solve(w).dequantize(torch.float32)
                ratios.append(layer_output_error(w, q, hv) / e_rtn)
            cells["all" if n == pool else str(n)] = {"n": n, "ratios": ratios}
        solved[(eff.bits, eff.group_size, eff.symmetric)] = result["schemes"][sname] = {
            "group_size": eff.group_size, "rtn_rel_error": e_rtn / energy, "cells": cells}
    return result


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------
def cell_stats(ratios: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(ratios), "std": statistics.pstdev(ratios) if len(ratios) > 1 else 0.0,
            "min": min(ratios), "max": max(ratios)}


def worse_beyond_spread(st: dict[str, float]) -> bool:
    """GPTQ worse than RTN beyond the spread over draws: mean - std of the ratio above 1."""
    return st["mean"] - st["std"] > 1.0


def threshold(cells: dict[str, Any], bad: Any) -> float | None:
    """The smallest grid ``n`` from which no larger ``n`` (the whole pool included) is ``bad``; None if
    even the whole pool is."""
    ordered = sorted(cells.values(), key=lambda c: c["n"])
    n_star = None
    for c in reversed(ordered):
        if bad(cell_stats(c["ratios"])):
            break
        n_star = c["n"]
    return n_star


def thresholds(linear: dict[str, Any], scheme: str) -> dict[str, Any]:
    cells = linear["schemes"][scheme]["cells"]
    return {"spread": threshold(cells, worse_beyond_spread),  # not worse beyond the spread
            "mean": threshold(cells, lambda st: st["mean"] > 1.0),  # not worse on average over draws
            "every_draw": threshold(cells, lambda st: st["max"] > 1.0)}  # not worse in any draw


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def fmt_n(n: float | None, grid_min: int) -> str:
    if n is None:
        return "never"
    return f"<= {n}" if n == grid_min else str(n)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per (part, kind, width, scheme, n): the per-linear mean ratios' geometric mean and extremes over
    layers and models; per linear and scheme the thresholds; per part and width the largest threshold."""
    grid = result["grid"]
    groups: dict[tuple, dict[str, Any]] = {}
    worst: dict[tuple, dict[str, Any]] = {}
    for model, linears in result["models"].items():
        for name, lin in linears.items():
            for scheme in result["schemes"]:
                key = (lin["part"], lin["kind"], lin["in_features"], scheme)
                g = groups.setdefault(key, {"linears": 0, "cells": {}, "thresholds": [], "rank99": [], "sparse": []})
                g["linears"] += 1
                g["rank99"].append(lin["val_rank99"])
                g["sparse"].append(lin.get("sparse_channels", math.nan))
                for label, cell in lin["schemes"][scheme]["cells"].items():
                    st = cell_stats(cell["ratios"])
                    col = "all" if label == "all" else label
                    c = g["cells"].setdefault(col, {"means": [], "worse": 0, "draw_max": 0.0})
                    c["means"].append(st["mean"])
                    c["worse"] += worse_beyond_spread(st)
                    c["draw_max"] = max(c["draw_max"], st["max"])
                t = thresholds(lin, scheme)
                g["thresholds"].append({"model": model, "linear": name, "val_rank99": lin["val_rank99"], **t})
                wk = (lin["part"], lin["in_features"])
                w = worst.setdefault(wk, {"spread": 0, "mean": 0, "every_draw": 0, "never": []})
                for crit in ("spread", "mean", "every_draw"):
                    if t[crit] is None:
                        w["never"].append(f"{model} {name} {scheme} ({crit})")
                    else:
                        w[crit] = max(w[crit], t[crit])
    rows = []
    for (part, kind, width, scheme), g in sorted(groups.items()):
        cols = {}
        for col, c in g["cells"].items():
            cols[col] = {"geomean": geomean(c["means"]), "max_mean": max(c["means"]), "min_mean": min(c["means"]),
                         "linears": len(c["means"]), "worse_beyond_spread": c["worse"], "max_over_draws": c["draw_max"]}
        ts = g["thresholds"]
        rows.append({"part": part, "kind": kind, "in_features": width, "scheme": scheme, "linears": g["linears"],
                     "val_rank99_median": statistics.median(g["rank99"]),
                     "sparse_channels_median": statistics.median(g["sparse"]), "cols": cols,
                     "threshold_spread_max": _max_threshold([t["spread"] for t in ts]),
                     "threshold_mean_max": _max_threshold([t["mean"] for t in ts]),
                     "threshold_every_draw_max": _max_threshold([t["every_draw"] for t in ts]),
                     "threshold_spread_per_rank99_max": None if any(t["spread"] is None for t in ts)
                     else max(t["spread"] / t["val_rank99"] for t in ts)})
    by_width = [{"part": p, "in_features": w, **v} for (p, w), v in sorted(worst.items())]
    models = []
    for model, linears in result["models"].items():
        for part in ("decoder", "vision"):
            lins = [lin for lin in linears.values() if lin["part"] == part]
            if lins:
                models.append({"model": model, "part": part, "linears": len(lins), "calib_rows": sorted({lin["calib_rows"] for lin in lins}),
                               "distinct_calib_rows_min": min(lin["distinct_calib_rows"] for lin in lins),
                               "distinct_calib_rows_median": statistics.median(lin["distinct_calib_rows"] for lin in lins),
                               "val_rows": sorted({lin["val_rows"] for lin in lins}),
                               "val_rank99": sorted({(lin["in_features"], lin["val_rank99"]) for lin in lins})})
    return {"rows": rows, "by_width": by_width, "models": models, "grid": grid, "rules": rules(result)}


CRITERIA = {"spread": "not worse beyond the spread (mean - std <= 1)", "mean": "not worse on average over draws (mean <= 1)",
            "every_draw": "not worse in any draw (max <= 1)"}


def rules(result: dict[str, Any], current: int = GPTQConfig.min_tokens) -> dict[str, Any]:
    """Per criterion, over every decoder linear and scheme: the smallest fixed row count and the largest
    n / in_features that the thresholds need, and the cases where the current default is too small
    (with their ratio at the default, or at the largest grid n below it)."""
    out: dict[str, Any] = {}
    for crit in CRITERIA:
        cases = []
        for model, linears in result["models"].items():
            for name, lin in linears.items():
                if lin["part"] != "decoder":
                    continue
                for scheme in result["schemes"]:
                    cases.append((model, name, scheme, lin, thresholds(lin, scheme)[crit]))
        never = [f"{m} {n} {s}" for m, n, s, _l, t in cases if t is None]
        known = [(m, n, s, lin, t) for m, n, s, lin, t in cases if t is not None]
        fails = []
        for m, n, s, lin, t in known:
            if t > current:
                below = [c for c in lin["schemes"][s]["cells"].values() if c["n"] <= current]
                at = max(below, key=lambda c: c["n"]) if below else None
                fails.append({"model": m, "linear": n, "scheme": s, "in_features": lin["in_features"], "threshold": t,
                              "n": at["n"] if at else None, **(cell_stats(at["ratios"]) if at else {})})
        out[crit] = {"fixed_n": max((t for *_x, t in known), default=None),
                     "n_per_in": max((t / lin["in_features"] for _m, _n, _s, lin, t in known), default=None),
                     "never": never, "cases": len(cases), "current": current, "current_fails": fails}
    return out


def _max_threshold(ts: list[int | None]) -> int | None:
    return None if any(t is None for t in ts) else max(ts)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def to_markdown(result: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    grid = result["grid"]
    gmin = min(grid)
    lines = ["# MoE experts with few routed rows: from how many rows does GPTQ beat RTN?", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}; {result['seconds']:.0f} s.", "",
             f"Models: {', '.join(result['models'])}. Per model: {result['num_calib']} calibration samples (the pool "
             f"the rows are drawn from) and {result['num_val']} held-out val samples (the error is measured there). "
             f"For every linear, scheme and n in {grid} (n below the pool size) {result['draws']} random draws of n calibration "
             f"rows (the same rows for every linear of a model), GPTQ from those rows (the engine's calibrator, default "
             f"`GPTQConfig`: damping {result['gptq']['damp_percent']:.0%} of the mean Hessian diagonal, no act-order) against "
             "RTN, and the ratio of their held-out errors `sum_t ||(Q - W) x_t||^2` over every val token; `all` = "
             "GPTQ from the whole pool (one solve). Below 1: GPTQ from n rows is better on tokens it never saw. "
             "Weight formats: w4a16 = int4 g128 symmetric, w3a16 = int3 g128 asymmetric, w4a8 = int4 per channel "
             "symmetric (weights only); a group as wide as the row or wider (width 64 and 128) is per channel, so "
             "w4a16 and w4a8 are the same solve there.", "",
             "Rows per model (a row = one token at one linear's input). `distinct`: calibration rows that differ "
             "(fixed prompt templates repeat rows, most at layer 0); `rank99`: principal directions holding 99% of "
             "the val inputs' energy, per linear as (width: ranks).", "",
             "| model | part | linears | calib rows | distinct (min / median) | val rows | rank99 per width |", "|---|---|---:|---:|---:|---:|---|"]
    for m in summary["models"]:
        ranks: dict[int, list[int]] = {}
        for width, r in m["val_rank99"]:
            ranks.setdefault(width, []).append(r)
        rank_txt = "; ".join(f"{w}: {min(r)}-{max(r)}" for w, r in sorted(ranks.items()))
        lines.append(f"| {m['model']} | {m['part']} | {m['linears']} | {'/'.join(map(str, m['calib_rows']))} | "
                     f"{m['distinct_calib_rows_min']} / {m['distinct_calib_rows_median']:.0f} | {'/'.join(map(str, m['val_rows']))} | {rank_txt} |")
    lines.append("")
    for model, names in result.get("unseen", {}).items():
        lines += [f"Left out of {model}: {len(names)} routed expert linears that no calibration or no val token was routed to "
                  f"({sum(names.values())} calibration rows in all).", ""]
    lines += ["## Summary (decoder linears)", "",
              "Over every decoder linear and scheme, the smallest row count from which GPTQ is, at every larger n, "
              f"not worse than RTN by each criterion; as a fixed count and as n / in_features; and the (linear, scheme) cases "
              f"the current default `min_tokens = {GPTQConfig.min_tokens}` lets GPTQ run on too few rows, with the ratio at n = "
              f"{GPTQConfig.min_tokens} (mean ± std, max over draws).", "",
              f"| criterion | fixed n | n / in_features | cases where {GPTQConfig.min_tokens} is too small |", "|---|---:|---:|---|"]
    for crit, r in summary["rules"].items():
        fails = r["current_fails"]
        kinds: dict[str, int] = {}
        for f in fails:
            kinds[f["linear"].rsplit(".", 1)[-1]] = kinds.get(f["linear"].rsplit(".", 1)[-1], 0) + 1
        text = f"{len(fails)} of {r['cases']}"
        if fails:
            w = max(fails, key=lambda f: (f["threshold"], f["mean"]))
            text += (f" ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); largest need: {w['model'].removeprefix('builtin:')} "
                     f"{w['linear'].split('layers.')[-1]} {w['scheme']}, needs {w['threshold']}, at n = {w['n']}: {w['mean']:.2f} ± {w['std']:.2f}, max {w['max']:.2f}")
        fixed = "never" if r["never"] else fmt_n(r["fixed_n"], gmin)
        per_in = "" if r["never"] or r["n_per_in"] is None else (f"in/{1 / r['n_per_in']:.3g}" if r["n_per_in"] < 1 else f"{r['n_per_in']:.3g} x in")
        lines.append(f"| {CRITERIA[crit]} | {fixed} | {per_in} | {text} |")
    lines += ["", "## Held-out error ratio GPTQ(n rows) / RTN", "",
              "Per linear: the mean ratio over draws. Per cell: the geometric mean of that over the linears of the row "
              "(layers x models), then in brackets the worst linear's mean and, after `/`, the largest single draw. "
              "`!k`: k linears where GPTQ is worse than RTN beyond the spread (mean - std of the ratio over draws > 1). "
              "A column holds the linears whose calibration pool has more than n rows (digits-qwen2vl's decoder: 3,072; "
              "its vision merger: 512), so columns of large n cover fewer linears. `val rank99` and `sparse ch` are medians over "
              f"the row's linears; `sparse ch`: input channels whose largest |x| over the calibration rows exceeds {SPARSE_PEAK:.0f}x "
              "their median |x| (near zero on most tokens: a draw of a few rows is likely to miss them).", ""]
    for part in ("decoder", "vision"):
        rows = [r for r in summary["rows"] if r["part"] == part]
        if not rows:
            continue
        lines += [f"### {'Decoder linears (what tlq quantizes)' if part == 'decoder' else 'Vision tower and projector linears (16-bit in tlq; extra widths)'}", ""]
        for scheme in result["schemes"]:
            srows = [r for r in rows if r["scheme"] == scheme]
            cols = [str(n) for n in grid if any(str(n) in r["cols"] for r in srows)] + ["all"]
            lines += [f"**{scheme}**", "",
                      "| kind | in | linears | val rank99 | sparse ch | " + " | ".join(f"n={c}" for c in cols) + " |",
                      "|---|---:|---:|---:|---:|" + "---:|" * len(cols)]
            for r in srows:
                cells = []
                for c in cols:
                    v = r["cols"].get(c)
                    if v is None:
                        cells.append("")
                        continue
                    flag = f" !{v['worse_beyond_spread']}" if v["worse_beyond_spread"] else ""
                    cells.append(f"{v['geomean']:.2f} ({v['max_mean']:.2f}/{v['max_over_draws']:.2f}){flag}")
                lines.append(f"| {r['kind']} | {r['in_features']} | {r['linears']} | {r['val_rank99_median']:.0f} | {r['sparse_channels_median']:.0f} | "
                             + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Thresholds", "",
              "Per linear and scheme: the smallest grid n from which no larger n is worse than RTN, by three criteria: "
              "beyond the spread (mean - std > 1), on average (mean > 1), in any single draw (max > 1). Per row the "
              "largest over its linears, also as n / in_features; `never`: even the whole pool is worse. "
              f"`<= {gmin}`: already at the smallest n tried. `n*/rank99`: the largest of n* (spread) / the linear's "
              "rank99.", "",
              "| part | kind | in | scheme | n* (spread) | n*/in | n*/rank99 | n* (mean) | n* (every draw) | n*/in (every draw) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        ts, tm, td = r["threshold_spread_max"], r["threshold_mean_max"], r["threshold_every_draw_max"]
        ratio = "" if ts is None else f"{ts / r['in_features']:.3g}"
        ratio_d = "" if td is None else f"{td / r['in_features']:.3g}"
        per_rank = r["threshold_spread_per_rank99_max"]
        per_rank = "" if per_rank is None else f"{per_rank:.2g}"
        lines.append(f"| {r['part']} | {r['kind']} | {r['in_features']} | {r['scheme']} | {fmt_n(ts, gmin)} | {ratio} | {per_rank} | "
                     f"{fmt_n(tm, gmin)} | {fmt_n(td, gmin)} | {ratio_d} |")
    lines += ["", "Largest threshold per input width (all kinds and schemes):", "",
              "| part | in | n* (spread) | n*/in | n* (mean) | n* (every draw) | n*/in (every draw) | never |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for w in summary["by_width"]:
        lines.append(f"| {w['part']} | {w['in_features']} | {fmt_n(w['spread'], gmin)} | {w['spread'] / w['in_features']:.3g} | "
                     f"{fmt_n(w['mean'], gmin)} | {fmt_n(w['every_draw'], gmin)} | {w['every_draw'] / w['in_features']:.3g} | "
                     f"{'; '.join(w['never']) or '-'} |")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="builtin:digits-qwen2vl,builtin:digits-llavaov,builtin:needle-qwen2vl")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES)
    p.add_argument("--grid", default=DEFAULT_GRID, help="row counts n")
    p.add_argument("--draws", type=int, default=8, help="random draws of n rows per n")
    p.add_argument("--num-calib", type=int, default=128, help="calibration samples: the pool the rows are drawn from")
    p.add_argument("--num-val", type=int, default=128, help="held-out val samples the error is measured on")
    p.add_argument("--parts", default="decoder,vision", help="decoder and/or vision (vision tower + projector: extra widths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/moe-min-tokens")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    grid = sorted(int(n) for n in args.grid.split(","))
    schemes = {s: SCHEMES[s].weights for s in args.schemes.split(",")}
    cfg = GPTQConfig()
    result: dict[str, Any] = {
        "command": command_line("moe_min_tokens.py", argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "grid": grid, "draws": args.draws, "num_calib": args.num_calib, "num_val": args.num_val, "seed": args.seed,
        "schemes": list(schemes), "gptq": cfg.__dict__, "models": {}, "seconds": 0.0}
    for model in args.models.split(","):
        resolve_model_dir(model)  # fail early on a wrong name
        recs, unseen = capture(model, args.num_calib, args.num_val, set(args.parts.split(",")))
        result["models"][model] = {}
        if unseen:
            result.setdefault("unseen", {})[model] = unseen
        for name, rec in recs.items():
            result["models"][model][name] = measure_linear(rec, schemes, grid, args.draws, args.seed, cfg)
            print(f"{model} {name}: {time.perf_counter() - start:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - start
    summary = summarize(result)
    result["summary"] = summary
    write_report(args.out, result, to_markdown(result, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
