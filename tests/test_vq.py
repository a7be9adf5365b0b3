"""VQ image tokenizers: the taming VQGAN (names, conversion, refusing pickled code), the small
VQ-VAE that `seesay train-vq` trains, their saved form and the reconstruction figure."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import prepared_shapes
from seesay import cli
from seesay.errors import SeesayError
from seesay.vq import load_vq
from seesay.vq.convert import convert_vqgan, read_taming_config
from seesay.vq.small import SmallVQ, SmallVQConfig
from seesay.vq.vqgan import VQGAN, VQGANConfig

torch.set_num_threads(1)

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8, embed_dim=4,
            n_embed=16, resolution=16)


def tiny_vqgan(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    model = VQGAN(VQGANConfig(**TINY)).eval()
    with torch.no_grad():  # a spread-out codebook, so encoding uses several codes
        model.quantize.embedding.weight.normal_()
    return model


def taming_keys(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                resolution: int) -> set[str]:
    """The parameter names of taming's VQModel (less loss.*), spelled out from its Encoder/Decoder."""
    conv, norm = ("weight", "bias"), ("weight", "bias")
    keys: set[str] = set()

    def add(prefix: str, names: tuple[str, ...] = conv) -> None:
        keys.update(f"{prefix}.{n}" for n in names)

    def resblock(prefix: str, cin: int, cout: int) -> None:
        for part in ("norm1", "conv1", "norm2", "conv2"):
            add(f"{prefix}.{part}")
        if cin != cout:
            add(f"{prefix}.nin_shortcut")

    def attn(prefix: str) -> None:
        for part in ("norm", "q", "k", "v", "proj_out"):
            add(f"{prefix}.{part}")

    def mid(prefix: str, c: int) -> None:
        resblock(f"{prefix}.mid.block_1", c, c)
        attn(f"{prefix}.mid.attn_1")
        resblock(f"{prefix}.mid.block_2", c, c)

    add("encoder.conv_in")
    res, cin = resolution, ch
    mults = (1, *ch_mult)
    for i, m in enumerate(ch_mult):
        cin = ch * mults[i]
        for b in range(num_res_blocks):
            resblock(f"encoder.down.{i}.block.{b}", cin, ch * m)
            cin = ch * m
            if res in attn_resolutions:
                attn(f"encoder.down.{i}.attn.{b}")
        if i < len(ch_mult) - 1:
            add(f"encoder.down.{i}.downsample.conv")
            res //= 2
    mid("encoder", cin)
    add("encoder.norm_out", norm)
    add("encoder.conv_out")
    add("decoder.conv_in")
    mid("decoder", cin)
    for i in reversed(range(len(ch_mult))):
        for b in range(num_res_blocks + 1):
            resblock(f"decoder.up.{i}.block.{b}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
            if res in attn_resolutions:
                attn(f"decoder.up.{i}.attn.{b}")
        if i > 0:
            add(f"decoder.up.{i}.upsample.conv")
            res *= 2
    add("decoder.norm_out", norm)
    add("decoder.conv_out")
    keys.add("quantize.embedding.weight")
    add("quant_conv")
    add("post_quant_conv")
    return keys


def test_vqgan_parameter_names_are_taming_s():
    model = tiny_vqgan()
    assert set(model.state_dict()) == taming_keys(32, (1, 2), 1, (8,), 16)
    full = VQGAN()  # the f16-16384 defaults
    assert set(full.state_dict()) == taming_keys(128, (1, 1, 2, 2, 4), 2, (16,), 256)
    assert full.quantize.embedding.weight.shape == (16384, 256)
    assert (full.codebook_size, full.downsample, full.image_size, full.grid_size) == (16384, 16, 256, 16)


def test_vqgan_encode_decode_shapes_and_input_kinds():
    model = tiny_vqgan()
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    codes = model.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 16
    assert torch.equal(model.encode(images.float() / 255), codes)  # float 0..1 is the same image
    assert model.encode(torch.randint(0, 256, (1, 3, 40, 24), dtype=torch.uint8)).shape == (1, 8, 8)  # resized
    out = model.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    with pytest.raises(SeesayError, match="codes must lie"):
        model.decode(torch.full((1, 8, 8), 16))


def _lightning_checkpoint(model: VQGAN, **more) -> dict:
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(2, 3)  # dropped by the conversion
    state["loss.perceptual_loss.net.slice1.0.bias"] = torch.zeros(2)
    return {"epoch": 3, "global_step": 120, "state_dict": state, "optimizer_states": [], **more}


def _write_yaml(path, **over):
    dd = {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
    dd.update(over)
    lines = ["model:", "  base_learning_rate: 4.5e-06", "  target: taming.models.vqgan.VQModel", "  params:",
             "    embed_dim: 4", "    n_embed: 16", "    ddconfig:"]
    lines += [f"      {k}: {json.dumps(v)}" for k, v in dd.items()]
    lines += ["    lossconfig:", "      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_model_yaml_is_read(tmp_path):
    cfg = read_taming_config(_write_yaml(tmp_path / "model.yaml"))
    assert cfg == VQGANConfig(**TINY)
    with pytest.raises(SeesayError, match="double_z"):
        read_taming_config(_write_yaml(tmp_path / "double.yaml", double_z=True))
    (tmp_path / "other.yaml").write_text("model:\n  params: {}\n")
    with pytest.raises(SeesayError, match=r"other\.yaml.*ddconfig"):
        read_taming_config(tmp_path / "other.yaml")


def test_conversion_round_trip(tmp_path, capsys):
    model = tiny_vqgan(seed=1)
    ckpt = tmp_path / "last.ckpt"
    torch.save(_lightning_checkpoint(model), ckpt)
    out = tmp_path / "vqgan"
    rc = cli.main(["convert", "vqgan", str(ckpt), "--output", str(out), "--config", str(_write_yaml(tmp_path / "m.yaml"))])
    assert rc == 0, capsys.readouterr().err
    assert "16 codes" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["type"] == "vqgan"
    loaded = load_vq(out)
    assert isinstance(loaded, VQGAN) and not loaded.training
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    codes = model.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert len(set(codes.flatten().tolist())) > 1  # a test that could tell codes apart


def test_conversion_without_yaml_names_mismatched_keys(tmp_path, capsys):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save(_lightning_checkpoint(tiny_vqgan()), ckpt)
    rc = cli.main(["convert", "vqgan", str(ckpt), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "tiny.ckpt" in err and "do not match" in err and "--config" in err
    assert not (tmp_path / "out").exists()


class _Callback:
    """A class a weights-only load does not know (like the callback types old Lightning stores)."""

    def __init__(self) -> None:
        self.best = 0.5


class _RunsCode:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this would create a file: code in a pickle
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save(_lightning_checkpoint(tiny_vqgan(), callbacks={"x": _RunsCode(marker)}), ckpt)
    rc = cli.main(["convert", "vqgan", str(ckpt), "--output", str(tmp_path / "out"),
                   "--config", str(_write_yaml(tmp_path / "m.yaml"))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "evil.ckpt" in err and "--trust-pickle" in err and "open" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_trust_pickle_loads_other_objects_with_a_warning(tmp_path):
    model = tiny_vqgan(seed=2)
    ckpt = tmp_path / "cb.ckpt"
    torch.save(_lightning_checkpoint(model, callbacks={"ModelCheckpoint": _Callback()}), ckpt)
    yaml_path = _write_yaml(tmp_path / "m.yaml")
    with pytest.raises(SeesayError, match="--trust-pickle"):
        convert_vqgan(ckpt, tmp_path / "a", config=yaml_path)
    with pytest.warns(UserWarning, match="trust-pickle"):
        convert_vqgan(ckpt, tmp_path / "b", config=yaml_path, trust_pickle=True)
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(load_vq(tmp_path / "b").encode(images), model.encode(images))


def test_trust_pickle_needs_no_missing_packages(tmp_path, monkeypatch):
    """Old Lightning stores callback classes; with --trust-pickle they load as placeholders even when
    the package that defined them is not installed."""
    import sys
    import types

    fake = types.ModuleType("lightning_that_is_not_installed")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = fake.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    ckpt = tmp_path / "old.ckpt"
    torch.save(_lightning_checkpoint(tiny_vqgan(), callbacks={ModelCheckpoint: {"best": 1.0}}), ckpt)
    monkeypatch.delitem(sys.modules, fake.__name__)
    with pytest.warns(UserWarning):
        convert_vqgan(ckpt, tmp_path / "out", config=_write_yaml(tmp_path / "m.yaml"), trust_pickle=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_load_vq_refuses_bad_directories(tmp_path):
    with pytest.raises(SeesayError, match="no such VQ tokenizer"):
        load_vq(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeesayError, match="no config.json"):
        load_vq(tmp_path / "empty")
    tiny_vqgan().save_pretrained(tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    (tmp_path / "v" / "config.json").write_text(json.dumps({**cfg, "n_embed": 32}))
    with pytest.raises(SeesayError, match="wrong shape: quantize.embedding.weight"):
        load_vq(tmp_path / "v")
    (tmp_path / "v" / "config.json").write_text(json.dumps({**cfg, "type": "pickle"}))
    with pytest.raises(SeesayError, match="unknown VQ tokenizer type"):
        load_vq(tmp_path / "v")


def test_small_vq_shapes_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = SmallVQ(SmallVQConfig(codebook_size=8, downsample=4, image_size=16, hidden=8, embed_dim=4))
    model.train()
    model(model.to_model_input(torch.rand(2, 3, 16, 16)))  # initialises the codebook from the batch
    model.eval()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    codes = model.encode(images)
    assert codes.shape == (2, 4, 4) and model.decode(codes).shape == (2, 3, 16, 16)
    model.save_pretrained(tmp_path / "s")
    again = load_vq(tmp_path / "s")
    assert isinstance(again, SmallVQ) and torch.equal(again.encode(images), codes)
    with pytest.raises(ValueError, match="power of two"):
        SmallVQConfig(downsample=6)


def test_train_vq_on_tiny_shapes(tmp_path, capsys):
    data = prepared_shapes(tmp_path, num_images=24, image_size=32)
    out = tmp_path / "vq"
    rc = cli.main(["train-vq", "--data", str(data), "--output", str(out), "--codebook-size", "32",
                   "--downsample", "4", "--hidden", "16", "--embed-dim", "8", "--steps", "40", "--restart-after", "10",
                   "--batch-size", "8", "--lr", "3e-3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    metrics = json.loads(lines[-1])
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    assert metrics["train_loss_last"] < 0.5 * metrics["train_loss_first"]
    assert metrics["codes_used"] >= 0.4 and metrics["perplexity"] > 4
    assert metrics["split"] == "val" and metrics["code_grid"] == [8, 8]
    assert 0 < metrics["mse"] < 0.1 and metrics["psnr"] > 10
    # the saved tokenizer is the trained one: reloading reproduces the reported error and the codes
    from seesay.data.store import open_split
    from seesay.vq.train import evaluate_vq

    val = open_split(data, "val").images
    vq = load_vq(out)
    again = evaluate_vq(vq, val)
    assert again["mse"] == pytest.approx(metrics["mse"], rel=1e-5)
    batch = torch.from_numpy(val[:4].copy()).permute(0, 3, 1, 2)
    assert torch.equal(load_vq(out).encode(batch), vq.encode(batch))


def test_train_vq_bad_flags_are_one_line(tmp_path, capsys):
    data = prepared_shapes(tmp_path, num_images=12, image_size=32)
    assert cli.main(["train-vq", "--data", str(data), "--output", str(tmp_path / "o"), "--downsample", "3"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert cli.main(["train-vq", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_visualize_vq_figure(tmp_path, capsys):
    from PIL import Image

    from seesay.viz.visualize import reconstruction_figure

    vq = tiny_vqgan()
    vq.save_pretrained(tmp_path / "vq")
    paths = []
    for i in range(2):
        p = tmp_path / f"im{i}.png"
        Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(p)
        paths.append(str(p))
    out = tmp_path / "rec.png"
    assert cli.main(["visualize", "--vq", str(tmp_path / "vq"), *paths, "--output", str(out), "--device", "cpu"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    fig = reconstruction_figure(images, vq, predicted_codes=vq.encode(images))
    assert len(fig.axes) == 6 and "100% codes right" in fig.axes[2].get_title()
    assert cli.main(["visualize", "--vq", str(tmp_path / "vq"), "--output", str(tmp_path / "x.png")]) == 2
    assert "at least one image" in capsys.readouterr().err
