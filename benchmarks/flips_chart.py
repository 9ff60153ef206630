#!/usr/bin/env python
"""Draw the flips of an accuracy report: per (model, scheme), every method's answers lost and gained.

    python benchmarks/flips_chart.py docs/needle/table-test.json --out docs/needle/flips-test.png

A flip is a sample answered right by FP16 and wrong by the quantized model (lost, drawn to the left in red)
or the reverse (gained, to the right in green), mean per calibration run (``accuracy.cell_flips``).
Why a picture: accuracy is gained minus lost, so two methods at the same accuracy can sit at very different
bar lengths; the table's numbers say it, the bars show it at a glance. Only PIL is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import cell_flips  # noqa: E402  (a sibling script, not a package)

from tlq.importance.visualize import load_font, measure_text  # noqa: E402
from tlq.utils.io import atomic_save  # noqa: E402

LOST, GAINED, INK, GRID = (200, 40, 40), (40, 150, 60), (30, 30, 30), (200, 200, 200)
ROW, LABEL, HALF, PAD = 18, 230, 260, 12  # pixels: bar row, method-name column, each half of the axis, margins


def panels(report: dict[str, Any], schemes: list[str] | None, methods: list[str] | None) -> list[tuple[str, list[tuple[str, float, float]]]]:
    """(title, [(method, lost, gained), ...]) per (model, scheme) with per-sample results, in report order;
    lost and gained are means per run, so a deterministic method's one run compares with three seeds."""
    out = []
    for model, rows in report["models"].items():
        reference = rows["fp16"].get("correct", "")
        by_scheme: dict[str, list[tuple[str, float, float]]] = {}
        for cell in rows["cells"].values():
            if (schemes and cell["scheme"] not in schemes) or (methods and cell["variant"] not in methods):
                continue
            f = cell_flips(cell, reference)
            if f is not None:
                runs = len(cell["runs"])
                by_scheme.setdefault(cell["scheme"], []).append((cell["variant"], f["lost"] / runs, f["gained"] / runs))
        out += [(f"{model}, {scheme} (FP16 {100 * rows['fp16']['accuracy']:.1f}% on {len(reference)} samples)", bars)
                for scheme, bars in by_scheme.items()]
    return out


def draw(panel_list: list[tuple[str, list[tuple[str, float, float]]]]) -> Image.Image:
    """One image, panels stacked; every panel shares the axis scale so bar lengths compare across panels."""
    if not panel_list:
        raise SystemExit("no cell of the report has per-sample results to count flips from")
    top = max(max(lost, gained) for _, bars in panel_list for _, lost, gained in bars) or 1
    title_font, small = load_font(13), load_font(11)
    height = PAD + sum(2 * ROW + len(bars) * ROW + PAD for _, bars in panel_list) + 2 * ROW
    width = LABEL + 2 * HALF + 2 * PAD + 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    x0 = PAD + LABEL + HALF  # the axis: no flip
    y = PAD
    for title, bars in panel_list:
        d.text((PAD, y), title, fill=INK, font=title_font)
        y += 2 * ROW
        d.line([(x0, y - 4), (x0, y + len(bars) * ROW)], fill=GRID)
        for name, lost, gained in bars:
            d.text((PAD + LABEL - 8 - measure_text(d, name, small), y + 2), name, fill=INK, font=small)
            wl, wg = round(HALF * lost / top), round(HALF * gained / top)
            d.rectangle([x0 - wl, y + 3, x0, y + ROW - 3], fill=LOST)
            d.rectangle([x0, y + 3, x0 + wg, y + ROW - 3], fill=GAINED)
            label = f"-{lost:.0f} / +{gained:.0f}"
            d.text((x0 + wg + 6, y + 2), label, fill=INK, font=small)
            y += ROW
        y += PAD
    d.text((PAD, y), "red: right in FP16, wrong quantized (lost)   green: wrong in FP16, right quantized (gained)   "
                     "mean per calibration run", fill=INK, font=small)
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="a benchmarks/accuracy.py JSON report")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--schemes", default="", help="comma-separated schemes to draw (default: all)")
    p.add_argument("--methods", default="", help="comma-separated methods to draw (default: all)")
    args = p.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()] or None  # noqa: E731
    img = draw(panels(report, split(args.schemes), split(args.methods)))
    atomic_save(args.out, lambda tmp: img.save(tmp, format="PNG"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
