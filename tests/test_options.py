"""One schema (tlq.config.OPTIONS) makes build_config's keywords and the CLI's flags: each flag must reach
its field, and each default must be what the help says."""

from __future__ import annotations

import pytest

from tlq.cli import build_parser
from tlq.config import OPTIONS, ConfigError, QuantizeConfig, _get_path, build_config

# A value different from the gptq preset's for each option (as typed on the command line), and the field value it gives.
NON_DEFAULT = {
    "num_samples": ("7", 7), "max_seq_len": ("100", 100), "seed": ("3", 3), "error_samples": ("0", 0), "group_size": ("-1", None),
    "symmetric": (None, True), "damp_percent": ("0.05", 0.05), "block_size": ("64", 64), "act_order": (None, True), "gptq_min_tokens": ("128", 128), "gptq_min_tokens_in": ("8", 8), "gptq_stats_memory": ("0.5", 0.5),
    "solver": ("rtn", "rtn"), "gptq_target": ("fp", "fp"), "scale_search": ("awq", "awq"), "search_grid": ("5", 5), "search_coarse": ("3", 3),
    "search_scope": ("block", "block"), "search_samples": ("9", 9), "search_dtype": ("bfloat16", "bfloat16"), "search_record": ("layer", "layer"),
    "importance_dtype": ("bfloat16", "bfloat16"), "weighting": ("token", "token"),
    "token_select": (None, True), "grad_at": ("input", "input"), "token_fraction": ("0.25", 0.25), "token_floor": ("12345", 12345),
    "sample_weights": ("curvature", "curvature"), "token_rank": ("random", "random"),
    "kept_rows_passes": (None, True), "gptq_fp_shift": ("deferred", "deferred"),
    "quantized_inputs": (None, True), "device": ("cpu", "cpu"), "dtype": ("float32", "float32"), "experts_every_row": (None, True),
}

METHOD_FOR = {"quantized_inputs": "awq"}  # gptq already calibrates on the quantized path


def test_the_table_covers_every_option():
    assert set(NON_DEFAULT) == {o.name for o in OPTIONS}


@pytest.mark.parametrize("opt", OPTIONS, ids=[o.name for o in OPTIONS])
def test_each_flag_reaches_its_field(opt):
    text, expected = NON_DEFAULT[opt.name]
    method = METHOD_FOR.get(opt.name, "gptq")
    argv = ["quantize", "--model", "m", "--out", "o", "--scheme", "w3a16", "--method", method, opt.cli_flag] + ([] if text is None else [text])
    args = build_parser().parse_args(argv)
    cfg = build_config(args.scheme, args.method, **{o.name: getattr(args, o.name) for o in OPTIONS})
    baseline = build_config("w3a16", method)
    assert _get_path(cfg, opt.path) == expected != _get_path(baseline, opt.path)
    if opt.negative:  # the opposite flag sets False
        args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", opt.negative])
        assert _get_path(build_config("w3a16", "gptq", **{opt.name: getattr(args, opt.name)}), opt.path) is False


def test_unset_options_keep_the_preset_and_the_field_defaults():
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "tlq"])
    cfg = build_config("w4a8", "tlq", **{o.name: getattr(args, o.name) for o in OPTIONS})
    assert cfg == build_config("w4a8", "tlq")
    assert cfg.gptq.target == "fp" and cfg.search.kind == "smoothquant" and cfg.calib == QuantizeConfig().calib
    for opt in OPTIONS:  # the help's default is the field's own where no preset or scheme decides
        if "(default: the" not in opt.help_text() and "(default" not in opt.help:
            assert opt.help_text().endswith(f"(default: {_get_path(QuantizeConfig(), opt.path)})")


def test_tlq_preset_carries_the_three_rounding_level_cuts_and_the_baselines_do_not():
    """The cuts that passed the paired non-inferiority rule (docs/methods.md) are TLQ's alone; each is
    overridable back to the path it replaced, and a switched search kind keeps the record choice."""
    tlq = build_config("w3a16", "tlq")
    assert (tlq.search.record, tlq.selection.kept_rows_passes, tlq.gptq.fp_shift) == ("layer", True, "deferred")
    for method in ("awq", "mbq", "smoothquant", "gptq"):
        base = build_config("w3a16", method)
        assert (base.search.record, base.selection.kept_rows_passes, base.gptq.fp_shift) == ("mapping", False, "applied")
    old = build_config("w3a16", "tlq", search_record="mapping", kept_rows_passes=False, gptq_fp_shift="applied")
    assert (old.search.record, old.selection.kept_rows_passes, old.gptq.fp_shift) == ("mapping", False, "applied")
    assert build_config("w3a16", "tlq", scale_search="smoothquant").search.record == "layer"
    help_of = {o.name: o.help_text() for o in OPTIONS}
    assert all(help_of[n].endswith("(default: the --method preset's)") for n in ("search_record", "kept_rows_passes", "gptq_fp_shift"))


def test_scale_search_kind_change_starts_from_that_kind():
    """Plain SmoothQuant's fixed 0.5 does not follow a switch to AWQ; auto picks by the scheme."""
    assert build_config("w8a8", "smoothquant").search.fixed_alpha == 0.5
    assert build_config("w8a8", "smoothquant", scale_search="awq").search.fixed_alpha is None
    assert build_config("w8a8", "gptq", scale_search="auto").search.kind == "smoothquant"
    assert build_config("w4a16", "gptq", scale_search="auto").search.kind == "awq"


def test_unknown_or_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown option"):
        build_config("w4a16", "gptq", damp=0.1)
    with pytest.raises(ConfigError, match="--group-size must be a positive"):
        build_config("w4a16", "gptq", group_size=0)
