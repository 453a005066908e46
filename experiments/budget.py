"""Matched-bits runs: choose each method's size knob so that its written file measures a target.

``budget.bits=1.0`` makes the runner compress every task at the setting of the method's
:class:`~deltadct.methods.base.SizeKnob` whose file measures 1.0 bits/param as
``DeltaFile.info()["bits_per_param"]`` counts it (header and side information included), within
``budget.tolerance`` (1 % by default), or the closest setting the knob has when none is within it
(a step-wise knob such as a rank). Trial files are compressed in memory (``out=None`` gives the
exact size the written file will have). A method with one size (BitDelta, ``none``, ``zero``) is
run as it is and its record says whether that size happens to hit the target. A target outside
what the knob can reach is a :class:`ConfigError` naming the method and the reachable range, or,
with ``budget.unreachable=closest`` (the sweep presets, where one method out of reach must not stop
the others), a run at the nearest end of the knob, recorded as a miss.

:func:`search_knob` is the search alone, on any ``measure(value) -> bits`` function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from deltadct.errors import ConfigError
from deltadct.methods import MethodConfig, get_method_class
from deltadct.methods.base import SizeKnob


@dataclass(frozen=True)
class KnobMatch:
    """Outcome of :func:`search_knob`: the knob value chosen, what it measured, and every trial."""

    value: float
    bits: float
    trials: tuple[tuple[float, float], ...]


def hits(bits: float, target: float, tolerance: float) -> bool:
    return abs(bits - target) <= tolerance * target


UNREACHABLE = ("error", "closest")


def search_knob(measure: Callable[[float], float], knob: SizeKnob, target: float, *,
                tolerance: float = 0.01, max_trials: int = 24, method: str = "method",
                unreachable: str = "error", hint: tuple[float, float] | None = None) -> KnobMatch:
    """The knob value whose measured bits/param is within ``tolerance`` (relative) of ``target``.

    ``hint``: (value, bits) chosen for another model of the pair, whose tasks mostly share their
    shapes. The value is measured first; the search ends after that one trial when it hits the target,
    or when it measures exactly the hint's bits (the same file layout, whose best setting the other
    search already found, e.g. a rank on a step-wise size that misses the target). Otherwise the trial
    stays among the others and the search goes on as without it. Then it measures both ends of
    the knob's range: a target outside them raises :class:`ConfigError`
    (``unreachable="closest"``: returns the nearer end). Then narrows the bracket by secant steps on the
    measured sizes, falling back to bisection when a step lands near a bracket end (step-wise sizes). Stops at
    the first hit, when the bracket closes (integer knobs: neighbours; others: 10⁻⁴ of the range, where a
    step-wise size such as a rank has no setting in between), or after ``max_trials`` measurements; returns the
    closest trial.
    """
    seen: dict[float, float] = {}

    def setting(value: float) -> float:
        return float(round(value) if knob.integer else value)

    def trial(value: float) -> float:
        value = setting(value)
        if value not in seen:
            seen[value] = float(measure(value))
        return seen[value]

    if hint is not None:
        value = setting(hint[0])
        if hits(trial(value), target, tolerance) or seen[value] == hint[1]:
            return KnobMatch(value, seen[value], tuple(seen.items()))
    ends = {knob.low: trial(knob.low), knob.high: trial(knob.high)}
    smallest, largest = min(ends.values()), max(ends.values())
    if not smallest * (1 - tolerance) <= target <= largest * (1 + tolerance):
        if unreachable == "closest":
            value = min(ends, key=lambda v: abs(ends[v] - target))
            return KnobMatch(value, ends[value], tuple(seen.items()))
        raise ConfigError(
            f"method {method!r} cannot reach budget.bits={target:g}: its files measure {smallest:.4g} to "
            f"{largest:.4g} bits/param on this model ({knob.name} from {knob.low:g} to {knob.high:g}); "
            f"choose a target in that range or leave {method} out of the sweep")
    # bracket (under, over): knob values measuring at most / at least the target
    under, over = (knob.low, knob.high) if ends[knob.low] <= ends[knob.high] else (knob.high, knob.low)

    def closest() -> KnobMatch:
        value = min(seen, key=lambda v: (abs(seen[v] - target), v))
        return KnobMatch(value, seen[value], tuple(seen.items()))

    while len(seen) < max_trials and not hits(closest().bits, target, tolerance):
        width = over - under
        if abs(width) <= (1 if knob.integer else 1e-4 * abs(knob.high - knob.low)):
            break
        f_under, f_over = seen[under], seen[over]
        guess = under + (target - f_under) * width / (f_over - f_under) if f_over > f_under else under + width / 2
        if not 0.1 <= (guess - under) / width <= 0.9:
            guess = under + width / 2
        if knob.integer:
            guess = round(guess)
            if guess in (under, over):
                guess = under + (1 if width > 0 else -1)
            if guess == over:
                break
        bits = trial(guess)
        if bits <= target:
            under = float(guess)
        else:
            over = float(guess)
    return closest()


def match_budget(method_name: str, method_config: MethodConfig, budget: Any,
                 measure_options: Callable[[dict[str, Any]], float],
                 hint: tuple[float, float] | None = None) -> tuple[MethodConfig, dict[str, Any]]:
    """The config a matched-bits run compresses with, and what the record says about the search.

    ``measure_options(options)`` compresses with those method options (in memory) and returns
    ``bits_per_param``; ``budget`` is the runner's ``budget`` section (bits, tolerance, max_trials,
    unreachable); ``hint`` the (knob value, bits) to try first (:func:`search_knob`). The record's
    ``knob_bits`` is what the search measured at the chosen value.
    The record part gets ``bits`` and ``hit`` from the written file later (:func:`finish_record`).
    """
    method = get_method_class(method_name)(method_config)
    knob = method.size_knob()
    record = {"target": float(budget.bits), "tolerance": float(budget.tolerance), "knob": None,
              "knob_value": None, "knob_options": {}, "trials": 0}
    if knob is None:
        return method_config, record
    base_options = method_config.to_dict()
    match = search_knob(lambda v: measure_options({**base_options, **knob.options(v)}), knob, float(budget.bits),
                        tolerance=float(budget.tolerance), max_trials=int(budget.max_trials), method=method_name,
                        unreachable=budget.unreachable, hint=hint)
    chosen = knob.options(match.value)
    config = type(method_config).from_dict({**base_options, **chosen})
    record.update(knob=knob.name, knob_value=match.value, knob_bits=match.bits, trials=len(match.trials),
                  knob_options={k: (list(v) if isinstance(v, tuple) else v) for k, v in chosen.items()})
    return config, record


def finish_record(record: dict[str, Any], measured_bits: float) -> dict[str, Any]:
    """Add the written file's bits/param and whether they hit the target."""
    return {**record, "bits": measured_bits, "hit": hits(measured_bits, record["target"], record["tolerance"])}
