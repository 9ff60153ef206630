"""benchmarks/cost.py's process timing: peak RSS from the OS's rusage of the one child (no /usr/bin/time)."""

from __future__ import annotations

import sys

import pytest


def test_timed_reads_each_childs_own_peak_rss_and_output(benchmark):
    cost = benchmark("cost")
    big = [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok')"]
    small = [sys.executable, "-c", "print('small')"]
    proc, seconds, rss_big = cost._timed(big)
    assert proc.stdout.strip() == "ok" and seconds > 0
    assert rss_big >= 300  # MiB: the 300 MiB the child touched
    _proc, _s, rss_small = cost._timed(small)
    assert rss_small < rss_big - 250  # per child, not the running maximum over all children


def test_timed_raises_with_the_childs_error(benchmark):
    cost = benchmark("cost")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        cost._timed([sys.executable, "-c", "1 / 0"])


def test_report_names_keep_their_dots(benchmark, tmp_path):
    """``docs/cost-qwen3.5-0.8b`` is a name, not ``docs/cost-qwen3.5-0`` with a suffix."""
    report = benchmark("_report")
    report.write_report(tmp_path / "cost-qwen3.5-0.8b", {"x": 1}, ["| a |"])
    report.write_report(tmp_path / "plain.json", {"y": 2}, ["| b |"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cost-qwen3.5-0.8b.json", "cost-qwen3.5-0.8b.md", "plain.json", "plain.md"]
    assert (tmp_path / "cost-qwen3.5-0.8b.md").read_text() == "| a |\n"


def test_cost_variants_reach_the_config_they_name(benchmark):
    """Each named variant of ``--methods`` is tlq's CLI flags on its base method: they must parse and set the
    token set's draw and budget they name (a typo would otherwise only fail minutes into a cost run)."""
    from tlq.cli import build_parser
    from tlq.config import OPTIONS, build_config

    cost = benchmark("cost")
    assert {"tlq-coupled-10", "tlq-importance-25", "tlq-sampled-10-experts-every-row"} <= set(cost.VARIANTS)
    for name, (base, flags) in cost.VARIANTS.items():
        args = build_parser().parse_args(["quantize", "--model", "m", "--calib", "c", "--out", "o", "--method", base, *flags])
        cfg = build_config(args.scheme, args.method, **{o.name: getattr(args, o.name) for o in OPTIONS})
        rank, pct = name.split("-")[1:3]
        assert (cfg.selection.rank, cfg.selection.token_fraction, cfg.selection.token_floor) == (rank, int(pct) / 100, 0)
        assert cfg.selection.experts_every_row is name.endswith("-experts-every-row")
