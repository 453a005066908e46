"""Small helpers the Hugging Face families (minilm, t5, gpt) share."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from transformers.utils import logging as hf_logging


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (expected "newly initialized head" notes) during a build."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()
