"""Every file a user names is opened here: regular files only, of bounded size, and JSON of bounded depth.

A named pipe or a device would block a reader forever, a huge file would be read whole, and JSON
nested thousands deep ends Python's parser in `RecursionError`: each is one `CodecError` instead,
raised before anything is read or parsed.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import CodecError

MAX_FILE_BYTES = 4 << 30
"""Largest latent, weights, checkpoint or manifest file read whole (images are streamed by Pillow)."""
MAX_JSON_BYTES = 1 << 20
"""Largest JSON text (a model config, a manifest) parsed."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of JSON arrays and objects parsed; the project's own are at most 2 deep."""


def os_reason(exc: OSError) -> str:
    """The short reason of an OS error ("Permission denied", "File name too long")."""
    return exc.strerror or str(exc)


def check_input(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` as a Path if it names a readable regular file; one CodecError otherwise (without opening it)."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise CodecError(f"{path}: no such {what}") from None
        raise CodecError(f"{path}: cannot read ({os_reason(exc)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CodecError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise CodecError(f"{path}: not a regular file (a pipe, socket or device); give a {what}")
    return path


def open_input(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """Open a regular file for reading; never blocks on a pipe or device, even one swapped in after the check."""
    path = check_input(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise CodecError(f"{path}: cannot read ({os_reason(exc)})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the stat and the open
        os.close(fd)
        raise CodecError(f"{path}: not a regular file (a pipe, socket or device); give a {what}")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_input(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`."""
    with open_input(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise CodecError(f"{path}: {size:,} bytes is too large for a {what} (at most {max_bytes:,})")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise CodecError(f"{path}: cannot read ({os_reason(exc)})") from None
    if len(data) > max_bytes:
        raise CodecError(f"{path}: too large for a {what} (at most {max_bytes:,} bytes)")
    return data


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, counted without recursion (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def load_json(text: str | bytes, where: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """Parse JSON whose size and nesting are checked first; anything wrong is one CodecError naming `where`."""
    if len(text) > max_bytes:
        raise CodecError(f"{where}: {len(text):,} bytes of JSON is too large (at most {max_bytes:,})")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{where}: not UTF-8 JSON") from None
    if json_depth(text) > max_depth:
        raise CodecError(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"{where}: invalid JSON ({str(exc).splitlines()[0]})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")
