"""Region captioning and grounding with location tokens, on the built-in shapes, tiny swinv2 + t5, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_DECODERS, TINY_ENCODERS, tiny_train_config
from seesay.data.prepare import prepare_dataset
from seesay.data.region_tasks import answer_constraints, loc_ids, split_region_row
from seesay.data.store import PreparedData
from seesay.data.tasks import Source, dataset_task, task_rows
from seesay.errors import SeesayError
from seesay.locations import bins_to_box, box_to_bins

torch.set_num_threads(1)
pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

BINS = 32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """(raw shapes dir, region data, grounding data): 24 images of 32 px, SentencePiece, 32 location bins."""
    from seesay.data.synth import make_shapes

    root = tmp_path_factory.mktemp("regions")
    make_shapes(root / "raw", num_images=24, seed=0, image_size=32, val_fraction=0.25, test_fraction=0.0)
    out = {}
    for task in ("region", "grounding"):
        out[task] = root / task
        prepare_dataset("shapes-regions", out[task], images=root / "raw", image_size=32, tokenizer="sentencepiece",
                        vocab_size=150, loc_vocab_size=BINS, task=task, workers=1, progress=False)
    return root / "raw", out["region"], out["grounding"]


def _source(path):
    p = PreparedData(path)
    return Source(path, p, dataset_task(p.manifest))


def test_prepared_rows_carry_their_boxes(shapes):
    raw, region, grounding = shapes
    p = PreparedData(region)
    m = p.manifest
    assert (m["task"], m["loc_vocab_size"], m["captions_per_image"]) == ("region", BINS, 3)
    assert PreparedData(grounding).manifest["task"] == "grounding"
    for name in ("captions.npy", "boxes.npy"):  # region and grounding data are the same arrays
        assert np.array_equal(np.load(region / "train" / name), np.load(grounding / "train" / name))
    store = p.split("train")
    boxes = np.load(region / "train" / "boxes.npy")
    tok = p.vocab
    first = loc_ids(tok, BINS)[0]
    source = json.loads((raw / "dataset_shapes.json").read_text())
    size = {img["filename"]: img for img in source["images"]}
    for i in range(len(store)):
        meta = store.meta[i]
        objects = size[meta["image_id"]]["objects"]
        pixel_boxes = [o["box"] for o in objects]
        for c in range(store.captions_per_image):
            row = store.captions[i, c, : store.lengths[i, c]].tolist()
            bins = [t - first for t in row[1:5]]
            assert all(0 <= b < BINS for b in bins)
            back = bins_to_box(bins, 32, 32, BINS)  # pixels again
            # within one bin of one of the image's objects, and the stored relative box is that object's
            assert any(max(abs(u - v) for u, v in zip(back, pb)) <= 32 / BINS for pb in pixel_boxes)
            assert tuple(box_to_bins(boxes[i, c], 1, 1, BINS)) == tuple(bins)
            text = tok.decode(row[5:])
            assert text in meta["extra"]["texts"]


def test_training_rows_split_box_and_text(shapes):
    _, region, grounding = shapes
    sources = [_source(region), _source(grounding)]
    tok = sources[0].prepared.vocab
    store = sources[0].prepared.split("train")
    caps = torch.from_numpy(np.array(store.captions[:2, 0], dtype=np.int64))
    lens = torch.from_numpy(np.array(store.lengths[:2, 0], dtype=np.int64))
    batch = {"dataset": torch.tensor([0, 1]), "image_index": torch.tensor([0, 1])}
    prompt, target, tlen = task_rows(batch, caps, lens, None, sources, tok, prompts=True, seed=0, epoch=0)
    first = loc_ids(tok, BINS)[0]
    rows = caps.tolist()
    # region: the prompt ends with the row's four location tokens, the target is the text
    p0 = [t for t in prompt[0].tolist() if t != tok.pad_id]
    assert p0[-4:] == rows[0][1:5] and p0[:-4] == tok.encode_prompt("What does the region describe? region:")
    assert target[0, : tlen[0]].tolist() == [tok.bos_id, *rows[0][5: int(lens[0])]]
    # grounding: the prompt holds the text, the target is bos + four location tokens + eos
    t1 = target[1, : tlen[1]].tolist()
    assert t1 == [tok.bos_id, *rows[1][1:5], tok.eos_id] and all(first <= t < first + BINS for t in t1[1:5])
    head = tok.encode_prompt("Which region does the text describe? text:")
    p1 = [t for t in prompt[1].tolist() if t != tok.pad_id]
    assert p1 == [*head, *rows[1][5: int(lens[1]) - 1]]
    assert split_region_row([1, 7, 8, 9, 10, 20, 21, 2], "grounding", [5], 1, 2) == ([5, 20, 21], [1, 7, 8, 9, 10, 2])


def _tiny_model(tok):
    from seesay.model import build_model

    torch.manual_seed(0)
    spec = {"encoder": {"name": "swinv2", **TINY_ENCODERS["swinv2"]},
            "decoder": {"name": "t5", "vocab_size": len(tok), **TINY_DECODERS["t5"]}}
    return build_model(spec, tokenizer=tok, image_size=32).eval()


def test_logit_masks_on_an_untrained_model(shapes):
    from seesay.decoding import Beam, Greedy
    from seesay.locations import token_kind

    _, region, _ = shapes
    p = PreparedData(region)
    tok = p.vocab
    model = _tiny_model(tok)
    images = torch.from_numpy(np.array(p.split("train").images[:3]).transpose(0, 3, 1, 2).copy())
    ground = answer_constraints(tok, "grounding")
    for strategy in (Greedy(), Beam(3)):
        res = model.generate(images, strategy, prompt="Which region does the text describe? text: a red circle",
                             max_len=4, constraints=ground)
        for row, n in zip(res.tokens.tolist(), res.lengths.tolist()):
            kinds = [token_kind(tok.id_to_token(t)) for t in row[:n] if t != tok.eos_id]
            assert kinds == ["loc"] * 4
    # a caption never holds a location token, even from a model pushed towards them
    first = loc_ids(tok, BINS)[0]

    def push(module, args, out):
        out = out.clone()
        out[..., first: first + BINS] += 100.0
        return out

    hook = model.decoder.t5.lm_head.register_forward_hook(push)
    try:
        words = answer_constraints(tok, "caption")
        res = model.generate(images, Greedy(), prompt="What does the image describe?", max_len=8, constraints=words)
        for row, n in zip(res.tokens.tolist(), res.lengths.tolist()):
            assert n > 0 and all(token_kind(tok.id_to_token(t)) == "word" for t in row[:n])
        free = model.generate(images, Greedy(), prompt="What does the image describe?", max_len=8)
        # without the mask the pushed model does say them: the mask is what stops it
        assert any(token_kind(tok.id_to_token(t)) == "loc" for t in free.tokens.flatten().tolist())
    finally:
        hook.remove()


def _cfg(data, out, *, steps=None, epochs=1, select="CIDEr"):
    cfg = tiny_train_config(data, out, epochs=epochs, seed=1, batch_size=12, select_metric=select)
    cfg.encoder.name, cfg.encoder.options = "swinv2", dict(TINY_ENCODERS["swinv2"])
    cfg.encoder.fine_tune = True
    cfg.decoder.name, cfg.decoder.options = "t5", {**TINY_DECODERS["t5"], "max_target_length": 24}
    cfg.train.num_steps = steps
    return cfg


@pytest.mark.parametrize("task", ["grounding", "region"])
def test_both_tasks_end_to_end(shapes, tmp_path, task, capsys):
    from seesay.cli import main
    from seesay.train.caption_task import train_captioner

    raw, region, grounding = shapes
    data = grounding if task == "grounding" else region
    select = "grounding_accuracy" if task == "grounding" else "exact_match"
    state = train_captioner(_cfg(data, tmp_path / "run", steps=3, select=select))
    assert state.step == 3
    val = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(select in r.get("val", {}) for r in val)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "last"), "--data", str(data), "--split", "val",
                 "--beam-size", "1", "--per-image", str(tmp_path / "items.jsonl"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "eval-val" / "metrics.json").read_text())
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    n_regions = sum(len({(tuple(b), t) for b, t in zip(m["extra"]["boxes"], m["extra"]["texts"])})
                    for m in PreparedData(data).split("val").meta)
    assert len(items) == n_regions == metrics["regions"]
    if task == "grounding":
        assert "grounding accuracy" in out and "mean IoU" in out
        assert 0 <= metrics["grounding_accuracy"] <= 1 and all(i["predicted_box"] is not None for i in items)
        assert metrics["mean_iou"] == pytest.approx(sum(i["iou"] for i in items) / len(items))
        image = raw / "images" / items[0]["image_id"]
        assert main(["caption", str(image), "--checkpoint", str(tmp_path / "run" / "last"), "--task", "grounding",
                     "--text", "a red circle", "--json"]) == 0
        line = json.loads(capsys.readouterr().out.strip())
        assert len(line["grounding"]) == 4 and all(0 <= v <= 32 for v in line["grounding"])
    else:
        assert "exact match" in out and "CIDEr" in metrics and 0 <= metrics["exact_match"] <= 1


def test_region_data_needs_sentencepiece_and_a_format_with_boxes(shapes, tmp_path):
    raw, _, _ = shapes
    with pytest.raises(SeesayError, match="needs --tokenizer sentencepiece"):
        prepare_dataset("shapes-regions", tmp_path / "x", images=raw, workers=1, progress=False)
    with pytest.raises(SeesayError, match="go with a format with boxes"):
        prepare_dataset("karpathy", tmp_path / "y", annotations=raw / "dataset_shapes.json", images=raw,
                        task="grounding", workers=1, progress=False)
    with pytest.raises(SeesayError, match="--loc-vocab-size must be an integer >= 2"):
        prepare_dataset("shapes-regions", tmp_path / "z", images=raw, tokenizer="sentencepiece", vocab_size=150,
                        loc_vocab_size=1, workers=1, progress=False)


def test_coco_instances_prepare_into_region_data(tmp_path):
    """COCO's instance boxes (category names as texts) through `seesay prepare --format coco-instances`."""
    from PIL import Image

    from seesay.cli import main

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    cats = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    for sub, first in (("train2014", 0), ("val2014", 100)):
        (coco / sub).mkdir()
        images, anns = [], []
        for i in range(first, first + 8):
            Image.new("RGB", (40, 20), (i % 255, 30, 60)).save(coco / sub / f"{i}.jpg")
            images.append({"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 20})
            anns.append({"id": 10 * i, "image_id": i, "category_id": 1 + i % 2, "bbox": [4, 2, 20, 10],
                         "iscrowd": 0})
            anns.append({"id": 10 * i + 1, "image_id": i, "category_id": 1, "bbox": [0, 0, 40, 20], "iscrowd": 1})
        (coco / "annotations" / f"instances_{sub}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    out = tmp_path / "data"
    assert main(["prepare", "--format", "coco-instances", "--coco-dir", str(coco), "--tokenizer", "sentencepiece",
                 "--vocab-size", "112", "--loc-vocab-size", "10", "--task", "grounding", "--image-size", "16",
                 "--workers", "1", "--no-progress", "--output", str(out)]) == 0
    p = PreparedData(out)
    assert (p.manifest["task"], p.manifest["loc_vocab_size"]) == ("grounding", 10)
    store = p.split("train")
    boxes = np.load(out / "train" / "boxes.npy")
    # [4, 2, 20, 10] of a 40x20 image: relative (0.1, 0.1, 0.6, 0.6); the crowd box is skipped
    assert np.allclose(boxes, [0.1, 0.1, 0.6, 0.6])
    first = loc_ids(p.vocab, 10)[0]
    assert [t - first for t in store.captions[0, 0, 1:5]] == [1, 1, 6, 6]
    assert {t for m in store.meta for t in m["extra"]["texts"]} <= {"dog", "cat"}


def test_t5_image_positions_option():
    """`image_positions` N: a learned embedding per grid place added to the image tokens (grounding needs
    absolute places); more image tokens than N is one line."""
    from seesay.encoders.base import EncoderOutput
    from seesay.registry import build_decoder

    torch.manual_seed(0)
    dec = build_decoder("t5", vocab_size=30, enc_dim=8, **TINY_DECODERS["t5"], image_positions=6).eval()
    enc = EncoderOutput(torch.zeros(2, 6, 8), torch.zeros(2, 8), (2, 3))
    tokens, lengths = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]), torch.tensor([4, 3])
    out = dec(enc, tokens, lengths).logits
    with torch.no_grad():
        dec.image_positions.weight[3] += 1.0  # the same features at another place read differently
    assert not torch.allclose(out, dec(enc, tokens, lengths).logits)
    with pytest.raises(SeesayError, match="7 image tokens but image_positions 6"):
        dec(EncoderOutput(torch.zeros(2, 7, 8), torch.zeros(2, 8), (1, 7)), tokens, lengths)
