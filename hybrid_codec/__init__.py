"""hybrid-codec: a tiny learned image codec built from DynamicConv layers.

The public names are imported on first use, so `hybrid-codec --help` does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Autoencoder", "Codec", "CodecConfig", "CodecError", "Latent", "load_codec"]

_WHERE = {
    "Autoencoder": "models",
    "Codec": "codec",
    "CodecConfig": "models",
    "CodecError": "errors",
    "Latent": "bitstream",
    "load_codec": "codec",
}

if TYPE_CHECKING:
    from .bitstream import Latent
    from .codec import Codec, load_codec
    from .errors import CodecError
    from .models import Autoencoder, CodecConfig


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
