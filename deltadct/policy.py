"""Which tensors of a checkpoint are compressed, and what happens to the rest.

Default: every weight with two or more dimensions (linear / attention / MLP matrices; conv kernels
seen as (out, in·k·k)) is compressed, except embeddings, position tables, tied LM heads and
class tokens, which, like norms and biases, are *kept*: stored in the file as the fine-tuned
values, exactly. Their bytes are reported separately (``kept_bytes``) and excluded from
``bits_per_param``, which counts what the method spends on compressed tensors.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .methods.base import MethodConfig, check_choice, check_range

DEFAULT_EXCLUDE = (
    "*embed*", "*embedding*", "*wte.*", "*wpe.*", "*shared.weight", "*lm_head*", "*cls_token*",
    "*dist_token*", "*pos_embed*", "*position*", "*token_type*", "*relative_attention_bias*",
)


@dataclass
class TensorPolicy(MethodConfig):
    """Selection and key-matching policy (``policy.*`` in configs and ``--set policy.key=value``)."""

    #: glob patterns a tensor name must match to be compressed …
    include: tuple[str, ...] = ("*",)
    #: … and must not match
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    #: compress only tensors with at least this many dimensions (2 = matrices and conv kernels)
    min_ndim: int = 2
    #: tensors not compressed: "keep" their fine-tuned values in the file, or "drop" (use the base's)
    others: str = "keep"
    #: a selected tensor too small for the method (e.g. a side shorter than the patch): keep it, or error
    too_small: str = "keep"
    #: fine-tuned tensors absent from the base or of another shape (new task heads): error, or keep in full
    extra_keys: str = "error"
    #: base tensors absent from the fine-tuned checkpoint: error, or leave them out of the result
    missing_keys: str = "error"

    def validate(self) -> None:
        check_range("min_ndim", self.min_ndim, 1, 8)
        check_choice("others", self.others, ("keep", "drop"))
        check_choice("too_small", self.too_small, ("keep", "error"))
        check_choice("extra_keys", self.extra_keys, ("error", "keep"))
        check_choice("missing_keys", self.missing_keys, ("error", "ignore"))

    def selects(self, name: str, ndim: int) -> bool:
        return (ndim >= self.min_ndim
                and any(fnmatch.fnmatchcase(name, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))
