"""``se_fused._C``, the compiled extension, loaded once for the whole package.

``native`` is the module (its import registers the compiled ops) or None, with ``LOAD_ERROR``
saying why: built without a compiler, or not built at all.
"""

from __future__ import annotations

try:
    from . import _C as native

    LOAD_ERROR: ImportError | None = None
except ImportError as err:
    native = None
    LOAD_ERROR = err
