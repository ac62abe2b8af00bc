"""The matrices of Winograd's F(2x2,3x3) and F(4x4,3x3) and the weight transform, in numpy (no torch).

Shared by the torch backend's Winograd convolutions (vita_train/modeling/winograd.py) and the rewrite of an
ONNX graph's 3x3 convolutions for ONNX Runtime (runtime/backends/onnxruntime_winograd.py), so both run the
same tiles and the same transformed weights. Lavin & Gray's matrices, interpolation points 0, +-1, +-2 and
infinity; the compiled kernels (kernels/csrc/winograd_core.h) hard-code B^T and A^T.
"""

from __future__ import annotations

import numpy as np

# the weight transforms G, applied in float64
G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
}
# the input transforms B^T and output transforms A^T
BT = {
    2: ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    4: ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
}
AT = {
    2: ((1, 1, 1, 0), (0, 1, -1, -1)),
    4: ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
}
# F(4x4) while its transformed weight stays small: at 512 channels (res5) it would hold 36 MB per convolution
# against F(2x2)'s 16 and measured no faster (torch backend: 3.2 ms either way, against 6.9 direct)
LARGE_TILE_MAX_WEIGHTS = 256 * 256


def tile_for(cin: int, cout: int) -> int:
    """The output tile m of F(m x m, 3x3) used for a cin -> cout convolution."""
    return 4 if cin * cout <= LARGE_TILE_MAX_WEIGHTS else 2


def transform_weight(weight: np.ndarray, tile: int, dtype: type = np.float32) -> np.ndarray:
    """(Cout, Cin, 3, 3) -> ((tile+2)^2, Cout, Cin) in ``dtype``: G g G^T per filter (computed in float64), by
    Winograd point."""
    g = np.asarray(G[tile], dtype=np.float64)
    u = np.einsum("pk,ockl,ql->pqoc", g, np.asarray(weight, dtype=np.float64), g)
    return np.ascontiguousarray(u.reshape(-1, weight.shape[0], weight.shape[1]), dtype=dtype)
