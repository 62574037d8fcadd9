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

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

try:  # the compiled kernel's context model (`sorted_symbols`); numpy computes the same without it
    from . import _fast
except ImportError:  # built without a C compiler
    _fast = None

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


@dataclass(frozen=True)
class FlatPhase:
    """One phase over every channel of a (C, h * w) plane, as flat indices into its ravel, channel by channel."""

    targets: np.ndarray  # (C * n,) intp
    neighbours: np.ndarray  # (4, C * n) intp
    table: np.ndarray  # (C * n,) uint16: the channel's first table, channel * CONTEXTS; the context is added


@dataclass(frozen=True)
class CodingPlan:
    """Every phase of a (C, h, w) array, flat, and all of them joined: the encoder knows every code,
    so it predicts them in one pass, and the decoder goes phase by phase."""

    phases: tuple[FlatPhase, ...]
    joined: FlatPhase  # the phases one after the other, `table` offset by phase * C * CONTEXTS
    bounds: np.ndarray  # where each phase starts in `joined`, and the end


@lru_cache(maxsize=64)
def coding_plan(channels: int, height: int, width: int) -> CodingPlan:
    """The phases of `phases(height, width)` over every channel of a (C, h, w) array's ravel, made once per size."""
    size = height * width
    first = (np.arange(channels) * size)[:, None]  # each channel's offset in the ravel
    flat = []
    for phase in phases(height, width):
        table = np.repeat(np.arange(channels, dtype=np.uint16) * CONTEXTS, phase.targets.size)
        targets = (first + phase.targets).ravel()
        neighbours = (first[None] + phase.neighbours[:, None, :]).reshape(4, -1)
        flat.append(FlatPhase(targets, neighbours, table))
    tables = channels * CONTEXTS
    if flat:
        joined = FlatPhase(
            np.concatenate([f.targets for f in flat]),
            np.concatenate([f.neighbours for f in flat], axis=1),
            np.concatenate([f.table + np.uint16(p * tables) for p, f in enumerate(flat)]),
        )
    else:
        joined = FlatPhase(np.zeros(0, np.intp), np.zeros((4, 0), np.intp), np.zeros(0, np.uint16))
    return CodingPlan(tuple(flat), joined, np.cumsum([0] + [f.targets.size for f in flat]))


def predict(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Four neighbours' codes -> the integer prediction and the context.

    int16 holds every sum of four codes within +-CODE_LIMIT, and moves half the bytes of int32."""
    prediction = (a + b + c + d) >> 2  # floor of the mean, in integers
    spread = np.maximum(np.maximum(a, b), np.maximum(c, d)) - np.minimum(np.minimum(a, b), np.minimum(c, d))
    return prediction, np.minimum(spread, CONTEXTS - 1)


def sorted_symbols(flat: np.ndarray, plan: CodingPlan, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The encoder's side of the context model: every symbol of `plan.joined` (int32), sorted by key
    (phase, channel and context) stably; the escaped codes in that order (+ CODE_LIMIT); and how many
    symbols each key has. The compiled kernel computes the same integers where it is built (and not
    switched off with HYBRID_CODEC_KERNEL=0), in one pass instead of numpy's dozen."""
    joined, keys = plan.joined, len(plan.phases) * channels * CONTEXTS
    n = joined.targets.size
    if n and _fast is not None and os.environ.get("HYBRID_CODEC_KERNEL", "").strip() != "0":
        symbols, escapes, counts = np.empty(n, np.int32), np.empty(n, np.int32), np.empty(keys, np.int64)
        escaped = _fast.sorted_symbols(
            flat.ctypes.data, joined.neighbours.ctypes.data, joined.targets.ctypes.data, joined.table.ctypes.data,
            n, keys, symbols.ctypes.data, escapes.ctypes.data, counts.ctypes.data,
            CONTEXTS, RADIUS, ESCAPE, CODE_LIMIT,
        )  # fmt: skip
        return symbols, escapes[:escaped], counts
    prediction, context = predict(*flat[joined.neighbours])
    key = joined.table + context.astype(np.uint16)
    order = np.argsort(key, kind="stable")
    values = flat[joined.targets[order]]
    residual = values - prediction[order]
    symbols = np.where(np.abs(residual) <= RADIUS, residual + RADIUS, ESCAPE).astype(np.int32)
    escapes = values[symbols == ESCAPE].astype(np.int32) + CODE_LIMIT
    return symbols, escapes, np.bincount(key, minlength=keys)


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

    @staticmethod
    def _one_call(symbols: int, bounds: int) -> bool:
        """Short runs cost more in calls than a table per symbol costs in copying."""
        return symbols < PER_SYMBOL_BELOW or bounds - 1 > symbols // 32

    @staticmethod
    def _runs(table: np.ndarray) -> np.ndarray:
        """Where the runs of one table start in sorted `table`, and its end."""
        if not table.size:
            return np.zeros(1, np.intp)
        return np.r_[0, np.flatnonzero(table[1:] != table[:-1]) + 1, table.size]

    def compress(self, codes: np.ndarray) -> bytes:
        """(C, h, w) integer codes within +-CODE_LIMIT -> bytes."""
        channels, height, width = codes.shape
        if channels != self.channels:
            raise ValueError(f"codes have {channels} channels; the tables are for {self.channels}")
        if np.abs(codes).max(initial=0) > CODE_LIMIT:
            raise ValueError(f"codes must lie within +-{CODE_LIMIT}")
        flat = np.ascontiguousarray(codes, dtype=np.int16).ravel()
        encoder = self._stream.queue.RangeEncoder()
        encoder.encode(flat[:: height * width].astype(np.int32) + CODE_LIMIT, self._uniform)
        plan = coding_plan(channels, height, width)
        # the decoder's order: phase by phase, and within one sorted by table (the key), stably
        symbols, escapes, counts = sorted_symbols(flat, plan, channels)
        tables = channels * CONTEXTS
        keys = np.flatnonzero(counts)  # one run per key that has symbols, in key order
        lengths = counts[keys]
        edges, run_tables = np.r_[0, np.cumsum(lengths)].tolist(), (keys % tables).tolist()
        phase_runs = np.searchsorted(keys // tables, np.arange(len(plan.phases) + 1)).tolist()
        phase_escapes = np.searchsorted(np.flatnonzero(symbols == ESCAPE), plan.bounds).tolist()
        bounds, models = plan.bounds.tolist(), self._models
        for p in range(len(plan.phases)):
            begin, end, first, last = bounds[p], bounds[p + 1], phase_runs[p], phase_runs[p + 1]
            if self._one_call(end - begin, last - first + 1):
                table = np.repeat(keys[first:last] % tables, lengths[first:last])
                encoder.encode(symbols[begin:end], self._per_symbol, self._probabilities[table])
            else:
                for r in range(first, last):
                    encoder.encode(symbols[edges[r] : edges[r + 1]], models[run_tables[r]])
            if phase_escapes[p + 1] > phase_escapes[p]:
                encoder.encode(escapes[phase_escapes[p] : phase_escapes[p + 1]], self._uniform)
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
        flat = np.zeros(channels * height * width, dtype=np.int16)
        flat[:: height * width] = decoder.decode(self._uniform, channels) - CODE_LIMIT
        for phase in coding_plan(channels, height, width).phases:
            prediction, context = predict(*flat[phase.neighbours])
            table = phase.table + context.astype(np.uint16)
            order = np.argsort(table, kind="stable")  # a radix sort on 16-bit keys
            table = table[order]
            runs = self._runs(table)
            if self._one_call(table.size, len(runs)):
                symbols = decoder.decode(self._per_symbol, self._probabilities[table])
            else:
                edges, tables = runs.tolist(), table[runs[:-1]].tolist()
                calls = zip(edges[:-1], edges[1:], tables, strict=True)
                symbols = np.concatenate([decoder.decode(self._models[t], b - a) for a, b, t in calls])
            values = prediction[order] + symbols.astype(np.int32) - RADIUS
            escaped = symbols == ESCAPE
            if escaped.any():
                values[escaped] = decoder.decode(self._uniform, int(escaped.sum())).astype(np.int32) - CODE_LIMIT
            flat[phase.targets[order]] = values
        return flat.reshape(channels, height, width).astype(np.int32)


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
    flat = np.ascontiguousarray(codes, dtype=np.int16).ravel()
    plan = coding_plan(channels, height, width)
    prediction, context = predict(*flat[plan.joined.neighbours])
    residual = flat[plan.joined.targets] - prediction
    symbols = np.where(np.abs(residual) <= RADIUS, residual + RADIUS, ESCAPE)
    table = plan.joined.table % (channels * CONTEXTS) + context  # channel * CONTEXTS + context
    counts = np.bincount(table.astype(np.int64) * SYMBOLS + symbols, minlength=channels * CONTEXTS * SYMBOLS)
    return counts.reshape(channels, CONTEXTS, SYMBOLS)
