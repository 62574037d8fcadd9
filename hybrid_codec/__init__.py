"""hybrid-codec: a tiny learned image codec built from DynamicConv layers."""

from .codec import Codec, load_codec
from .errors import CodecError
from .latent import Latent
from .models import Autoencoder, CodecConfig

__all__ = ["Autoencoder", "Codec", "CodecConfig", "CodecError", "Latent", "load_codec"]
__version__ = "0.1.0"
