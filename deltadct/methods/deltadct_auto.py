"""Delta-DCT with data-free automatic bit allocation: per-patch widths from a global R-D search.

Instead of fixed shares (20 % at 2 bits, 60 % at 1 bit, 20 % dropped), every patch of every layer
gets the width in ``0..max_width`` that minimises the model's total reconstruction error under a
bits-per-parameter budget *measured on disk*. ``plan()`` quantises each layer's DCT patches at every
width with the codec's own quantiser (so the error table is exact, not a model), builds each patch's
convex rate–distortion hull and fills the budget greedily by error saved per bit across all layers
(:mod:`deltadct.allocation`). The rate of a width counts codes and range side information; each
layer's allocation map, scalars, byte rounding and header entries, and the rest of the file header
(measured by ``deltadct.compress`` before planning, plus a small reserve), are taken off the budget
first. ``compress`` then encodes with the planned widths through the same codec as ``deltadct``:
same fields, same decoder.

Limits: ``plan`` holds 24 bytes per patch (fp32 slope + two uint8 widths per hull step, 4 steps)
plus a sort over all steps, about 2.5 GB for a 7B-parameter model at ``patch_size`` 16 (27 M
patches); models with more than ~100 M patches need a larger ``patch_size`` or more memory.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from .. import allocation as A
from .. import codec
from ..errors import ConfigError
from . import register_method
from .base import Compressed, SizeKnob, as_matrix, check_choice, check_range
from .deltadct import DCTCodecConfig, DeltaDCT

LAYER_WEIGHTINGS = ("uniform", "numel", "norm")


@dataclass
class DeltaDCTAutoConfig(DCTCodecConfig):
    #: total bits per compressed parameter, as ``info()["bits_per_param"]`` measures it on disk
    budget: float = 1.0
    #: widest code a patch may get (widths 0..max_width are considered)
    max_width: int = 4
    #: whose error counts: "uniform" = total squared error, "numel" = sum of per-layer MSE,
    #: "norm" = sum of per-layer relative squared errors
    weighting: str = "uniform"
    #: "lstsq" never increases a layer's error over the planned estimate; see the docs for measurements
    rescale: str = "lstsq"
    #: bytes set aside beyond what the caller measures of the file header outside the compressed
    #: layers' entries (``plan(header_bytes=...)``; ``deltadct.compress`` passes it): safetensors
    #: framing and alignment. Callers of ``plan`` that pass no ``header_bytes`` reserve the header here.
    header_reserve_bytes: int = 256

    def max_code_width(self) -> int:
        return self.max_width

    def validate(self) -> None:
        super().validate()
        check_range("budget", self.budget, 0.0, 16.0, lo_open=True)
        check_range("max_width", self.max_width, 1, 8)
        check_choice("weighting", self.weighting, LAYER_WEIGHTINGS)
        check_range("header_reserve_bytes", self.header_reserve_bytes, 0)


@register_method
class DeltaDCTAuto(DeltaDCT):
    name = "deltadct_auto"
    Config = DeltaDCTAutoConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._widths: dict[str, torch.Tensor] = {}

    @property
    def needs_plan(self) -> bool:  # type: ignore[override]
        return True

    def size_knob(self) -> SizeKnob:
        # its budget is already measured on the file; the search only absorbs what the reserve misses.
        # Much below 0.5 bit/param the allocation maps and headers of small models alone do not fit.
        return SizeKnob("budget", 0.5, float(self.config.max_width), lambda v: {"budget": v})

    # -- byte model of the codec's layout ------------------------------------------------------
    def width_rates(self) -> torch.Tensor:
        """Bits one patch costs at each width 0..max_width: its codes plus its range side information."""
        c = self.config
        side = 2 * c.range_bits if c.range_encoding == "log" else 32
        return torch.tensor([0] + [b * c.patch_size ** 2 + side for b in range(1, c.max_width + 1)],
                            dtype=torch.float64)

    def field_names(self) -> list[str]:
        c = self.config
        ranges = ["range_codes", "log_range"] if c.range_encoding == "log" else ["range"]
        return (["alloc"] + [f"codes{b}" for b in range(1, c.max_width + 1)] + ranges
                + (["scale"] if c.rescale != "none" else []))

    def layer_overhead_bits(self, name: str, shape: tuple[int, ...], num_patches: int) -> int:
        """Bits a layer costs whatever its widths: allocation map, scalars, byte rounding, header entries.

        Header entries are bounded by writing them for every possible field with the widest numbers
        they can hold (file offsets up to 1 TB); the JSON header sits in the safetensors metadata
        as a string, hence is escaped a second time.
        """
        c = self.config
        fields = self.field_names()
        numel = math.prod(shape)
        payload = math.ceil(num_patches * codec.alloc_bits_for(c.max_width) / 8)
        payload += (8 if c.range_encoding == "log" else 0) + (4 if c.rescale != "none" else 0)
        payload += c.max_width + 1  # each packed code stream rounds up to whole bytes
        offset = 10 ** 12
        index = sum(len(json.dumps({f"{name}::{f}": {"dtype": "U8", "shape": [numel],
                                                      "data_offsets": [offset, offset]}})) for f in fields)
        entry = json.dumps({name: {"bytes": 8 * numel, "dtype": "bfloat16", "fields": fields, "kind": "compressed",
                                   "rel_error": 0.123456, "shape": list(shape)}})
        return 8 * (payload + index + len(json.dumps(entry)))

    # -- planning -----------------------------------------------------------------------------
    def layer_weight(self, matrix: torch.Tensor) -> float:
        if self.config.weighting == "numel":
            return 1.0 / matrix.numel()
        if self.config.weighting == "norm":
            sq = float(matrix.double().pow(2).sum())
            return 1.0 / sq if sq > 0 else 1.0
        return 1.0

    def plan(self, deltas: Iterable[tuple[str, torch.Tensor]], *, header_bytes: int = 0) -> None:
        """Choose every patch's width for the whole model at once (see the module docstring)."""
        c = self.config
        rates = self.width_rates()
        names, counts, slopes, froms, tos = [], [], [], [], []
        num_params, fixed_bits = 0, 8 * (header_bytes + c.header_reserve_bytes)
        for name, delta in deltas:
            self.check_shape(tuple(delta.shape), name)
            matrix = as_matrix(delta.float())
            rows = codec.to_patches(matrix, c.patch_size, c.transform)
            table = A.distortion_table(rows, c.max_width, range_encoding=c.range_encoding, range_bits=c.range_bits)
            slope, step_from, step_to = A.hull_steps(table * self.layer_weight(matrix), rates)
            names.append(name)
            counts.append(rows.shape[0])
            slopes.append(slope.float().cpu())
            froms.append(step_from.cpu())
            tos.append(step_to.cpu())
            num_params += matrix.numel()
            fixed_bits += self.layer_overhead_bits(name, tuple(delta.shape), rows.shape[0])
        if not names:
            self._widths = {}
            return
        budget_bits = c.budget * num_params - fixed_bits
        if budget_bits < 0:
            raise ConfigError(f"option 'budget': {c.budget:g} bits/param is below the {fixed_bits / num_params:.4g} "
                              "bits/param that allocation maps and headers alone take for these tensors "
                              f"(header_reserve_bytes={c.header_reserve_bytes} included)")
        slope, step_from, step_to = torch.cat(slopes), torch.cat(froms), torch.cat(tos)
        step_cost = rates[step_to.long()] - rates[step_from.long()]
        widths = A.allocate_greedy(slope, step_cost, step_to, budget_bits)
        self._widths = dict(zip(names, torch.split(widths, counts), strict=True))

    def planned_widths(self, name: str) -> torch.Tensor:
        """The uint8 width of each patch (row-major patch order) that ``plan`` chose for tensor ``name``."""
        if name not in self._widths:
            raise ConfigError(f"deltadct_auto: tensor {name!r} was not seen by plan(); plan over every "
                              "tensor before compress()")
        return self._widths[name]

    def _graphed(self, device: torch.device, rows_cols: tuple[int, int]) -> bool:
        # widths come from the plan, per tensor and often 3 bits wide: always the op-by-op path
        return False

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        self.check_shape(tuple(delta.shape), name)
        matrix = as_matrix(delta.float())
        widths = self.planned_widths(name).to(matrix.device)
        if widths.numel() != math.prod(codec.P.patch_grid(tuple(matrix.shape), self.config.patch_size)):
            raise ConfigError(f"deltadct_auto: tensor {name!r} has shape {tuple(delta.shape)}, not the shape "
                              "it had in plan()")
        return Compressed(codec.encode_layer(matrix, widths, **self.codec_options()))
