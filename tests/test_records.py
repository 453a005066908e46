"""Result records: every committed record reads into a Record and writes back unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.records import COMPRESSED_KEYS, Record
from experiments.store import REFERENCE_METHOD

RESULTS = Path(__file__).resolve().parents[1] / "results"
STORES = sorted(RESULTS.glob("**/records.jsonl"))


@pytest.mark.parametrize("store", STORES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_committed_records_round_trip_unchanged(store):
    lines = store.read_text().splitlines()
    assert lines
    for line in lines:
        stored = json.loads(line)
        record = Record.from_dict(stored)
        assert record.to_dict() == stored and record.extra == {}  # every committed key has a name
        assert record.is_reference == (stored["method"] == REFERENCE_METHOD)


def test_unknown_keys_survive_and_reference_rows_have_no_file_keys():
    base = dict(key="h:t:ref", config_hash="h", experiment="e", model="m", family="f", task="t",
                method=REFERENCE_METHOD, method_options={}, score=0.5, score_key="vision/score",
                metrics={"vision/score": 0.5}, bits_per_param=None, zoo_scores=None, timings={}, time="now", config={})
    reference = Record(**base).to_dict()
    assert not set(COMPRESSED_KEYS) & set(reference) and reference["record_version"] == 1
    compressed = Record(**{**base, "method": "bitdelta", "key": "h:t"}, **dict.fromkeys(COMPRESSED_KEYS)).to_dict()
    assert set(COMPRESSED_KEYS) <= set(compressed) and compressed["delta_path"] is None  # None is a value
    future = {**reference, "per_example": [1, 0, 1]}
    assert Record.from_dict(future).extra == {"per_example": [1, 0, 1]}
    assert Record.from_dict(future).to_dict() == future
