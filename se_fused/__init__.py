"""se_fused: a fused Squeeze-and-Excitation block for PyTorch."""

from .debug import count_kernel_launches, poison_outputs
from .functional import SqueezeExciteFunction, squeeze_excite
from .module import FusedSE
from .reference import SEBlock

__version__ = "0.1.0"

__all__ = [
    "FusedSE",
    "SEBlock",
    "SqueezeExciteFunction",
    "count_kernel_launches",
    "poison_outputs",
    "squeeze_excite",
]
