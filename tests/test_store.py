"""The result store: append-only JSON lines, exactly-once keys, safe under parallel writers and kills."""
from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from experiments.store import ResultStore, config_hash


def _record(key: str, **extra) -> dict:
    return {"key": key, "metrics": {"score": 0.5}, **extra}


def test_append_and_read_back_in_order(tmp_path):
    store = ResultStore(tmp_path / "results" / "records.jsonl")
    assert store.records() == [] and store.keys() == set()
    for i in range(3):
        assert store.append(_record(f"k{i}", value=i))
    lines = (tmp_path / "results" / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["value"] for line in lines] == [0, 1, 2]
    assert [r["key"] for r in store.records()] == ["k0", "k1", "k2"]


def test_a_key_is_stored_once_unless_forced(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    assert store.append(_record("same", value=1))
    assert not store.append(_record("same", value=2))
    assert [r["value"] for r in store.records()] == [1]
    assert store.append(_record("same", value=3), unless_present=False)
    assert [r["value"] for r in store.records()] == [1, 3]


def test_an_incomplete_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append(_record("a"))
    with open(path, "a") as fh:  # what a writer killed mid-line would leave
        fh.write('{"key": "b", "metr')
    with pytest.warns(UserWarning, match="incomplete record"):
        assert [r["key"] for r in store.records()] == ["a"]


def _writer(path: str, worker: int, count: int) -> None:
    store = ResultStore(path)
    for i in range(count):
        # long lines make interleaving likely if the appends were not atomic and locked
        store.append(_record(f"w{worker}-{i}", padding="x" * 5000))
        store.append(_record("shared"))  # every worker races to store this one key


def test_parallel_writers_neither_interleave_nor_duplicate(tmp_path):
    path = tmp_path / "r.jsonl"
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_writer, args=(str(path), w, 40)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines]  # every line is a complete JSON object
    assert len(keys) == 4 * 40 + 1
    assert sorted(keys) == sorted({f"w{w}-{i}" for w in range(4) for i in range(40)} | {"shared"})


def test_config_hash_ignores_key_order_but_not_values():
    a = {"method": {"name": "deltadct", "patch_size": 16}, "model": {"name": "zoo_vit"}}
    b = {"model": {"name": "zoo_vit"}, "method": {"patch_size": 16, "name": "deltadct"}}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "method": {"name": "deltadct", "patch_size": 8}})
