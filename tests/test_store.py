"""The result store: append-only JSON lines, exactly-once keys, safe under parallel writers and kills."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings

import pytest

from deltadct.errors import OutputError
from badinput.cases import unwritable_store
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


def test_an_incomplete_last_line_is_moved_aside_and_the_next_record_kept(tmp_path):
    """A writer killed mid-line leaves no newline: the next append must not glue its record onto that line."""
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append(_record("a"))
    with open(path, "a") as fh:  # what a writer killed mid-line would leave
        fh.write('{"key": "b", "metr')
    with pytest.warns(UserWarning, match=r"r\.jsonl:2: moved a line that is not a record \(incomplete line\)"):
        assert store.append(_record("c"))
    assert [r["key"] for r in store.records()] == ["a", "c"]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2
    assert (tmp_path / "r.jsonl.corrupt").read_text() == '{"key": "b", "metr\n'


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    """A hand-edited store whose last (valid) line lost its newline: the record stays and the next follows it."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_record("a")) + "\n" + json.dumps(_record("b")))
    store = ResultStore(path)
    assert store.append(_record("c"))
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    assert not (tmp_path / "r.jsonl.corrupt").exists()


def test_check_writable_accepts_a_store_still_to_be_created_and_creates_no_record_file(tmp_path):
    """(Stores that cannot take records are in the bad-input corpus, tests/badinput/cases.py.)"""
    ResultStore(tmp_path / "new" / "records.jsonl").check_writable()
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "records.jsonl").exists()


def test_a_corrupt_sidecar_that_is_not_a_file_only_costs_a_warning(tmp_path):
    """Quarantine never hangs on or replaces a special file: the line is skipped, the store left as it is."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(_record("a")).encode() + b"\n5\n")
    os.mkfifo(tmp_path / "r.jsonl.corrupt")
    with pytest.warns(UserWarning, match=r"r\.jsonl:2: skipping a line that is not a record .*special file"):
        assert [r["key"] for r in ResultStore(path).records()] == ["a"]
    assert path.read_bytes() == json.dumps(_record("a")).encode() + b"\n5\n"


def test_runner_checks_the_store_before_any_work(tmp_path, monkeypatch):
    """An unwritable store.path fails at start-up: no model loaded, nothing computed and then lost."""
    from hydra import compose, initialize_config_dir

    import experiments.run as run

    monkeypatch.setattr(run, "load_pair", lambda cfg: pytest.fail("models were loaded before the store was checked"))
    with initialize_config_dir(config_dir=str(run.CONF_DIR), version_base="1.3"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = compose("config", overrides=["model=zoo_vit", "zoo.mode=fast", "tasks=[parity]"])
    with pytest.raises(OutputError, match="result store .*afile/records.jsonl is not writable"):
        run.run_job(cfg, run_dir=tmp_path / "run", store_path=unwritable_store("parent_is_a_file", tmp_path))
    assert not (tmp_path / "run").exists()


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
