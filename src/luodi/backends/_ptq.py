"""Post-training quantisation arithmetic in plain numpy, shared by luodi.quant (which quantises ONNX graphs) and the
backends that quantise with a toolkit of their own (litert): the layer below both, so neither imports the other.

- ``mse_range``: an activation's int8 clipping range that minimises the expected quantisation error on its value
  histogram (rounding noise inside the range, squared clipping distance outside it);
- ``histogram``: an activation's value histogram in ``BINS`` equal bins between two bounds, the input of
  ``mse_range``;
- ``tap_means``: for a 2-D convolution, the mean of the (padded) input each kernel tap sees, which is all that the
  mean output error of rounded weights depends on (bias correction, luodi.quant.bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MSE_CANDIDATES = 128
BINS = 2048


def histogram(x: np.ndarray, lo: float, hi: float, bins: int = BINS) -> np.ndarray:
    """``bins`` equal bins from ``lo`` to ``hi`` (values outside fall in the end bins): np.histogram's counts to
    within float32 rounding at the edges, twice as fast (a pass over every activation of every sample)."""
    i = ((np.asarray(x, np.float32).ravel() - np.float32(lo)) * np.float32(bins / (hi - lo))).astype(np.int32)
    np.clip(i, 0, bins - 1, out=i)
    return np.bincount(i, minlength=bins)


def mse_range(
    hist: np.ndarray,
    edges: np.ndarray,
    lo_seen: float,
    hi_seen: float,
    levels: int = 255,
    symmetric: bool = False,
    candidates: int = MSE_CANDIDATES,
) -> tuple[float, float]:
    """The (low, high) range, among ``candidates`` widths up to what was seen, with the least expected squared error
    on the histogram ``hist`` (bins ``edges``): ``scale^2 / 12`` for a value inside the range, its squared distance
    to the range outside it. Asymmetric ranges hold zero exactly (the zero point) and reach no further than the
    values seen; ``levels`` is the number of steps (255 for 8 bits)."""
    hist = np.asarray(hist, np.float64)
    centres = (np.asarray(edges[:-1]) + np.asarray(edges[1:])).astype(np.float64) / 2
    top = float(max(abs(lo_seen), abs(hi_seen)))
    if top == 0 or hist.sum() == 0:
        return float(lo_seen), float(hi_seen)
    t = np.linspace(top / candidates, top, candidates)[:, None]
    if symmetric:
        lo, hi = -t, t
    else:
        lo = np.minimum(np.maximum(float(lo_seen), -t), 0.0)
        hi = np.maximum(np.minimum(float(hi_seen), t), 0.0)
    scale = (hi - lo) / levels
    clipped = np.clip(centres[None, :], lo, hi)
    err = np.where(clipped == centres[None, :], scale**2 / 12, (centres[None, :] - clipped) ** 2)
    best = int(np.argmin((err * hist[None, :]).sum(axis=1)))
    return float(lo[best, 0]), float(hi[best, 0])


def tap_means(
    x: np.ndarray, kernel: Sequence[int], pads: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> np.ndarray:
    """[C, kh, kw]: for each channel of ``x`` ([C, H, W]) and kernel tap, the mean over all output positions of the
    input that tap sees, zero padding included. ``pads`` is ONNX's (top, left, bottom, right)."""
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (xp.shape[1] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (xp.shape[2] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.empty((x.shape[0], kh, kw))
    for i in range(kh):
        for j in range(kw):
            r, c = i * dilations[0], j * dilations[1]
            rows = slice(r, r + strides[0] * (ho - 1) + 1, strides[0])
            cols = slice(c, c + strides[1] * (wo - 1) + 1, strides[1])
            out[:, i, j] = xp[:, rows, cols].mean((1, 2))
    return out
