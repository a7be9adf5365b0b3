"""Caption decoders, one family per file. Importing this package registers every family."""

from seesay.decoders.base import Decoder, DecoderOutput

__all__ = ["Decoder", "DecoderOutput"]
