"""Every shipped recipe loads and builds; the CPU recipe for real photos trains; defaults that learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seesay import cli
from seesay.config import load_config
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.registry import build_captioner
from seesay.train.caption_task import captioner_spec

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
# the vision-language recipes at full size name hub models (Swin v2 base, T5 large): parsed and
# checked against the builders' options, never built here (that would download them)
FULL_SIZE = {f"vlm_{task}_{mode}" for task in ("pretrain", "caption", "classify") for mode in ("frozen", "trained")}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_builds(recipe):
    from seesay.config import check_model_options

    cfg = load_config(recipe)
    vocab = Vocab([*SPECIALS, *[f"w{i}" for i in range(20)]])
    spec = captioner_spec(cfg, vocab)
    if recipe.stem in FULL_SIZE:
        check_model_options(cfg)
        return
    # without external weights: no download, no package file needed to check the architecture
    model = build_captioner(spec, vocab, {"image_size": spec.get("encoder", {}).get("image_size", 0)},
                            external_weights=False)
    assert model.spec()["captioner"] == cfg.captioner.family


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A tiny pairs dataset of real photos (scikit-image's samples), prepared at 160 px."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from seesay.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("photos")
    (root / "img").mkdir()
    samples = {"astronaut": "an astronaut in a white suit in front of a flag",
               "coffee": "a cup of coffee on a saucer", "chelsea": "a ginger cat looking to the side",
               "rocket": "a rocket on a launch pad", "immunohistochemistry": "stained tissue under a microscope",
               "hubble_deep_field": "many small galaxies in the dark sky"}
    pairs = []
    for i, (name, text) in enumerate(samples.items()):
        Image.fromarray(getattr(skimage_data, name)()[..., :3]).save(root / "img" / f"{name}.png")
        for k in range(3):
            pairs.append({"image": f"{name}.png", "text": text if k == 0 else f"{text} {k}",
                          "split": "val" if i == 0 else "train"})
    (root / "pairs.json").write_text(json.dumps(pairs))
    prepare_dataset("pairs", root / "data", annotations=root / "pairs.json", images=root / "img", image_size=160,
                    min_word_freq=1, workers=1, progress=False, captions_per_image=3)
    return root


def test_cpu_recipe_trains_on_real_photos_with_cached_features(photos, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    run = tmp_path / "run"
    rc = cli.main(["train", "--config", str(ROOT / "configs" / "cpu_efficientnet.yaml"), "--data",
                   str(photos / "data"), "--output", str(run), "--epochs", "2", "--batch-size", "6", "--device", "cpu",
                   "--no-progress", "--set", "train.tensorboard=false"])
    assert rc == 0
    cached = sorted(p.name.split("-")[0] for p in (run / "features").iterdir())
    assert cached == ["train", "val"]  # every image encoded once, then only the decoder trained
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[1]["train_loss"] < records[0]["train_loss"]
    cfg = json.loads((run / "best" / "config.json").read_text())
    assert cfg["model"]["encoder"]["name"] == "efficientnet_lite0" and cfg["model"]["decoder"]["alpha_c"] == 0.0


def test_default_small_cnn_trains_its_encoder_and_soft_attention_has_no_alpha_c(photos, tmp_path):
    """`seesay train --data D` without a recipe: the random small CNN is trained (a frozen random
    encoder learns nothing), and soft attention's doubly stochastic term is off by default."""
    from safetensors.torch import load_file

    from seesay.registry import build_decoder

    run = tmp_path / "run"
    small = ["--set", "encoder.width=8", "--set", "encoder.encoded_size=4", "--set", "encoder.image_size=32",
             "--set", "decoder.embed_dim=8", "--set", "decoder.attention_dim=8", "--set", "decoder.decoder_dim=8"]
    rc = cli.main(["train", "--data", str(photos / "data"), "--output", str(run), "--epochs", "1", "--batch-size",
                   "6", "--workers", "0", "--device", "cpu", "--no-progress", "--set", "train.tensorboard=false",
                   "--set", "train.val_max_len=6", *small])
    assert rc == 0
    assert not (run / "features").exists()  # the encoder ran in the loop because it trains
    torch.manual_seed(0)
    dec = build_decoder("soft_attention", vocab_size=5, enc_dim=4)
    assert dec.alpha_c == 0.0
    frozen = tmp_path / "frozen"
    rc = cli.main(["train", "--data", str(photos / "data"), "--output", str(frozen), "--epochs", "1", "--batch-size",
                   "6", "--workers", "0", "--device", "cpu", "--no-progress", "--set", "train.tensorboard=false",
                   "--set", "train.val_max_len=6", "--freeze-encoder", *small])
    assert rc == 0 and (frozen / "features").is_dir()
    a, b = load_file(str(run / "last" / "model.safetensors")), load_file(str(frozen / "last" / "model.safetensors"))
    enc_keys = [k for k in a if k.startswith("encoder.") and a[k].is_floating_point()]
    assert enc_keys and any(not torch.equal(a[k], b[k]) for k in enc_keys)


def test_full_size_vision_language_recipes_use_the_recipe_sets_names_and_defaults():
    """The six recipes of issue 12: Swin v2 base + T5 large, lr 0.001, AdamW, batch 64, seed 999;
    pretrain on redcaps, caption on coco, classify on imagenet + sun397; frozen or trained Swin."""
    import yaml

    assert {p.stem for p in RECIPES} >= FULL_SIZE | {"vlm_tiny_caption", "vlm_tiny_classify", "vlm_tiny_pretrain"}
    datasets = {"pretrain": ["redcaps"], "caption": ["coco"], "classify": ["imagenet", "sun397"]}
    for name in sorted(FULL_SIZE):
        raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        assert raw["image_model_name"] == "microsoft/swinv2-base-patch4-window8-256"
        assert raw["language_model_name"] == "t5-large"
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        task, mode = name.split("_")[1:]
        assert (cfg.encoder.name, cfg.decoder.name) == ("swinv2", "t5")
        assert cfg.encoder.fine_tune is (mode == "trained")
        assert (cfg.decoder.lr, cfg.train.optimizer, cfg.train.batch_size, cfg.train.seed) == (0.001, "adamw", 64, 999)
        assert cfg.data.datasets == datasets[task] and cfg.data.task == ("pretrain" if task == "pretrain" else None)
        assert cfg.decoder.options["max_source_length"] == cfg.decoder.options["max_target_length"] == 512
