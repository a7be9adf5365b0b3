"""Image encoders, one family per file. Importing this package registers every family."""

from seesay.encoders.base import Encoder, EncoderOutput, Preprocess

__all__ = ["Encoder", "EncoderOutput", "Preprocess"]
