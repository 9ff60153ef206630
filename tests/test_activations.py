"""tlq.engine.activations: memory-budgeted activation lists that spill to disk."""

from __future__ import annotations

import gc
import os
import socket

import pytest
import torch

from tlq.config import ConfigError
from tlq.config import parse_memory_size
from tlq.engine.activations import ActivationStore, MemoryBudget, sweep_stale_spill_dirs


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1e9", 10**9), ("8G", 8 * 2**30), ("1.5 kb", 1500),
        ("0", 0), ("123", 123), ("2tib", 2 * 2**40), ("100B", 100), (" 3 MB ", 3 * 10**6), (4096, 4096), (2.5e3, 2500),
    ],
)
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "4XB", "-1GB", "inf", "nan", "1e999", "4 G B", "GB", True])
def test_parse_memory_size_rejects(text):
    with pytest.raises(ConfigError, match="memory size"):
        parse_memory_size(text)


def samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(1, 5 + i, 8, generator=g) for i in range(6)]
    out.append(torch.randn(1, 4, 8, generator=g).to(torch.bfloat16))
    out.append(torch.randn(1, 3, 8, generator=g).to(torch.float16))
    out.append(torch.arange(24, dtype=torch.int64).reshape(2, 3, 4))
    weird = torch.randn(4, 6, generator=g)
    weird[0, 0], weird[1, 1], weird[2, 2] = float("nan"), float("inf"), -0.0
    out.append(weird.t())  # non-contiguous, with NaN/inf/-0 payloads
    out.append(torch.empty(0, 8))
    return out


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def test_budget_respected_and_spilled_round_trip_bit_exact(tmp_path):
    data = samples()
    budget = sum(t.numel() * t.element_size() for t in data[:3])
    with ActivationStore(budget, tmp_path) as store:
        for t in data:
            store.append(t)
            assert store.nbytes_in_memory <= budget
        assert len(store) == len(data)
        assert store.nbytes_in_memory == budget  # the first three stay resident (fixed prefix)
        assert [store.is_spilled(i) for i in range(3)] == [False] * 3 and store.num_spilled >= 5
        spill = store.spill_path
        assert spill is not None and spill.parent == tmp_path and len(list(spill.iterdir())) == store.num_spilled
        for a, b in zip(data, store):
            assert bit_equal(a, b)
        assert all(bit_equal(a, store[i]) for i, a in enumerate(data))
        assert bit_equal(store[-1], data[-1]) and len(store[2:5]) == 3
        # replacing an item keeps the accounting right
        store[0] = torch.zeros(1000)  # does not fit any more: spilled
        assert store.is_spilled(0) and store.nbytes_in_memory < budget
        assert torch.equal(store[0], torch.zeros(1000))
        store[4] = torch.ones(2)  # was spilled, fits now
        assert not store.is_spilled(4) and torch.equal(store[4], torch.ones(2))
        assert store.nbytes_in_memory <= budget
    assert not spill.exists() and store.nbytes_in_memory == 0


def test_unlimited_and_zero_budgets(tmp_path):
    with ActivationStore(None, tmp_path) as store:
        store.extend(samples())
        assert store.num_spilled == 0 and store.spill_path is None
    assert list(tmp_path.iterdir()) == []  # nothing ever touched the disk
    with ActivationStore(0, tmp_path) as store:
        store.extend(samples())
        assert store.nbytes_in_memory == 0 and store.num_spilled == len(store) - 1  # all but the empty tensor
        assert all(bit_equal(a, b) for a, b in zip(samples(), store))


def test_shared_budget_bounds_several_stores(tmp_path):
    t = torch.ones(100)  # 400 bytes
    budget = MemoryBudget(1000)
    a, b = ActivationStore(budget, tmp_path), ActivationStore(budget, tmp_path)
    try:
        for _ in range(3):
            a.append(t.clone())
            b.append(t.clone())
        assert a.nbytes_in_memory + b.nbytes_in_memory == budget.used <= 1000
        assert a.num_spilled + b.num_spilled == 4
        a.close()  # gives its share back
        assert budget.used == b.nbytes_in_memory
        b.append(t.clone())
        assert not b.is_spilled(len(b) - 1)
    finally:
        a.close()
        b.close()
    assert budget.used == 0 and list(tmp_path.iterdir()) == []


def test_temp_dir_removed_on_exception(tmp_path):
    spill = None
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationStore(0, tmp_path) as store:
            store.append(torch.ones(3))
            spill = store.spill_path
            assert spill.is_dir()
            raise RuntimeError("boom")
    assert spill is not None and not spill.exists()
    with pytest.raises(RuntimeError, match="closed"):
        store.append(torch.ones(1))
    store.close()  # idempotent


def test_temp_dir_removed_when_garbage_collected(tmp_path):
    store = ActivationStore(0, tmp_path / "nested")  # spill_dir is created if missing
    store.append(torch.ones(3))
    spill = store.spill_path
    assert spill.is_dir()
    del store
    gc.collect()
    assert not spill.exists()


def test_cuda_or_cpu_tensors_are_kept_on_cpu(tmp_path):
    with ActivationStore(10**6, tmp_path) as store:
        t = torch.ones(4)
        store.append(t)
        assert store[0] is t  # no copy for CPU tensors
        with pytest.raises(TypeError):
            store.append([1, 2])


def test_sweep_stale_spill_dirs(tmp_path):
    host = socket.gethostname()
    dead = 4_000_000
    while True:  # a pid that is not running
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    stale = tmp_path / f"tlq-act-{host}-{dead}-abc_12"
    mine = tmp_path / f"tlq-act-{host}-{os.getpid()}-xyz"
    other_host = tmp_path / f"tlq-act-otherhost-{dead}-abc"
    unrelated = tmp_path / "something-else"
    for d in (stale, mine, other_host, unrelated):
        d.mkdir()
        (d / "f").write_text("x")
    assert sweep_stale_spill_dirs(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and other_host.exists() and unrelated.exists()
    assert sweep_stale_spill_dirs(tmp_path / "missing") == []
