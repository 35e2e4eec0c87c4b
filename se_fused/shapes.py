"""The SE inputs of real models (docs/DESIGN.md §5): the table tests and benchmarks share.

``MODEL_SHAPES[model] = (act, gate, [(C, H, R), ...])`` with square H = W maps.
"""

from __future__ import annotations

MODEL_SHAPES: dict[str, tuple[str, str, list[tuple[int, int, int]]]] = {
    "seresnet50": ("relu", "sigmoid", [(256, 56, 16), (512, 28, 32), (1024, 14, 64), (2048, 7, 128)]),
    "efficientnet_b0": ("silu", "sigmoid", [(32, 112, 8), (96, 56, 4), (144, 56, 6), (144, 28, 6), (240, 28, 10),
                                            (240, 14, 10), (480, 14, 20), (672, 14, 28), (672, 7, 28),
                                            (1152, 7, 48)]),
    "mobilenetv3_large": ("relu", "hard_sigmoid", [(72, 28, 24), (120, 28, 32), (480, 14, 120), (672, 14, 168),
                                                   (672, 7, 168), (960, 7, 240)]),
    "regnety_1.6gf": ("relu", "sigmoid", [(48, 56, 8), (48, 56, 12), (120, 28, 12), (120, 28, 30), (336, 14, 30),
                                          (336, 14, 84), (888, 7, 84), (888, 7, 222)]),
}
