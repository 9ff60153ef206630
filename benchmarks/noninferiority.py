"""Is a new setting not worse than a reference by more than a margin? Paired over seeds and cells of one run.

    python benchmarks/noninferiority.py --run docs/accuracy-three-cuts-R.json docs/accuracy-three-cuts-C.json \\
        --new 'TLQ three rounding-level cuts' --ref TLQ --margin 1.25 --max-cell 1.5 --out docs/noninferiority-three-cuts

Reads ``benchmarks/accuracy.py`` JSONs holding the two variants (one run, or two processes of one run side by
side: same seeds, hence the same calibration samples, and the same scored samples) and applies the rule of docs/methods.md for rounding-level changes:

1. mean accuracy of ``--new`` within one scored sample of ``--ref``'s in every cell;
2. the one-sided upper confidence bound of the geometric-mean KL ratio over all (cell, seed) pairs
   (:func:`tlq.eval.paired.ratio_upper_bound`) at most ``--margin``;
3. no cell's geometric-mean ratio above ``--max-cell``.

Why KL ratios and not differences: KL spans orders of magnitude between cells, and a rounding-level change
scales a run's KL by a factor either way; the log ratio's mean is the systematic effect.

For a change that is not rounding-level (a token set's budget or draw: each seed calibrates on other tokens,
so accuracy moves by several val samples either way), ``--accuracy-margin POINTS`` replaces rule 1 by two
one-sided ones: the one-sided lower confidence bound of the mean accuracy difference over all (cell, seed)
pairs (:func:`tlq.eval.paired.difference_lower_bound`) at least ``-POINTS``, and no cell's mean accuracy
below the reference's by more than ``--accuracy-cell`` val samples (better is no failure).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from _report import command_line, write_report
from tlq.eval.paired import difference_lower_bound, ratio_upper_bound


def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's shape from several: every model's cells together. Refuses runs scored differently."""
    keys = {(r["data"], r["num_test"], r["num_calib"]) for r in runs}
    if len(keys) != 1:
        raise SystemExit(f"the runs were not scored alike (data, samples, calibration samples): {sorted(keys)}")
    out = {**runs[0], "models": {}, "command": " ; ".join(r["command"] for r in runs)}
    for r in runs:
        for model, res in r["models"].items():
            out["models"].setdefault(model, {"cells": []})["cells"] += list(res["cells"].values())
    return out


def paired_cells(run: dict[str, Any], new: str, ref: str) -> list[dict[str, Any]]:
    """Per (model, scheme): the two variants' runs paired by seed."""
    cells = []
    for model, res in run["models"].items():
        by: dict[tuple[str, str], dict[str, Any]] = {}
        for c in res["cells"]:
            if (c["scheme"], c["variant"]) in by:
                raise SystemExit(f"{model} {c['scheme']} {c['variant']!r} is in more than one run: which one to pair is ambiguous")
            by[(c["scheme"], c["variant"])] = c
        for scheme in dict.fromkeys(s for s, _v in by):
            a, b = by.get((scheme, new)), by.get((scheme, ref))
            if a is None or b is None:
                continue
            ref_runs = {r["seed"]: r for r in b["runs"]}
            pairs = [(r, ref_runs[r["seed"]]) for r in a["runs"] if r["seed"] in ref_runs]
            cells.append({"model": model, "scheme": scheme, "pairs": pairs, "accuracy": (a["accuracy"]["mean"], b["accuracy"]["mean"])})
    return cells


def decide(run: dict[str, Any], new: str, ref: str, margin: float, max_cell: float, confidence: float,
           accuracy_margin: float | None = None, accuracy_cell: float = 1.0) -> dict[str, Any]:
    """Rules 1-3 of the module docstring (rule 1 as ``--accuracy-margin`` puts it, where given)."""
    cells = paired_cells(run, new, ref)
    if not cells:
        raise SystemExit(f"no cell of the run holds both {new!r} and {ref!r}")
    one_sample = 1.0 / run["num_test"]
    rows, kl_new, kl_ref, acc_new, acc_ref = [], [], [], [], []
    for c in cells:
        kn, kr = [p[0]["kl"] for p in c["pairs"]], [p[1]["kl"] for p in c["pairs"]]
        kl_new += kn
        kl_ref += kr
        acc_new += [p[0].get("accuracy", math.nan) for p in c["pairs"]]
        acc_ref += [p[1].get("accuracy", math.nan) for p in c["pairs"]]
        geo = math.exp(sum(math.log(a / b) for a, b in zip(kn, kr)) / len(kn))
        acc_gap = (c["accuracy"][0] - c["accuracy"][1]) / one_sample  # in scored samples
        rows.append({"model": c["model"], "scheme": c["scheme"], "seeds": [p[0]["seed"] for p in c["pairs"]], "kl_new": kn, "kl_ref": kr,
                     "geomean_ratio": geo, "accuracy_new": c["accuracy"][0], "accuracy_ref": c["accuracy"][1], "accuracy_gap_samples": acc_gap,
                     "accuracy_ok": (abs(acc_gap) if accuracy_margin is None else -acc_gap) <= accuracy_cell + 1e-9, "cell_ok": geo <= max_cell})
    bound = ratio_upper_bound(kl_new, kl_ref, confidence)
    passed = all(r["accuracy_ok"] and r["cell_ok"] for r in rows) and bound.upper <= margin
    accuracy = None
    if accuracy_margin is not None:
        accuracy = difference_lower_bound(acc_new, acc_ref, confidence).to_dict()
        passed = passed and 100 * accuracy["lower"] >= -accuracy_margin
    return {"new": new, "ref": ref, "margin": margin, "max_cell": max_cell, "bound": bound.to_dict(), "cells": rows, "passed": passed,
            "accuracy_margin": accuracy_margin, "accuracy_cell": accuracy_cell, "accuracy_bound": accuracy}


def to_markdown(result: dict[str, Any]) -> list[str]:
    d = result["decision"]
    b = d["bound"]
    lines = [f"# {d['new']} against {d['ref']}: paired non-inferiority", "", f"Command: `{result['command']}`", f"Run: `{result['run_command']}`", "",
             "| cell | seeds | KL ratio per seed (new / ref) | geometric mean | accuracy % (new / ref) | gap (val samples) |",
             "|---|---|---|---:|---|---:|"]
    for r in d["cells"]:
        per_seed = ", ".join(f"{a / b_:.2f}" for a, b_ in zip(r["kl_new"], r["kl_ref"]))
        flag = "" if r["cell_ok"] else " **over**"
        lines.append(f"| {r['model']} {r['scheme']} | {','.join(map(str, r['seeds']))} | {per_seed} | {r['geomean_ratio']:.2f}{flag} | "
                     f"{100 * r['accuracy_new']:.2f} / {100 * r['accuracy_ref']:.2f} | {r['accuracy_gap_samples']:+.2f} |")
    lines += ["", f"Over all {b['n']} pairs: geometric-mean ratio **{b['geomean']:.3f}**, one-sided {100 * b['confidence']:.0f}% upper bound "
              f"**{b['upper']:.3f}** (margin {d['margin']}), log-ratio std {b['log_std']:.2f}; every cell at most {d['max_cell']}: "
              f"{'yes' if all(r['cell_ok'] for r in d['cells']) else 'no'}; " + _accuracy_line(d), "", f"**Verdict: {'PASS' if d['passed'] else 'FAIL'}.**"]
    return lines


def _accuracy_line(d: dict[str, Any]) -> str:
    """Rule 1 as this decision applied it, with its outcome."""
    cells_ok = "yes" if all(r["accuracy_ok"] for r in d["cells"]) else "no"
    a = d.get("accuracy_bound")
    if a is None:
        return f"accuracy within {d.get('accuracy_cell', 1.0):g} val sample(s) everywhere: {cells_ok}."
    return (f"no cell's accuracy more than {d['accuracy_cell']:g} val samples below the reference's: {cells_ok}; mean accuracy difference "
            f"over the {a['n']} pairs **{100 * a['mean']:+.2f}** points, one-sided {100 * a['confidence']:.0f}% lower bound **{100 * a['lower']:+.2f}** "
            f"(margin -{d['accuracy_margin']:g}).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, nargs="+", help="benchmarks/accuracy.py JSONs that hold the two variants between them")
    p.add_argument("--new", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--margin", type=float, default=1.25, help="largest acceptable upper bound of the geometric-mean KL ratio")
    p.add_argument("--max-cell", type=float, default=1.5, help="largest acceptable geometric-mean KL ratio of any one cell")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--accuracy-margin", type=float, default=None, metavar="POINTS",
                   help="judge accuracy by the lower bound of its mean paired difference (at least -POINTS) and one-sided cells (see the docstring)")
    p.add_argument("--accuracy-cell", type=float, default=1.0, metavar="SAMPLES", help="largest accuracy gap of one cell, in val samples")
    p.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    if args.new == args.ref:
        p.error("--new and --ref name the same variant")
    run = merged([json.loads(Path(f).read_text()) for f in args.run])
    result = {"command": command_line("noninferiority.py", argv), "run_command": run["command"],
              "decision": decide(run, args.new, args.ref, args.margin, args.max_cell, args.confidence, args.accuracy_margin, args.accuracy_cell)}
    write_report(args.out, result, to_markdown(result))
    return 0 if result["decision"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
