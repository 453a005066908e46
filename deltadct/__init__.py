"""deltadct: compress fine-tuned models as deltas against their base (Delta-DCT and baselines)."""
# before the imports: every file the package writes records it
__version__ = "0.2.0"

from .api import apply, compress, info, iter_applied, reconstruct, save, verify
from .errors import DeltaDCTError
from .format import DeltaFile, load
from .methods import create_method, get_method_class, list_methods, register_method
from .policy import TensorPolicy

__all__ = ["compress", "apply", "reconstruct", "save", "load", "info", "verify", "iter_applied",
           "DeltaFile", "TensorPolicy", "DeltaDCTError", "create_method", "get_method_class",
           "list_methods", "register_method", "__version__"]
