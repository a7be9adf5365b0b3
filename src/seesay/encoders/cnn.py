"""`small_cnn`: a few convolution layers, for tests and the built-in shapes dataset.

Also holds what every CNN encoder shares: BatchNorm layers whose parameters are frozen stay
in eval mode even when the model is put in train(), so a frozen encoder never updates its
running statistics (and gives the same features in train and eval mode).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from seesay.encoders.base import Encoder, EncoderOutput, Preprocess
from seesay.registry import register_encoder


class FrozenBatchNormMixin:
    """`train(mode)` keeps frozen parts of an encoder in eval mode.

    A fully frozen encoder (`set_fine_tune(False)`) stays entirely in eval mode (BatchNorm
    statistics fixed, no dropout): its features are the same in train and eval mode. When only
    later blocks are fine-tuned, the BatchNorm layers whose parameters are frozen (the earlier
    blocks) stay in eval mode too.
    """

    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)  # type: ignore[misc]
        if mode:
            if not any(p.requires_grad for p in self.parameters()):  # type: ignore[attr-defined]
                for m in self.children():  # type: ignore[attr-defined]
                    m.eval()
                return self
            for m in self.modules():  # type: ignore[attr-defined]
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    params = list(m.parameters(recurse=False))
                    if not any(p.requires_grad for p in params):
                        m.eval()
        return self

    def _refresh_bn_mode(self) -> None:
        self.train(self.training)  # type: ignore[attr-defined]


def grid_output(feat: Tensor, encoded_size: int | None) -> EncoderOutput:
    """[B,D,h,w] feature map -> EncoderOutput; grid adaptive-average-pooled to encoded_size."""
    pooled = feat.mean(dim=(2, 3))
    if encoded_size is not None and tuple(feat.shape[-2:]) != (encoded_size, encoded_size):
        feat = F.adaptive_avg_pool2d(feat, encoded_size)
    h, w = feat.shape[-2:]
    grid = feat.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, D)
    return EncoderOutput(grid, pooled, (int(h), int(w)))


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNNEncoder(FrozenBatchNormMixin, Encoder):
    """Four 3x3 conv+BN+ReLU layers (strides 2,2,2,1): 64 px -> an 8x8 grid of `width` features.

    Randomly initialised (never pretrained): train it with the decoder (`--fine-tune-encoder`),
    which is cheap on CPU at 64-96 px. `set_fine_tune(True)` opens every layer.
    """

    pretrained = False

    def __init__(self, width: int = 64, encoded_size: int | None = 8, image_size: int = 64) -> None:
        super().__init__()
        if width < 2:
            raise ValueError("small_cnn: width must be >= 2")
        half = max(width // 2, 1)
        self.features = nn.Sequential(
            _conv_bn_relu(3, half, 2),
            _conv_bn_relu(half, width, 2),
            _conv_bn_relu(width, width, 2),
            _conv_bn_relu(width, width, 1),
        )
        self.encoded_size = encoded_size
        self.out_dim = width
        # Images in [0,1] mapped to [-1,1]: the data is synthetic, no ImageNet statistics apply.
        self.preprocess = Preprocess(size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def forward(self, images: Tensor) -> EncoderOutput:
        return grid_output(self.features(images), self.encoded_size)

    def set_fine_tune(self, flag: bool) -> None:
        super().set_fine_tune(flag)
        self._refresh_bn_mode()


@register_encoder("small_cnn")
def small_cnn(*, width: int = 64, encoded_size: int = 8, image_size: int = 64,
              weights: str | None = None) -> SmallCNNEncoder:
    """weights: None/"none" (random) or a path to a state dict of this encoder (.pth/.safetensors)."""
    enc = SmallCNNEncoder(width=width, encoded_size=encoded_size, image_size=image_size)
    if weights is not None and str(weights).lower() != "none":
        from seesay.encoders.weights import load_into, read_state_dict

        load_into(enc, read_state_dict(weights, "small_cnn"), str(weights), optional_prefixes=())
        enc.pretrained = True
    return enc
