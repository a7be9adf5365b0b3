"""`resnet18`, `resnet50`, `resnet101`: torchvision ResNets without pooling and classifier.

As in the Show, Attend and Tell tutorial: the last convolutional feature map (stride 32) is
adaptive-average-pooled to `encoded_size` x `encoded_size` (default 14: 196 regions) and
`set_fine_tune(True)` opens only the later blocks (layer2..layer4, the tutorial's
`children()[5:]`); stem and layer1 stay frozen. BatchNorm layers of frozen blocks stay in eval
mode when the model trains.

Weights (`weights=`):
- "imagenet": torchvision's IMAGENET1K_V1 weights (the tutorial's `pretrained=True`). Taken from
  the torch hub cache ($TORCH_HOME/hub/checkpoints) when the file is there; otherwise downloaded
  with a short socket timeout, and any failure becomes a one-line SeesayError that suggests a
  local file or "none" (never hangs offline).
- a path: a torchvision ResNet state dict (.pth/.pt read with weights_only=True, or
  .safetensors), loaded into the full torchvision model before truncation (the `fc.*` keys may
  be absent).
- "none": random initialisation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.request
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from seesay.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderOutput, Preprocess
from seesay.encoders.cnn import FrozenBatchNormMixin, grid_output
from seesay.encoders.weights import load_into, read_state_dict
from seesay.errors import SeesayError
from seesay.registry import register_encoder

log = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation; module-level so tests can lower it

_ARCHS = {
    # name: (torchvision builder name, weights enum name, out_dim)
    "resnet18": ("resnet18", "ResNet18_Weights", 512),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "resnet101": ("resnet101", "ResNet101_Weights", 2048),
}


def imagenet_weights_url(arch: str) -> str:
    import torchvision.models as tvm

    return getattr(tvm, _ARCHS[arch][1]).IMAGENET1K_V1.url


def fetch_imagenet_state_dict(name: str, url: str, *, timeout: float | None = None) -> dict[str, Tensor]:
    """A torchvision weights file: from the torch hub cache, else downloaded (short timeout).

    Any failure (offline, DNS, timeout, HTTP error, bad hash) raises a one-line SeesayError.
    """
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(url.split("?")[0])
    cached = cache_dir / filename
    if not cached.is_file():
        log.info("%s: downloading ImageNet weights %s to %s", name, url, cached)
        try:
            _download(url, cached, timeout)
        except Exception as e:  # noqa: BLE001 - every failure becomes one line
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}"
            raise SeesayError(
                f"{name}: could not download ImageNet weights from {url} ({reason}); "
                f"pass --encoder-weights PATH to a local file or none"
            ) from e
    try:
        return torch.load(str(cached), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise SeesayError(f"{cached}: cached {name} ImageNet weights are unreadable ({type(e).__name__}); delete the file") from e


def _download(url: str, dest: Path, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    m = re.search(r"-([a-f0-9]*)\.", dest.name)  # torch hub's hash-prefix convention
    prefix = m.group(1) if m else None
    sha = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                sha.update(chunk)
        if prefix and not sha.hexdigest().startswith(prefix):
            raise ValueError(f"sha256 {sha.hexdigest()[:12]} does not match {prefix}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ResNetEncoder(FrozenBatchNormMixin, Encoder):
    """A torchvision ResNet truncated before average pooling; grid pooled to encoded_size."""

    FINE_TUNE_BLOCKS = ("layer2", "layer3", "layer4")

    def __init__(self, arch: str = "resnet101", *, weights: str | Path | None = "none", encoded_size: int = 14,
                 fine_tune: bool = False, image_size: int = 256) -> None:
        super().__init__()
        import torchvision.models as tvm

        if arch not in _ARCHS:
            raise SeesayError(f"unknown resnet {arch!r}; choose one of: {', '.join(_ARCHS)}")
        builder_name, _, out_dim = _ARCHS[arch]
        net = getattr(tvm, builder_name)(weights=None)
        w = "none" if weights is None else str(weights)
        if w.lower() == "imagenet":
            load_into(net, fetch_imagenet_state_dict(arch, imagenet_weights_url(arch)), f"{arch} ImageNet", optional_prefixes=("fc.",))
        elif w.lower() != "none":
            load_into(net, read_state_dict(w, arch), w, optional_prefixes=("fc.",))
        self.arch = arch
        self.pretrained = w.lower() != "none"
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        self.body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
        self.encoded_size = encoded_size
        self.out_dim = out_dim
        self.preprocess = Preprocess(size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.set_fine_tune(fine_tune)

    def forward(self, images: Tensor) -> EncoderOutput:
        return grid_output(self.body(images), self.encoded_size)

    def set_fine_tune(self, flag: bool) -> None:
        """Freeze everything; with flag, open layer2..layer4 (children()[5:] of the truncated net)."""
        for p in self.parameters():
            p.requires_grad_(False)
        if flag:
            for name in self.FINE_TUNE_BLOCKS:
                for p in getattr(self.body, name).parameters():
                    p.requires_grad_(True)
        self._refresh_bn_mode()


def _make_builder(arch: str):
    def build(*, weights: str | None = "none", encoded_size: int = 14, fine_tune: bool = False,
              image_size: int = 256) -> ResNetEncoder:
        return ResNetEncoder(arch, weights=weights, encoded_size=encoded_size, fine_tune=fine_tune, image_size=image_size)

    build.__name__ = arch
    build.__doc__ = f"{arch} encoder; weights: 'imagenet', 'none' or a path to a torchvision state dict."
    return build


resnet18 = register_encoder("resnet18")(_make_builder("resnet18"))
resnet50 = register_encoder("resnet50")(_make_builder("resnet50"))
resnet101 = register_encoder("resnet101")(_make_builder("resnet101"))
