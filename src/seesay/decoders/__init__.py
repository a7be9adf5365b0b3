"""Caption decoders, one family per file. Importing this package registers every family."""

from seesay.decoders import (  # noqa: F401  (each import registers a family)
    adaptive_attention,
    show_tell,
    soft_attention,
    t5,  # transformers is imported lazily by its builder
    titans_mac,  # titans_pytorch is imported lazily by its builder
    transformer,
)
from seesay.decoders.base import Decoder, DecoderOutput

__all__ = ["Decoder", "DecoderOutput"]
