"""Per-example outputs: the compact record form round-trips, and reproduces each evaluator's score."""
from __future__ import annotations

import numpy as np
import pytest

from eval.examples import decode_examples, encode_examples, score_inputs
from eval.metrics import glue_metrics


def test_round_trip_of_class_ids_floats_and_unmapped_answers():
    stored = encode_examples("glue:cola", labels=[0, 1, 1, 0], predictions=[0, -1, 1, 9], index=None)
    assert stored == {"scorer": "glue:cola", "columns": {"labels": "0110", "predictions": "0-19"}}
    columns = decode_examples(stored)
    assert columns["predictions"].tolist() == [0, -1, 1, 9] and columns["labels"].dtype == np.int64
    floats = encode_examples("glue:stsb", labels=[5.0, 3.8], predictions=[4.1234567, 12.0])
    assert floats["columns"]["labels"] == [5.0, 3.8] and floats["columns"]["predictions"] == [4.12346, 12.0]
    with pytest.raises(ValueError, match="differ in length"):
        encode_examples("accuracy", labels=[0, 1], predictions=[1])
    with pytest.raises(ValueError, match="unknown per-example scorer"):
        encode_examples("bleu", labels=[0])


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb"])
def test_score_inputs_reproduce_the_glue_score(task):
    rng = np.random.default_rng(1)
    labels = rng.uniform(0, 5, 40).round(1) if task == "stsb" else rng.integers(0, 2, 40)
    predictions = labels + rng.normal(0, 1, 40) if task == "stsb" else rng.integers(0, 2, 40)
    arrays, metric = score_inputs(encode_examples(f"glue:{task}", labels=labels, predictions=predictions))
    score = float(np.mean(arrays[-1])) if metric is None else metric(*arrays)
    assert score == pytest.approx(glue_metrics(task, labels, predictions)["score"], abs=1e-5)
    assert (metric is None) == (task == "sst2")  # accuracy: a mean of per-example correctness
