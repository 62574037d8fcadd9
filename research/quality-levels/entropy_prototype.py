"""Entropy coding of integer latent codes with fixed integer context tables and constriction's range coder.

Context design ("avg/|L-T|"): for the code x at (c, i, j) with left L and top T in the same channel
(missing left -> top, missing top -> left, both missing -> 0):
    pred = floor((L + T) / 2),   ctx = min(|L - T|, NCTX - 1),   residual r = x - pred
r is coded with table freq[level, c, ctx]: symbols 0..2*RMAX are r + RMAX, symbol 2*RMAX+1 is an escape
after which r is coded uniformly over [-2*CMAX, 2*CMAX] in a second stream. Codes are clipped to
[-CMAX, CMAX] by the quantizer. Decoding runs over anti-diagonals i + j = d (all 4 channels at once):
every symbol of a diagonal depends only on earlier diagonals, so each diagonal is one vectorized
decode call with per-symbol tables.

Tables: uint32 (levels, C, NCTX, 2*RMAX+2); each row sums to 2**16, every entry >= 1. They are
handed to constriction as float64 (exact: integers < 2**16) with perfect=False; constriction
rescales them to its 24-bit fixed point with IEEE float ops that are exactly rounded, so the model
is identical on every machine that uses the same constriction version.
"""
from __future__ import annotations
import functools
import numpy as np
import constriction

NCTX = 12
RMAX = 31
CMAX = 255
NSYM = 2 * RMAX + 2
ESC = NSYM - 1
TOTAL = 1 << 16
_FAMILY = constriction.stream.model.Categorical(perfect=False)
_UNIFORM = constriction.stream.model.Uniform(4 * CMAX + 1)


@functools.lru_cache(maxsize=16)
def _geometry(C: int, h: int, w: int):
    """Flat indices of each position's L and T source (sentinel C*h*w = 0), and the wavefront order."""
    c, i, j = np.meshgrid(np.arange(C), np.arange(h), np.arange(w), indexing="ij")
    flat = (c * h + i) * w + j
    sentinel = C * h * w
    top = np.where(i > 0, flat - w, sentinel)
    left = np.where(j > 0, flat - 1, top)          # first column: left := top (or sentinel at (0,0))
    top = np.where(i > 0, top, left)               # first row: top := left
    d = (i + j).ravel()
    order = np.lexsort((c.ravel(), i.ravel(), d))  # by diagonal, then row, then channel
    bounds = np.searchsorted(d[order], np.arange(h + w))
    return left.ravel(), top.ravel(), c.ravel(), order, bounds


def _context(flat_codes, lsrc, tsrc):
    L = flat_codes[lsrc]; T = flat_codes[tsrc]
    return np.floor_divide(L + T, 2), np.minimum(np.abs(L - T), NCTX - 1)


def residuals_and_contexts(codes: np.ndarray):
    """codes (C,h,w) int -> residual r and ctx, both flat in (c,i,j) order."""
    C, h, w = codes.shape
    lsrc, tsrc, cidx, _, _ = _geometry(C, h, w)
    flat = np.append(codes.ravel().astype(np.int64), 0)
    pred, ctx = _context(flat, lsrc, tsrc)
    return flat[:-1] - pred, ctx, cidx


def fit_tables(codes_by_level, smooth: float = 0.0) -> np.ndarray:
    """codes_by_level[level] = list of (C,h,w) integer arrays -> uint32 tables (levels, C, NCTX, NSYM)."""
    C = codes_by_level[0][0].shape[0]
    out = np.zeros((len(codes_by_level), C, NCTX, NSYM), np.uint32)
    for lv, arrays in enumerate(codes_by_level):
        counts = np.zeros((C, NCTX, NSYM), np.float64)
        for codes in arrays:
            r, ctx, cidx = residuals_and_contexts(codes)
            sym = np.where(np.abs(r) > RMAX, ESC, r + RMAX)
            np.add.at(counts, (cidx, ctx, sym), 1)
        counts += smooth
        out[lv] = counts_to_freq(counts)
    return out


def counts_to_freq(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies: every entry >= 1, each row sums to 2**16 exactly (deterministic)."""
    n = counts.shape[-1]
    tot = counts.sum(-1, keepdims=True)
    p = np.where(tot > 0, counts / np.maximum(tot, 1), 1.0 / n)
    f = 1 + np.floor(p * (TOTAL - n)).astype(np.int64)
    rest = TOTAL - f.sum(-1)                               # >= 0, < n
    rank = np.argsort(np.argsort(-p, axis=-1, kind="stable"), axis=-1, kind="stable")
    f += rank < rest[..., None]                            # give the remainder to the most likely symbols
    assert np.all(f.sum(-1) == TOTAL) and f.min() >= 1
    return f.astype(np.uint32)


@functools.lru_cache(maxsize=4)
def _float_tables(key):
    return np.frombuffer(key[0], np.uint32).reshape(key[1]).astype(np.float64)


def _probs(tables, level):
    t = np.ascontiguousarray(tables, dtype=np.uint32)
    return _float_tables((t.tobytes(), t.shape))[level]   # (C, NCTX, NSYM) float64


def compress(codes: np.ndarray, level: int, tables: np.ndarray) -> bytes:
    """codes (C,h,w) ints in [-CMAX, CMAX] -> bytes: u32 count of main words, main words, escape words."""
    C, h, w = codes.shape
    if np.abs(codes).max(initial=0) > CMAX:
        raise ValueError(f"codes must be in [-{CMAX}, {CMAX}]")
    _, _, _, order, _ = _geometry(C, h, w)
    r, ctx, cidx = residuals_and_contexts(codes)
    r, ctx, cidx = r[order], ctx[order], cidx[order]
    esc = np.abs(r) > RMAX
    sym = np.where(esc, ESC, r + RMAX).astype(np.int32)
    probs = _probs(tables, level)[cidx, ctx]
    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(sym, _FAMILY, probs)
    main = enc.get_compressed()
    parts = [np.array([len(main)], "<u4").tobytes(), main.astype("<u4").tobytes()]
    if esc.any():
        e2 = constriction.stream.queue.RangeEncoder()
        e2.encode((r[esc] + 2 * CMAX).astype(np.int32), _UNIFORM)
        parts.append(e2.get_compressed().astype("<u4").tobytes())
    return b"".join(parts)


def decompress(data: bytes, shape, level: int, tables: np.ndarray) -> np.ndarray:
    C, h, w = shape
    lsrc, tsrc, cidx, order, bounds = _geometry(C, h, w)
    n_main = int(np.frombuffer(data[:4], "<u4")[0])
    words = np.frombuffer(data[4:], "<u4").astype(np.uint32)
    dec = constriction.stream.queue.RangeDecoder(words[:n_main])
    edec = None
    probs_t = _probs(tables, level)
    flat = np.zeros(C * h * w + 1, np.int64)
    for d in range(h + w - 1):
        pos = order[bounds[d]:bounds[d + 1]]
        pred, ctx = _context(flat, lsrc[pos], tsrc[pos])
        sym = dec.decode(_FAMILY, probs_t[cidx[pos], ctx]).astype(np.int64)
        r = sym - RMAX
        e = sym == ESC
        if e.any():
            if edec is None:
                edec = constriction.stream.queue.RangeDecoder(words[n_main:].copy())
            r[e] = edec.decode(_UNIFORM, int(e.sum())).astype(np.int64) - 2 * CMAX
        flat[pos] = pred + r
    return flat[:-1].reshape(C, h, w)


def quantize(latent: np.ndarray, steps_c: np.ndarray, offset_c: np.ndarray) -> np.ndarray:
    """latent (C,h,w) float -> integer codes, clipped to [-CMAX, CMAX]."""
    q = np.round((latent - offset_c[:, None, None]) / steps_c[:, None, None])
    return np.clip(q, -CMAX, CMAX).astype(np.int64)


def dequantize(codes: np.ndarray, steps_c: np.ndarray, offset_c: np.ndarray) -> np.ndarray:
    return (codes * steps_c[:, None, None] + offset_c[:, None, None]).astype(np.float32)


def _selftest(trials: int = 30, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    fake = [[np.cumsum(rng.integers(-3, 4, (4, 20, 30)), axis=2) for _ in range(3)] for _ in range(2)]
    tables = fit_tables(fake)
    for t in range(trials):
        C, h, w = 4, int(rng.integers(1, 70)), int(rng.integers(1, 70))
        kind = t % 3
        if kind == 0:
            codes = np.cumsum(rng.integers(-2, 3, (C, h, w)), axis=2)
        elif kind == 1:
            codes = rng.integers(-CMAX, CMAX + 1, (C, h, w))      # worst case: escapes everywhere
        else:
            codes = np.round(rng.normal(0, 5, (C, h, w))).astype(np.int64)
        codes = np.clip(codes, -CMAX, CMAX)
        lv = t % 2
        data = compress(codes, lv, tables)
        back = decompress(data, codes.shape, lv, tables)
        assert np.array_equal(back, codes), (t, h, w)
    print(f"roundtrip bit-exact on {trials} random sizes")


if __name__ == "__main__":
    _selftest()
