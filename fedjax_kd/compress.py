"""Communication accounting: bytes of the arrays that clients and server exchange.

Byte counts are computed from the shapes and dtypes of the arrays actually
sent (``size * itemsize`` summed over a pytree's leaves), so they follow any
change of model, dtype or message automatically.
"""

from __future__ import annotations

import jax
import numpy as np

from fedjax_kd.types import PyTree


def tree_bytes(tree: PyTree) -> int:
    """Number of bytes in all array leaves of ``tree`` (a Python int, static).

    Works on concrete arrays, tracers and ``jax.ShapeDtypeStruct`` leaves alike.
    """
    return sum(
        int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )
