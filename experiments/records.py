"""One result record: what ``deltadct-run`` stores per (config, task) and the tables read back.

:class:`Record` names and types every key; ``to_dict`` gives the JSON object the store appends and
``from_dict`` reads any stored one, including those written before this class existed: keys it does
not know are kept in ``extra`` and written back unchanged, and the keys of a compressed run are absent
from reference rows (the uncompressed fine-tuned model), as they always were.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from experiments.store import REFERENCE_METHOD

RECORD_VERSION = 1

#: keys only a compressed run has (measured on its file, or about its compression)
COMPRESSED_KEYS = ("total_bits_per_param", "file_bytes", "num_params", "num_compressed", "layers", "memory",
                   "delta_path", "budget", "distillation")


class _Absent:
    """The value of a key the record does not have (a reference row's file keys, keys added later)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


@dataclass
class Record:
    #: store key: ``<config hash>:<task>`` (``:ref`` for reference rows)
    key: str
    config_hash: str
    experiment: str
    model: str
    family: str
    task: str
    #: a registered method, or ``finetuned`` for the reference row
    method: str
    method_options: dict[str, Any]
    #: the first evaluator's headline metric, under ``score_key`` in ``metrics`` too
    score: float | None
    score_key: str
    #: ``<evaluator>/<metric>`` -> value
    metrics: dict[str, float]
    #: measured on the written file (None for reference rows)
    bits_per_param: float | None
    zoo_scores: dict | None
    timings: dict[str, float]
    #: ISO time the record was made
    time: str
    #: the resolved run config
    config: dict[str, Any]
    record_version: int = RECORD_VERSION
    run_dir: str | None = None
    overrides: list[str] = field(default_factory=list)
    # provenance
    git_commit: str | None = None
    git_dirty: bool | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    # compressed runs only (COMPRESSED_KEYS); ABSENT: not in the record
    total_bits_per_param: float | None = ABSENT
    file_bytes: int | None = ABSENT
    num_params: int | None = ABSENT
    num_compressed: int | None = ABSENT
    #: per compressed tensor: shape, bits/param, relative error
    layers: dict[str, dict] | None = ABSENT
    memory: dict[str, float | None] | None = ABSENT
    #: the kept delta file (None: deleted after the evaluation)
    delta_path: str | None = ABSENT
    #: matched-bits runs only: target, knob chosen, measured bits, whether the target was met
    budget: dict[str, Any] | None = ABSENT
    #: scale-distilled methods only: steps, learning rate, loss before and after
    distillation: dict[str, Any] | None = ABSENT
    #: evaluator name -> its per-example outputs (eval/examples.py), for intervals and paired tests
    examples: dict[str, dict] = ABSENT
    #: keys of a stored record that this class does not name, kept as they were
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        return self.method == REFERENCE_METHOD

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not ABSENT}, **self.extra}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Record":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in values.items() if k in names},
                   extra={k: v for k, v in values.items() if k not in names})
