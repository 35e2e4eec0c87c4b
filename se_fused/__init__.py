"""se_fused: a fused Squeeze-and-Excitation block for PyTorch."""

from .convert import convert_se_modules, fused_from_module
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
    "fused_from_module",
    "poison_outputs",
    "squeeze_excite",
]
