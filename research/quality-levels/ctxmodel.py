"""The chosen context: pred = floor((L+T)/2), table index = min(|L-T|, NCTX-1); L/T = left/top code
(missing left -> top, missing top -> left, both missing -> 0). Integer arithmetic only."""
import numpy as np
NCTX = 12
def neighbours(codes):
    """codes (C,h,w) int64 -> L, T (same shape)."""
    C, h, w = codes.shape
    L = np.zeros_like(codes); T = np.zeros_like(codes)
    L[:, :, 1:] = codes[:, :, :-1]; T[:, 1:, :] = codes[:, :-1, :]
    L[:, 1:, 0] = T[:, 1:, 0]      # first column: left := top
    T[:, 0, 1:] = L[:, 0, 1:]      # first row: top := left
    return L, T
def pred_ctx(L, T):
    return np.floor_divide(L + T, 2), np.minimum(np.abs(L - T), NCTX - 1)
def residuals(codes):
    L, T = neighbours(codes)
    p, k = pred_ctx(L, T)
    return codes - p, k
