"""What the Hugging Face zoo families (minilm, t5, gpt) share with the adapters that load their checkpoints."""
from deltadct.adapters.hf import quiet_transformers

__all__ = ["quiet_transformers"]
