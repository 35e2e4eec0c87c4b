"""se_fused: a fused Squeeze-and-Excitation block for PyTorch.

Importing the package registers every op (``torch.ops.se_fused.*``) that this install can run.
"""

from . import ops  # noqa: F401  (registers the ops)
from .convert import convert_se_modules
from .debug import count_kernel_launches, poison_outputs
from .functional import SqueezeExciteFunction, squeeze_excite
from .module import FusedSE
from .reference import SEBlock

__version__ = "0.1.0"

__all__ = [
    "FusedSE",
    "SEBlock",
    "SqueezeExciteFunction",
    "convert_se_modules",
    "count_kernel_launches",
    "poison_outputs",
    "squeeze_excite",
]
