"""Image encoders, one family per file. Importing this package registers every family."""

from seesay.encoders import cnn, efficientnet, resnet, swinv2, vit  # noqa: F401  (registers the families)
from seesay.encoders.base import Encoder, EncoderOutput, Preprocess
from seesay.encoders.vit import VisionTransformerEncoder

__all__ = ["Encoder", "EncoderOutput", "Preprocess", "VisionTransformerEncoder"]
