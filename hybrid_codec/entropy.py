"""The entropy model of quality-level latents: integer codes -> bytes with constriction's range coder.

Codes are coded coarse to fine, like an interlaced image. The first code of each channel is
stored plainly; then, at each scale, the codes at the centres of the known lattice's squares
(the "diagonal" phase) and then at its edge midpoints (the "cross" phase) are each predicted by
the mean of their four known neighbours at that scale. The residual is coded with one of
`CONTEXTS` tables, chosen by how much those neighbours disagree (max - min). Every symbol of a
phase has its context before the phase is decoded, so a phase is coded as a few runs that share
one table each: a handful of calls into the coder rather than one per symbol.

Decoding must be exact on every machine, so everything the decoder derives is integer
arithmetic: the prediction is `sum >> 2`, the context is a clipped integer range, and the tables
are integers that sum to `TOTAL` (constriction turns them into its fixed-point model with exact
IEEE operations). The float path of the model (kernel or PyTorch, any thread count) only decides
the codes, never what the decoder expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CONTEXTS = 12  # neighbour disagreement 0..10, and 11 for anything larger
RADIUS = 31  # residuals in [-RADIUS, RADIUS] have their own symbol ...
SYMBOLS = 2 * RADIUS + 2  # ... and the last symbol is the escape: the code itself follows, uniformly
ESCAPE = SYMBOLS - 1
CODE_LIMIT = 4095  # codes are clipped to [-CODE_LIMIT, CODE_LIMIT]
TOTAL = 1 << 16  # each table's integer frequencies sum to this
PER_SYMBOL_BELOW = 384  # phases with fewer symbols than this use one call with a model per symbol


class EntropyError(ValueError):
    """The payload does not decode to codes of the expected shape."""


@dataclass(frozen=True)
class Phase:
    """Positions coded together: flat indices into (h * w) and their four neighbours' indices."""

    targets: np.ndarray  # (n,) int64
    neighbours: np.ndarray  # (4, n) int64


@lru_cache(maxsize=64)
def phases(height: int, width: int) -> tuple[Phase, ...]:
    """The coding order of an (height, width) plane after its first code, coarse to fine."""
    scale = 1
    while scale < max(height, width):
        scale *= 2
    out = []
    while scale > 1:
        half = scale // 2
        for kind in ("diagonal", "cross"):
            if kind == "diagonal":
                ys, xs = np.meshgrid(np.arange(half, height, scale), np.arange(half, width, scale), indexing="ij")
                ys, xs = ys.ravel(), xs.ravel()
                offsets = ((-half, -half), (-half, half), (half, -half), (half, half))
            else:
                y1, x1 = np.meshgrid(np.arange(0, height, scale), np.arange(half, width, scale), indexing="ij")
                y2, x2 = np.meshgrid(np.arange(half, height, scale), np.arange(0, width, scale), indexing="ij")
                ys, xs = np.concatenate([y1.ravel(), y2.ravel()]), np.concatenate([x1.ravel(), x2.ravel()])
                offsets = ((-half, 0), (half, 0), (0, -half), (0, half))
            if ys.size == 0:
                continue
            neighbours = []
            for dy, dx in offsets:
                # a neighbour outside the plane is replaced by its mirror image, which is always known
                ny, nx = ys + dy, xs + dx
                ny = np.where((ny < 0) | (ny >= height), ys - dy, ny)
                nx = np.where((nx < 0) | (nx >= width), xs - dx, nx)
                neighbours.append((ny, nx))
            if kind == "cross":  # a plane one row (or column) high: a vertical pair mirrors out of it too
                (ay, ax), (by, bx), (cy, cx), (ey, ex) = neighbours
                bad = (ay < 0) | (ay >= height)
                neighbours[0] = (np.where(bad, cy, ay), np.where(bad, cx, ax))
                neighbours[1] = (np.where(bad, ey, by), np.where(bad, ex, bx))
                (ay, ax), (by, bx), (cy, cx), (ey, ex) = neighbours
                bad = (cx < 0) | (cx >= width)
                neighbours[2] = (np.where(bad, ay, cy), np.where(bad, ax, cx))
                neighbours[3] = (np.where(bad, by, ey), np.where(bad, bx, ex))
            index = np.stack([ny * width + nx for ny, nx in neighbours])
            out.append(Phase(targets=ys * width + xs, neighbours=index))
        scale = half
    return tuple(out)


@lru_cache(maxsize=64)
def all_phases(height: int, width: int) -> tuple[Phase, np.ndarray]:
    """Every phase in one: the encoder knows all codes, so it predicts them all at once.

    Also each phase's first position in the concatenation, and the end."""
    parts = phases(height, width)
    if not parts:
        return Phase(np.zeros(0, np.int64), np.zeros((4, 0), np.int64)), np.zeros(1, np.int64)
    joined = Phase(np.concatenate([p.targets for p in parts]), np.concatenate([p.neighbours for p in parts], axis=1))
    return joined, np.cumsum([0] + [p.targets.size for p in parts])


def predict(plane: np.ndarray, phase: Phase) -> tuple[np.ndarray, np.ndarray]:
    """(C, h * w) int16 codes -> per target, the integer prediction and the context, each (C, n).

    int16 holds every sum of four codes within +-CODE_LIMIT, and moves half the bytes of int32."""
    a, b, c, d = (plane[:, index] for index in phase.neighbours)
    prediction = (a + b + c + d) >> 2  # floor of the mean, in integers
    spread = np.maximum(np.maximum(a, b), np.maximum(c, d)) - np.minimum(np.minimum(a, b), np.minimum(c, d))
    return prediction, np.minimum(spread, CONTEXTS - 1)


class EntropyCoder:
    """Codes (C, h, w) integer arrays with the integer tables (C, CONTEXTS, SYMBOLS) of one level.

    Within a phase, symbols are coded sorted by table (a stable sort, so the decoder, knowing
    the tables, knows the order): long runs go to the coder in one call each, and a short phase in
    one call with a table per symbol, which constriction defines to code exactly alike.
    """

    def __init__(self, tables: np.ndarray) -> None:
        import constriction

        tables = np.asarray(tables)
        if tables.ndim != 3 or tables.shape[1:] != (CONTEXTS, SYMBOLS):
            raise ValueError(f"tables must be (channels, {CONTEXTS}, {SYMBOLS}), not {tables.shape}")
        if (tables < 1).any() or (tables.sum(-1) != TOTAL).any():
            raise ValueError(f"every table must hold positive integers summing to {TOTAL}")
        self.channels = tables.shape[0]
        self._stream = constriction.stream
        self._probabilities = tables.reshape(-1, SYMBOLS).astype(np.float64)  # exact: integers below 2^53
        model = constriction.stream.model
        self._models = [model.Categorical(p, perfect=False) for p in self._probabilities]
        self._per_symbol = model.Categorical(perfect=False)
        self._uniform = model.Uniform(2 * CODE_LIMIT + 1)

    def _order(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(C, n) contexts -> the coding order, each coded symbol's table, and where runs start."""
        table = (np.arange(self.channels, dtype=np.uint16)[:, None] * CONTEXTS + context).ravel().astype(np.uint16)
        order = np.argsort(table, kind="stable")  # a radix sort on 16-bit keys
        table = table[order]
        return order, table, np.r_[0, np.flatnonzero(table[1:] != table[:-1]) + 1, table.size]

    @staticmethod
    def _one_call(symbols: int, bounds: int) -> bool:
        """Short runs cost more in calls than a table per symbol costs in copying."""
        return symbols < PER_SYMBOL_BELOW or bounds - 1 > symbols // 32

    def compress(self, codes: np.ndarray) -> bytes:
        """(C, h, w) integer codes within +-CODE_LIMIT -> bytes."""
        channels, height, width = codes.shape
        if channels != self.channels:
            raise ValueError(f"codes have {channels} channels; the tables are for {self.channels}")
        if np.abs(codes).max(initial=0) > CODE_LIMIT:
            raise ValueError(f"codes must lie within +-{CODE_LIMIT}")
        plane = np.ascontiguousarray(codes, dtype=np.int16).reshape(channels, -1)
        encoder = self._stream.queue.RangeEncoder()
        encoder.encode(plane[:, 0].astype(np.int32) + CODE_LIMIT, self._uniform)
        joined, starts = all_phases(height, width)
        prediction, context = predict(plane, joined)
        tables = channels * CONTEXTS
        # the decoder's order: phase by phase, and within one sorted by table, stably
        phase = np.repeat(np.arange(len(starts) - 1, dtype=np.uint16), np.diff(starts))
        key = (phase * tables + np.arange(channels, dtype=np.uint16)[:, None] * CONTEXTS + context).ravel()
        order = np.argsort(key.astype(np.uint16), kind="stable")
        key = key[order]
        values = plane[:, joined.targets].ravel()[order]
        residual = values - prediction.ravel()[order]
        symbols = np.where(np.abs(residual) <= RADIUS, residual + RADIUS, ESCAPE).astype(np.int32)
        table = key % tables
        bounds = np.r_[0, np.flatnonzero(key[1:] != key[:-1]) + 1, key.size]  # runs of one table
        for p in range(len(starts) - 1):
            begin, end = starts[p] * channels, starts[p + 1] * channels
            runs = bounds[np.searchsorted(bounds, begin) : np.searchsorted(bounds, end) + 1]
            if self._one_call(end - begin, len(runs)):
                encoder.encode(symbols[begin:end], self._per_symbol, self._probabilities[table[begin:end]])
            else:
                for a, b in zip(runs[:-1], runs[1:], strict=True):
                    encoder.encode(symbols[a:b], self._models[table[a]])
            escaped = values[begin:end][symbols[begin:end] == ESCAPE]
            if escaped.size:
                encoder.encode(escaped.astype(np.int32) + CODE_LIMIT, self._uniform)
        return encoder.get_compressed().tobytes()

    def decompress(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        """Bytes from `compress` -> the (C, h, w) int32 codes; EntropyError if they cannot be."""
        channels, height, width = shape
        if channels != self.channels:
            raise EntropyError(f"{channels} channels asked for; the tables are for {self.channels}")
        if len(data) % 4:
            raise EntropyError("the payload is not a whole number of 32-bit words")
        try:
            return self._decode(data, channels, height, width)
        except (AssertionError, ValueError, RuntimeError, OverflowError) as exc:  # constriction asserts on bad data
            raise EntropyError(f"the payload does not decode ({exc})") from None

    def _decode(self, data: bytes, channels: int, height: int, width: int) -> np.ndarray:
        decoder = self._stream.queue.RangeDecoder(np.frombuffer(data, dtype=np.uint32).copy())
        plane = np.zeros((channels, height * width), dtype=np.int16)
        plane[:, 0] = decoder.decode(self._uniform, channels) - CODE_LIMIT
        for phase in phases(height, width):
            prediction, context = predict(plane, phase)
            order, table, runs = self._order(context)
            if self._one_call(table.size, len(runs)):
                symbols = decoder.decode(self._per_symbol, self._probabilities[table])
            else:
                symbols = np.concatenate(
                    [decoder.decode(self._models[table[a]], b - a) for a, b in zip(runs[:-1], runs[1:], strict=True)]
                )
            values = prediction.ravel()[order] + symbols.astype(np.int32) - RADIUS
            escaped = symbols == ESCAPE
            if escaped.any():
                values[escaped] = decoder.decode(self._uniform, int(escaped.sum())).astype(np.int32) - CODE_LIMIT
            coded = np.empty_like(values)
            coded[order] = values
            plane[:, phase.targets] = coded.reshape(channels, -1)
        return plane.reshape(channels, height, width).astype(np.int32)


def fit_tables(residual_counts: np.ndarray) -> np.ndarray:
    """Symbol counts (..., CONTEXTS, SYMBOLS) -> integer tables summing to TOTAL, every entry >= 1.

    Counts are smoothed by half a count, scaled, and rounding's leftover goes to the largest entry.
    """
    counts = np.asarray(residual_counts, dtype=np.float64) + 0.5
    scaled = counts / counts.sum(-1, keepdims=True) * (TOTAL - SYMBOLS)
    tables = np.floor(scaled).astype(np.int64) + 1
    leftover = TOTAL - tables.sum(-1)
    np.put_along_axis(
        tables,
        scaled.argmax(-1)[..., None],
        np.take_along_axis(tables, scaled.argmax(-1)[..., None], -1) + leftover[..., None],
        -1,
    )
    return tables


def symbol_counts(codes: np.ndarray) -> np.ndarray:
    """How often each (channel, context, symbol) occurs when coding `codes` (C, h, w)."""
    channels, height, width = codes.shape
    plane = np.ascontiguousarray(codes, dtype=np.int16).reshape(channels, -1)
    counts = np.zeros((channels, CONTEXTS, SYMBOLS), dtype=np.int64)
    for phase in phases(height, width):
        prediction, context = predict(plane, phase)
        residual = plane[:, phase.targets] - prediction
        symbols = np.where(np.abs(residual) <= RADIUS, residual + RADIUS, ESCAPE)
        channel = np.broadcast_to(np.arange(channels)[:, None], symbols.shape)
        np.add.at(counts, (channel, context, symbols), 1)
    return counts
