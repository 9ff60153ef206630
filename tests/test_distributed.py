"""tlq.engine.distributed: sharding, the all-reduce helpers on 2 real gloo ranks, the launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tlq.config import ConfigError
from tlq.engine import distributed as D
from tlq.utils.io import raise_on_sigterm
from tlq.quant.gptq import HessianAccumulator
from tlq.quant.scale_search import ChannelStatsAccumulator

N_SAMPLES, IN = 7, 12


def make_samples(n: int = N_SAMPLES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic calibration-like samples: tokens [1, seq, IN] and token weights [1, seq] over decades."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for i in range(n):
        seq = 3 + (5 * i) % 11
        x = torch.randn(1, seq, IN, generator=g) * (1 + i)
        w = torch.rand(1, seq, generator=g) * 10.0 ** torch.randint(-3, 3, (1, seq), generator=g)
        w[0, 0] = 0.0  # a dropped token
        out.append((x, w))
    return out


def compute(indices: list[int], n: int = N_SAMPLES) -> dict[str, object]:
    """The statistics of the samples ``indices`` (one rank's shard, or all of them)."""
    samples = make_samples(n)
    h = HessianAccumulator(IN)
    c = ChannelStatsAccumulator(IN)
    amax = torch.zeros(IN, dtype=torch.bfloat16)
    fsum = torch.zeros(3, IN, dtype=torch.float32)
    loss = 0.0
    for i in indices:
        x, w = samples[i]
        h.add(x, w)
        c.add(x, w)
        amax = torch.maximum(amax, x.abs().amax(dim=(0, 1)).to(torch.bfloat16))
        fsum += x[0, :3]
        loss += float((x.pow(2).sum(-1) * w).sum())
    return {"h": h, "c": c, "amax": amax, "fsum": fsum, "loss": loss}


# --------------------------------------------------------------------------------------------------
# sharding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_indices_cover_every_sample_once(world):
    for n in range(0, 11):
        shards = [D.shard_indices(n, D.DistContext(rank=r, world_size=world)) for r in range(world)]
        flat = [i for s in shards for i in s]
        assert flat == list(range(n))  # contiguous, in rank order, each sample exactly once
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
        assert shards == [D.shard_indices(n, D.DistContext(rank=r, world_size=world)) for r in range(world)]


def test_shard_indices_balance_costs():
    costs = [100, 1, 1, 1, 1, 1, 1, 1, 1, 100]
    shards = [D.shard_indices(10, D.DistContext(rank=r, world_size=2), costs=costs) for r in range(2)]
    assert [i for s in shards for i in s] == list(range(10))
    assert shards[0] == [0, 1, 2, 3, 4]
    shards3 = [D.shard_indices(3, D.DistContext(rank=r, world_size=4), costs=[0, 0, 0]) for r in range(4)]
    assert sorted(i for s in shards3 for i in s) == [0, 1, 2]
    with pytest.raises(ValueError):
        D.shard_indices(2, D.DistContext(), costs=[1.0])
    with pytest.raises(ValueError):
        D.shard_indices(2, D.DistContext(), costs=[1.0, float("nan")])


# --------------------------------------------------------------------------------------------------
# single process: no torch.distributed calls at all
# --------------------------------------------------------------------------------------------------


def test_single_process_makes_no_dist_calls(monkeypatch):
    D.shutdown()
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)

    def forbidden(*_a, **_k):
        raise AssertionError("torch.distributed was called in a single process")

    for name in ("init_process_group", "all_reduce", "broadcast", "broadcast_object_list", "all_gather_object", "barrier", "destroy_process_group", "is_initialized", "get_world_size"):
        monkeypatch.setattr(dist, name, forbidden)
    try:
        ctx = D.init_distributed("cpu")
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (0, 1, 0, None)
        assert ctx.is_main and not ctx.enabled
        assert D.shard_indices(5, ctx) == [0, 1, 2, 3, 4]
        ref = compute(list(range(N_SAMPLES)))
        got = compute(list(range(N_SAMPLES)))
        D.reduce_hessian_(got["h"])
        D.reduce_channel_stats_(got["c"])
        D.all_reduce_max_(got["amax"])
        D.all_reduce_sum_(got["fsum"])
        assert torch.equal(got["h"].raw_sum, ref["h"].raw_sum) and torch.equal(got["c"].abs_sum, ref["c"].abs_sum)
        assert got["c"].total == ref["c"].total and torch.equal(got["amax"], ref["amax"]) and torch.equal(got["fsum"], ref["fsum"])
        assert D.all_reduce_scalar_sum(1.5) == 1.5 and D.all_reduce_scalars_sum([1, 2]) == [1.0, 2.0]
        assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_object(3) == [3]
        t = torch.ones(2)
        assert D.broadcast_(t) is t
        D.barrier()
        D.assert_same_across_ranks("x", t)
        assert ctx.device_for("cpu") == torch.device("cpu")
    finally:
        D.shutdown()


def test_bad_torchrun_environment_is_a_config_error(monkeypatch):
    D.shutdown()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("must not init"))
    try:
        with pytest.raises(ConfigError, match="torchrun"):
            D.init_distributed("cpu")
    finally:
        D.shutdown()


# --------------------------------------------------------------------------------------------------
# two real gloo ranks
# --------------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from tlq.engine import distributed as D
    from test_distributed import N_SAMPLES, compute

    ctx = D.init_distributed("cpu")
    assert ctx.enabled and ctx.backend == "gloo" and ctx.world_size == 2
    out = {"rank": ctx.rank, "main": ctx.is_main}
    for n in (N_SAMPLES, 1):  # with n=1 rank 1's shard is empty and it still takes part
        shard = D.shard_indices(n, ctx)
        s = compute(shard, n)
        D.reduce_hessian_(s["h"])
        D.reduce_channel_stats_(s["c"])
        D.all_reduce_max_(s["amax"])
        D.all_reduce_sum_(s["fsum"])
        loss = D.all_reduce_scalar_sum(s["loss"])
        losses = D.all_reduce_scalars_sum([s["loss"], 1.0])
        out[n] = {"shard": shard, "raw_sum": s["h"].raw_sum, "total_weight": s["h"].total_weight,
                  "num_tokens": s["h"].num_tokens, "hessian": s["h"].hessian, "abs_sum": s["c"].abs_sum,
                  "abs_max": s["c"].abs_max, "total": s["c"].total, "amax": s["amax"], "fsum": s["fsum"],
                  "loss": loss, "losses": losses}
    out["obj"] = D.broadcast_object({"alpha": 0.25 + ctx.rank, "rank": ctx.rank})
    t = torch.full((3,), float(ctx.rank))
    D.broadcast_(t)
    out["bcast"] = t
    out["gathered"] = D.all_gather_object(ctx.rank * 10)
    D.assert_same_across_ranks("hessian", out[N_SAMPLES]["raw_sum"])
    try:
        D.assert_same_across_ranks("rank tensor", torch.tensor([ctx.rank]))
        out["diverged"] = "not detected"
    except RuntimeError as exc:
        out["diverged"] = str(exc)
    # resume state, collectively: rank 0 writes the layer, every rank its own shard of the streams
    from tlq.config import ConfigError
    from tlq.engine.checkpoint import ResumeState, run_fingerprint
    parts = {"config": {"scheme": "w4a16"}}
    where = f"{sys.argv[1]}/resume"
    st = ResumeState(where, run_fingerprint(parts), parts)
    st.open()
    mine = [torch.full((2,), float(10 * ctx.rank + i)) for i in range(2 + ctx.rank)]
    st.save_layer(0, {"w": torch.ones(2)}, {}, {"x": mine}, {"i": 0})
    st.save_layer(1, {"w": torch.ones(2) * 2}, {}, {"x": [t + 1 for t in mine]}, {"i": 1})
    st.close()
    changed = {"config": {"scheme": "w3a16"}}
    try:
        ResumeState(where, run_fingerprint(changed), changed).open()
        out["mismatch"] = "not refused"
    except ConfigError as exc:  # refused on every rank, not only on rank 0
        out["mismatch"] = str(exc)
    again = ResumeState(where, run_fingerprint(parts), parts)
    out["resume_completed"] = again.open()
    out["resume_streams"] = again.load_streams(1)["x"]
    out["resume_layer"] = again.load_layer(1)[0]["w"]
    again.cleanup()
    out["resume_removed"] = not __import__("os").path.exists(where)
    def fail_on_rank1():
        if ctx.rank == 1:
            raise ValueError("disk full")
        return "done"
    try:
        out["step"] = D.collective_step(fail_on_rank1, "writing")
    except Exception as exc:  # every rank raises at once instead of waiting for a timeout
        out["step"] = f"{type(exc).__name__}: {exc}"
    out["main_step"] = D.collective_step(lambda: "ran", "main only", main_only=True)
    D.barrier()
    torch.save(out, f"{sys.argv[1]}/rank{ctx.rank}.pt")
    D.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "TLQ_DIST_TIMEOUT": "60"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp), str(Path(__file__).parent)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=90)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("n", [N_SAMPLES, 1])
def test_all_reduce_helpers_match_single_process(two_rank_results, n):
    r0, r1 = (r[n] for r in two_rank_results)
    assert r0["shard"] + r1["shard"] == list(range(n))
    # every rank holds bitwise the same reduced statistics ...
    for key in ("raw_sum", "total_weight", "num_tokens", "hessian", "abs_sum", "abs_max", "amax", "fsum"):
        assert torch.equal(r0[key], r1[key]), key
    assert r0["total"] == r1["total"] and r0["loss"] == r1["loss"] and r0["losses"] == r1["losses"]
    # ... equal to one process fed every sample, up to float64 reduction order
    ref = compute(list(range(n)), n)
    h, c = ref["h"], ref["c"]

    def close(a, b, tol=1e-12):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-300)

    assert r0["raw_sum"].dtype == torch.float64 and close(r0["raw_sum"], h.raw_sum)
    assert close(r0["total_weight"], h.total_weight) and close(r0["hessian"], h.hessian)
    assert int(r0["num_tokens"]) == int(h.num_tokens)
    assert close(r0["abs_sum"], c.abs_sum) and close(r0["total"], c.total)
    assert torch.equal(r0["abs_max"], c.abs_max) and torch.equal(r0["amax"], ref["amax"])  # maxima are exact
    assert r0["amax"].dtype == torch.bfloat16 and r0["fsum"].dtype == torch.float32
    assert close(r0["fsum"], ref["fsum"], 1e-6)
    assert close(r0["loss"], ref["loss"]) and close(r0["losses"][0], ref["loss"]) and r0["losses"][1] == 2.0


def test_broadcast_gather_and_divergence_check(two_rank_results):
    r0, r1 = two_rank_results
    assert r0["main"] and not r1["main"]
    assert r0["obj"] == r1["obj"] == {"alpha": 0.25, "rank": 0}
    assert torch.equal(r1["bcast"], torch.zeros(3))
    assert r0["gathered"] == r1["gathered"] == [0, 10]
    assert "ranks [1] differ" in r0["diverged"] and r0["diverged"] == r1["diverged"]


# --------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------


def test_strip_nproc_and_command():
    argv = ["quantize", "--model", "m", "--nproc", "4", "--out", "o", "--nproc=2", "--", "--nproc", "9"]
    assert D.strip_nproc(argv) == ["quantize", "--model", "m", "--out", "o", "--", "--nproc", "9"]
    cmd = D.torchrun_command(3, ["quantize", "--nproc", "3", "--model", "m"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "3"
    assert cmd[-5:] == ["-m", "tlq", "quantize", "--model", "m"]


def test_launch_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    seen = {}

    def fake_run(cmd, check):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 7)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert D.launch_torchrun(2, ["quantize", "--nproc", "2", "--model", "m"]) == 7
    logs = seen["cmd"][seen["cmd"].index("--log-dir") + 1]
    assert seen["cmd"] == D.torchrun_command(2, ["quantize", "--model", "m"], logs)
    assert Path(logs).name.startswith("tlq-torchrun-") and not Path(logs).exists()  # tlq's own folder, removed after
    with pytest.raises(ConfigError, match="--nproc must be"):
        D.launch_torchrun(0, [])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="already runs under torchrun"):
        D.launch_torchrun(2, [])


def test_launch_torchrun_for_real(monkeypatch, tmp_path):
    """The real torchrun runs `python -m tlq` on 2 workers (--help: cheap, exit code 0)."""
    for var in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where torchrun would leave its log folders
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # ... and where tlq makes its own
    assert D.launch_torchrun(2, ["--help", "--nproc", "2"]) == 0
    assert list(tmp_path.iterdir()) == []  # no torchelastic_* folder, and tlq's own one removed


def test_collective_step_reports_failures_to_every_rank(two_rank_results):
    r0, r1 = two_rank_results
    assert r0["step"] == "RuntimeError: writing failed on rank 1: ValueError: disk full"
    assert r1["step"] == "ValueError: disk full"
    assert r0["main_step"] == "ran" and r1["main_step"] is None


def test_single_process_collective_step_and_sigterm():
    assert D.collective_step(lambda: 3, "x") == 3
    with pytest.raises(KeyError):
        D.collective_step(lambda: {}["k"], "x")
    old = signal.getsignal(signal.SIGTERM)
    try:
        raise_on_sigterm()
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert exc.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, old)


def test_resume_state_on_two_ranks(two_rank_results):
    for rank, r in enumerate(two_rank_results):
        assert r["resume_completed"] == 2 and r["resume_removed"]
        assert [t.tolist() for t in r["resume_streams"]] == [[10.0 * rank + i + 1] * 2 for i in range(2 + rank)]
        assert torch.equal(r["resume_layer"], torch.full((2,), 2.0))
        assert "config.scheme changed from w4a16 to w3a16" in r["mismatch"]


def test_exit_rank_runs_the_exit_handlers_then_ends_with_the_code(tmp_path):
    """A finishing rank leaves through ``exit_rank``: the exit handlers (the process group's shutdown, spill
    finalizers) and buffered output still happen, and its code is the process's."""
    marker = tmp_path / "handler-ran"
    script = (
        "import atexit, sys, weakref\n"
        "from tlq.engine.distributed import exit_rank\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('atexit'))\n"
        "class Box: pass\n"
        "box = Box()\n"
        "weakref.finalize(box, lambda: sys.stderr.write('finalized\\n'))\n"
        "sys.stdout.write('buffered, not yet flushed')\n"
        "exit_rank(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert r.stdout == "buffered, not yet flushed" and "finalized" in r.stderr
    assert marker.read_text() == "atexit"
