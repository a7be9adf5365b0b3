"""Shared test settings: one tiny configuration per registered family, and a hermetic network.

`TINY_ENCODERS` / `TINY_DECODERS` are the only copies of the tiny CPU sizes; the contract tests
are parametrised over the registry (`list_encoders()` / `list_decoders()`), so a family
registered without an entry here fails them (see tests/test_contracts.py) instead of escaping.
Test files import from here (`from conftest import ...`: pytest puts tests/ on sys.path).

`_no_network` (autouse) makes every test hermetic: a socket connection or a DNS look-up beyond
loopback raises `NetworkAccessError` and fails the test, even when the code under test swallows
the error (a download that turns every failure into a SeesayError would otherwise hide it).
Child processes a test starts are not covered.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
import torch

from seesay.registry import build_decoder, build_encoder

# kwargs for build_encoder: small images, small grids, no downloads ("weights": "none")
TINY_ENCODERS: dict[str, dict[str, Any]] = {
    "small_cnn": dict(width=16, encoded_size=4, image_size=32),
    "resnet18": dict(weights="none", encoded_size=2, image_size=64),
    "resnet50": dict(weights="none", encoded_size=2, image_size=32),
    "resnet101": dict(weights="none", encoded_size=2, image_size=32),
    "efficientnet_lite0": dict(weights="none", encoded_size=2, image_size=64),
    "vit": dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, dropout=0.1),
    # built from a config (no hub, no file): 32 px, 4 px patches, two stages -> a 4x4 grid of width 16
    "swinv2": dict(image_model_name=None, weights="none", image_size=32,
                   config=dict(patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4)),
}

# kwargs for build_decoder besides vocab_size and enc_dim. A family that has dropout names it
# here (tiny_decoder sets it); titans_mac has none.
TINY_DECODERS: dict[str, dict[str, Any]] = {
    "show_tell": dict(embed_dim=16, decoder_dim=16, dropout=0.0),
    "soft_attention": dict(embed_dim=16, attention_dim=16, decoder_dim=16, dropout=0.0),
    "adaptive_attention": dict(embed_dim=16, attention_dim=16, decoder_dim=16, dropout=0.0),
    "transformer": dict(d_model=16, heads=2, layers=2, ff_dim=32, dropout=0.0),
    # built from a config (no hub, no file); the vocabulary is the tokenizer's
    "t5": dict(language_model_name=None, dropout=0.0,
               config=dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                           relative_attention_num_buckets=8)),
    # depth 1: the one layer carries the neural memory; each layer costs a lot of Python per step
    "titans_mac": dict(dim=16, depth=1, heads=2, dim_head=8, num_image_tokens=4, num_persist_mem_tokens=2,
                       num_longterm_mem_tokens=2, max_len=12),
}


def prepared_shapes(root: Any, *, num_images: int = 24, seed: int = 0, image_size: int = 32,
                    val_fraction: float = 0.25, test_fraction: float = 0.0) -> Any:
    """ROOT/data: the built-in shapes drawn into ROOT/raw and prepared (word tokens, every word kept)."""
    from pathlib import Path

    from seesay.data.prepare import prepare_dataset
    from seesay.data.synth import make_shapes

    root = Path(root)
    ann = make_shapes(root / "raw", num_images=num_images, seed=seed, image_size=image_size,
                      val_fraction=val_fraction, test_fraction=test_fraction)
    prepare_dataset("karpathy", root / "data", annotations=ann, images=root / "raw", image_size=image_size,
                    min_word_freq=1, workers=1, progress=False)
    return root / "data"


def tiny_train_config(data_dir: Any, out: Any, *, encoder: dict[str, Any] | None = None,
                      decoder: dict[str, Any] | None = None, **train: Any) -> Any:
    """A `Config` that trains a tiny frozen small CNN + soft attention on `data_dir` into `out` on the
    CPU: batch 20, 2 epochs, no progress or TensorBoard, validation captions of at most 12 tokens.
    `encoder` / `decoder` replace builder options; `train` sets any TrainConfig field."""
    from seesay.config import Config

    cfg = Config()
    cfg.data.path, cfg.data.workers = str(data_dir), 0
    cfg.encoder.name = "small_cnn"
    cfg.encoder.options = {**TINY_ENCODERS["small_cnn"], **(encoder or {})}
    cfg.encoder.fine_tune = False  # frozen unless a test says otherwise (the default, auto, would train it)
    cfg.decoder.name = "soft_attention"
    cfg.decoder.options = {**TINY_DECODERS["soft_attention"], **(decoder or {})}
    cfg.train.output, cfg.train.batch_size, cfg.train.epochs = str(out), 20, 2
    cfg.train.progress, cfg.train.tensorboard, cfg.train.device = False, False, "cpu"
    cfg.train.val_max_len = 12
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _tiny_config(table: dict[str, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    if name not in table:
        pytest.fail(f"{kind} {name!r} is registered but has no tiny config: add it to TINY_{kind.upper()}S "
                    "in tests/conftest.py", pytrace=False)
    return dict(table[name])


def tiny_encoder(name: str, *, seed: int = 0, **over: Any) -> Any:
    """A freshly initialised tiny encoder (`over` replaces tiny settings)."""
    torch.manual_seed(seed)
    return build_encoder(name, **{**_tiny_config(TINY_ENCODERS, "encoder", name), **over})


def tiny_decoder(name: str, vocab_size: int, enc_dim: int, *, dropout: float = 0.0, seed: int = 0,
                 **over: Any) -> Any:
    """A freshly initialised tiny decoder; `dropout` reaches the families that have dropout."""
    kwargs = _tiny_config(TINY_DECODERS, "decoder", name)
    if "dropout" in kwargs:
        kwargs["dropout"] = dropout
    kwargs.update(over)
    torch.manual_seed(seed)
    return build_decoder(name, vocab_size=vocab_size, enc_dim=enc_dim, **kwargs)


# ---- hermetic tests: no network beyond loopback ----------------------------------------------


class NetworkAccessError(RuntimeError):
    """A test tried to reach the network (tests run offline: use a loopback server or a fake)."""


_LOCAL_NAMES = {"", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_local_host(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return True  # not an IP host (never reached for AF_INET/AF_INET6)
    if host.lower() in _LOCAL_NAMES or host.lower().endswith(".localhost") or host == socket.gethostname():
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # "fe80::1%eth0": drop the scope
    except ValueError:
        return False  # a DNS name
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch):
    """Yields the list of refused attempts (a test of the guard itself may clear it)."""
    attempts: list[str] = []

    def refuse(what: str) -> NetworkAccessError:
        attempts.append(what)
        return NetworkAccessError(f"test tried to reach the network ({what}); tests run offline: "
                                  "use a loopback server or a fake")

    def guarded(original):
        def connect(self: socket.socket, address: Any, *args: Any, **kwargs: Any):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not is_local_host(address[0]):
                raise refuse(f"connect to {address!r}")
            return original(self, address, *args, **kwargs)

        return connect

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any):
        if not is_local_host(host) and not _is_ip(host):
            raise refuse(f"DNS look-up of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    if attempts:
        pytest.fail("the test tried to reach the network: " + "; ".join(attempts), pytrace=False)


def _is_ip(host: Any) -> bool:
    """A numeric address: resolving it needs no DNS (connect() then decides)."""
    try:
        ipaddress.ip_address((host.decode() if isinstance(host, bytes) else str(host)).split("%", 1)[0])
    except ValueError:
        return False
    return True
