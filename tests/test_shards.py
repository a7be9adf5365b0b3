"""WebDataset shards (seesay.data.shards): writing, reading img2dataset layouts (local and over
HTTP), streaming batches across ranks and workers, exact resume inside an epoch, training."""

from __future__ import annotations

import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_train_config
from seesay.errors import SeesayError

pytest.importorskip("webdataset")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """(store DATA_DIR, sharded DATA_DIR) of the same 24 shapes (16 train in shards of 5)."""
    from seesay.data.prepare import prepare_dataset
    from seesay.data.synth import make_shapes

    root = tmp_path_factory.mktemp("shards")
    ann = make_shapes(root / "raw", num_images=24, seed=1, image_size=32, val_fraction=0.25)
    kw = dict(annotations=ann, images=root / "raw", image_size=32, min_word_freq=1, workers=1, progress=False)
    prepare_dataset("karpathy", root / "store", **kw)
    prepare_dataset("karpathy", root / "sharded", output_format="shards", shard_size=5, **kw)
    return root / "store", root / "sharded", ann


def _stream(data_dir, **kw):
    from seesay.data.shards import ShardSplit, ShardStream
    from seesay.data.store import PreparedData

    p = PreparedData(data_dir)
    kw.setdefault("batch_size", 4)
    return ShardStream(ShardSplit(p), p.vocab, **kw)


def test_round_trip_store_to_shards_batches_match(shapes):
    from seesay.data.loader import ImageCaptionDataset, collate_images
    from seesay.data.store import PreparedData

    store_dir, shard_dir, _ = shapes
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["format"] == "shards" and manifest["splits"]["train"] == {"images": 16, "captions": 80, "shards": 4}
    assert [s["samples"] for s in manifest["shards"]["train"]] == [5, 5, 5, 1]
    assert not (shard_dir / "train" / "images.npy").exists()  # train lives in the tars only
    names = tarfile.open(shard_dir / "shards" / "train-000000.tar").getnames()
    assert sorted(names[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"]
    # val/test stay in the store, identical to a store preparation
    for split in ("val", "test"):
        assert np.array_equal(np.load(store_dir / split / "images.npy"), np.load(shard_dir / split / "images.npy"))
        assert np.array_equal(np.load(store_dir / split / "captions.npy"), np.load(shard_dir / split / "captions.npy"))
    assert (store_dir / "vocab.json").read_text() == (shard_dir / "vocab.json").read_text()

    store = ImageCaptionDataset(PreparedData(store_dir), "train")
    by_id = {store[i]["image_id"]: store[i] for i in range(len(store))}
    batches = list(_stream(shard_dir, batch_size=4))
    assert len(batches) == 4
    seen = []
    for b in batches:
        assert set(b) == {"images", "captions", "lengths", "image_rows", "image_index", "image_ids", "references"}
        assert b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (3, 32, 32)
        ref = collate_images([by_id[i] for i in b["image_ids"]])
        assert torch.equal(b["captions"], ref["captions"]) and torch.equal(b["lengths"], ref["lengths"])
        assert torch.equal(b["image_rows"], ref["image_rows"]) and b["references"] == ref["references"]
        diff = (b["images"].float() - ref["images"].float()).abs().mean().item()
        assert diff < 6, diff  # JPEG (quality 95) of the same resized image
        seen += b["image_ids"]
    assert sorted(seen) == sorted(by_id)  # one epoch on one process: every image exactly once


def test_caption_rows_for_cached_features(shapes):
    b = next(iter(_stream(shapes[1], batch_size=2, mode="captions", load_images=False)))
    assert set(b) == {"captions", "lengths", "image_index", "image_ids"}
    assert b["captions"].shape[0] == b["lengths"].shape[0] == b["image_index"].shape[0] == 10  # 2 images x 5 captions
    assert len(set(b["image_index"].tolist())) == 2


def test_prepare_shards_resumes_keeping_finished_shards(shapes, tmp_path):
    from seesay.data.prepare import PrepareInterrupted
    from seesay.data.shards import prepare_shards

    _, shard_dir, ann = shapes
    kw = dict(annotations=ann, images=ann.parent, image_size=32, min_word_freq=1, workers=1, progress=False,
              shard_size=5)
    out = tmp_path / "out"
    with pytest.raises(PrepareInterrupted):
        prepare_shards("karpathy", out, _stop_after_shards=2, **kw)
    part = tmp_path / "out.partial" / "shards"
    done = {p.name: p.stat().st_ino for p in part.glob("*.tar")}
    assert sorted(done) == ["train-000000.tar", "train-000001.tar"]
    (part / "train-000002.tar.tmp").write_bytes(b"half a shard")  # a shard the kill left half written
    manifest = prepare_shards("karpathy", out, **kw)
    assert {n: (out / "shards" / n).stat().st_ino for n in done} == done  # finished shards were kept
    assert manifest["shards"] == json.loads((shard_dir / "manifest.json").read_text())["shards"]
    for n in ("train-000002.tar", "train-000003.tar"):
        assert tarfile.open(out / "shards" / n).getnames() == tarfile.open(shard_dir / "shards" / n).getnames()


# -- img2dataset layout --------------------------------------------------------------------------
def _png(color, size=(20, 14)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 18), color).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


WORDS = ["red", "green", "blue", "small", "big"]


def _img2dataset(folder: Path) -> Path:
    """3 shards of 4 samples as img2dataset writes them ({key}.jpg/.txt/.json); shard 0 holds a
    corrupt image (key 000000001) and a sample without text (key 000000002)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(3):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(4):
                key = f"{s:05d}{j:04d}"
                color = (40 * j + 10, 60 * s, 100)
                image = b"\xff\xd8 not really a jpeg" if (s, j) == (0, 1) else (_png(color) if j == 3 else _jpg(color))
                _add(tar, f"{key}.{'png' if j == 3 else 'jpg'}", image)
                if (s, j) != (0, 2):
                    _add(tar, f"{key}.txt", f"a {WORDS[j]} {WORDS[(s + j) % 5]} shape".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "url": f"http://example.com/{key}.jpg",
                                                     "width": 24, "height": 18}).encode())
    return folder


def _check_img2dataset(data_dir: Path) -> None:
    from seesay.data.store import PreparedData

    m = json.loads((data_dir / "manifest.json").read_text())
    assert m["format"] == "shards" and m["splits"]["train"]["images"] == 6 and m["splits"]["val"]["images"] == 4
    assert [s["samples"] for s in m["shards"]["train"]] == [2, 4]
    assert m["skipped"] == 1 and m["no_caption_images"] == 1
    skipped = {x["key"]: x["reason"] for x in map(json.loads, (data_dir / "skipped.jsonl").read_text().splitlines())}
    assert set(skipped) == {"000000001", "000000002"} and skipped["000000002"].startswith("no caption")
    assert "not an image" in skipped["000000001"] or "broken" in skipped["000000001"]
    assert not list(data_dir.rglob("*.tar"))  # the images stay in the given shards
    ids = [i for b in _stream(data_dir, batch_size=2) for i in b["image_ids"]]
    assert sorted(ids) == sorted(["000000000", "000000003", "000010000", "000010001", "000010002", "000010003"])
    assert PreparedData(data_dir).split("val").images.shape == (4, 16, 16, 3)


def test_img2dataset_shards_skip_corrupt_and_captionless(tmp_path, capsys):
    from seesay.cli import main

    src = _img2dataset(tmp_path / "corpus")
    rc = main(["prepare", "--format", "webdataset", "--shards", str(src / "{00000..00002}.tar"), "--output",
               str(tmp_path / "data"), "--image-size", "16", "--min-word-freq", "1", "--workers", "1",
               "--max-skip-fraction", "0.2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    _check_img2dataset(tmp_path / "data")
    # one shard without --val-shards: one line, not a traceback
    assert main(["prepare", "--format", "webdataset", "--shards", str(src / "00000.tar"), "--output",
                 str(tmp_path / "d2"), "--no-progress"]) != 0
    assert "--val-shards" in capsys.readouterr().err


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    folder = tmp_path / "served"
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shards_read_over_http(http_root, tmp_path):
    from seesay.data.shards import prepare_shards

    folder, base = http_root
    _img2dataset(folder)
    prepare_shards("webdataset", tmp_path / "data", shards=f"{base}/{{00000..00002}}.tar", image_size=16,
                   min_word_freq=1, workers=1, progress=False, max_skip_fraction=0.2)
    m = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert all(s["url"].startswith(base) for s in m["shards"]["train"])
    _check_img2dataset(tmp_path / "data")  # training batches streamed from the server too


# -- ranks, workers, resume ------------------------------------------------------------------------------
def test_ranks_and_workers_read_disjoint_samples_in_equal_batches(shapes):
    from seesay.data.shards import plan_epoch

    for counts, workers, even in (([6, 6, 6, 6], 1, True), ([6, 6, 6, 6], 2, True), ([5, 5, 5, 1, 4, 4], 2, False),
                                  ([12, 12], 2, True)):  # the last: fewer shards than units, split by sample
        units, n_batches = [], []
        for rank in range(2):
            batches = 0
            for w in range(workers):
                mine, order, sizes = plan_epoch(counts, seed=3, epoch=1, rank=rank, world_size=2, worker=w,
                                                num_workers=workers, batch_size=3)
                assert len(order) == sum(sizes)
                units.append({(mine[j], off) for _, j, off in order})
                batches += len(sizes)
            n_batches.append(batches)
        assert n_batches[0] == n_batches[1] == 4  # ceil(24 / 2) = 12 samples per rank, batches of 3
        assert sum(map(len, units)) == len(set().union(*units))  # no sample in two units
        if even:  # shards that hold what each unit needs: every sample once
            assert len(set().union(*units)) == 24
    a = plan_epoch(counts, seed=3, epoch=1, rank=0, world_size=1, worker=0, num_workers=1, batch_size=4)[1]
    b = plan_epoch(counts, seed=3, epoch=2, rank=0, world_size=1, worker=0, num_workers=1, batch_size=4)[1]
    assert a != b  # another epoch, another order


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_inside_a_shard_continues_the_stream(shapes, monkeypatch, workers):
    """Batches after `skip` equal the uninterrupted epoch's; the resumed stream opens no earlier shard."""
    from torch.utils.data import DataLoader

    from seesay.data.shards import stream as shards

    stream = _stream(shapes[1], batch_size=3, buffer=4, seed=7)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    stream.set_epoch(1)
    full = [b["image_ids"] for b in loader]
    assert len(full) == len(stream) == 6
    stream.set_epoch(1, skip=3 * 3)
    assert len(stream) == 3
    assert [b["image_ids"] for b in loader] == full[3:]
    if workers == 0:  # what the resumed stream reads: nothing before the first sample still to come
        opened, decoded = [], []
        real_iter, real_item = shards.iter_shard, shards.ShardStream._item
        monkeypatch.setattr(shards, "iter_shard", lambda url, *a, **k: opened.append(Path(url).name) or real_iter(url, *a, **k))
        monkeypatch.setattr(shards.ShardStream, "_item", lambda self, s, i: decoded.append(i) or real_item(self, s, i))
        stream.set_epoch(1, skip=3 * 3)
        assert [b["image_ids"] for b in stream] == full[3:]
        assert len(decoded) == 16 - 9  # no image decoded twice
        mine, order, _ = shards.plan_epoch(stream.split.counts, seed=7, epoch=1, rank=0, world_size=1, worker=0,
                                           num_workers=1, batch_size=3, buffer=4)
        first = min(order[9:])
        assert opened[0] == f"train-{mine[first[1]]:06d}.tar" and len(opened) <= len(mine) - first[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


DDP_SCRIPT = """
import json, sys, torch
from torch.utils.data import DataLoader
from seesay.data.shards import ShardSplit, ShardStream
from seesay.data.store import PreparedData
from seesay.train.distributed import setup_distributed, cleanup_distributed
torch.set_num_threads(1)
dist = setup_distributed("cpu")
p = PreparedData(sys.argv[1])
stream = ShardStream(ShardSplit(p), p.vocab, batch_size=3, rank=dist.rank, world_size=dist.world_size, seed=1,
                     load_images=False)
stream.set_epoch(0)
ids = [b["image_ids"] for b in DataLoader(stream, batch_size=None, num_workers=1)]
n = torch.tensor([len(ids)])
torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
json.dump({"batches": ids, "max": int(n)}, open(f"{sys.argv[2]}/rank{dist.rank}.json", "w"))
cleanup_distributed()
"""


@pytest.mark.slow
def test_two_process_gloo_ranks_see_disjoint_samples(shapes, tmp_path):
    script = tmp_path / "ddp_stream.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(shapes[1]), str(tmp_path)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["batches"]) == len(r1["batches"]) == r0["max"] == 3  # 8 images per rank in batches of 3
    a, b = ([i for batch in r["batches"] for i in batch] for r in (r0, r1))
    assert len(a) == len(b) == 8 and not set(a) & set(b)  # whole shards per rank: never the same sample


# -- training ---------------------------------------------------------------------------------------
def test_seesay_train_from_shards_with_cached_features(shapes, tmp_path):
    from seesay.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--data", str(shapes[1]), "--output", str(out), "--encoder", "small_cnn", "--freeze-encoder",
               "--decoder", "soft_attention", "--epochs", "1", "--workers", "0", "--batch-size", "10", "--device",
               "cpu", "--no-progress", "--set", "encoder.width=8", "--set", "encoder.encoded_size=4",
               "--set", "encoder.image_size=32", "--set", "decoder.embed_dim=16", "--set", "decoder.attention_dim=16",
               "--set", "decoder.decoder_dim=16", "--set", "train.val_max_len=6", "--set", "train.tensorboard=false"])
    assert rc == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 8  # 16 images / 2 per batch
    caches = [json.loads(p.read_text()) for p in (out / "features").glob("train-*/meta.json")]
    assert [c["num_images"] for c in caches] == [16]  # the encoder ran once over the shards


def test_resume_inside_an_epoch_over_shards_is_exact(shapes, tmp_path, monkeypatch):
    """2 epochs in one go == a run saved every 2 steps that dies inside its 2nd epoch, resumed."""
    from seesay.train.caption_task import CaptionTask, train_captioner

    def cfg(out, resume):
        c = tiny_train_config(shapes[1], out, epochs=2, resume=resume, seed=5, save_every_steps=2, batch_size=15,
                              cache_features=False)
        c.decoder.options["dropout"] = 0.3
        return c

    train_captioner(cfg(tmp_path / "full", False))
    original, calls = CaptionTask.training_step, {"n": 0}

    def power_cut(self, batch, model):
        calls["n"] += 1
        if calls["n"] == 6 + 4:  # 6 batches of 3 images an epoch; dies at the 4th of epoch 2 (saved after 2)
            raise RuntimeError("power cut")
        return original(self, batch, model)

    monkeypatch.setattr(CaptionTask, "training_step", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        train_captioner(cfg(tmp_path / "split", False))
    monkeypatch.undo()
    other = cfg(tmp_path / "split", True)
    other.data.workers = 2  # another worker count would change the rest of the epoch: refused
    with pytest.raises(SeesayError, match="--workers 0"):
        train_captioner(other)
    train_captioner(cfg(tmp_path / "split", True))
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_self_critical_trains_from_shards(shapes, tmp_path):
    from seesay.train.caption_task import train_captioner

    cfg = tiny_train_config(shapes[1], tmp_path / "run", epochs=1, objective="scst", scst_samples=2, batch_size=8,
                            max_steps_per_epoch=2)
    state = train_captioner(cfg)
    assert state.step == 2


def test_sentencepiece_shards_are_refused_in_one_line(tmp_path):
    from seesay.data.prepare import prepare_dataset

    with pytest.raises(SeesayError, match="sentencepiece is not supported for shards"):
        prepare_dataset("pairs", tmp_path / "out", annotations=tmp_path / "a.json", tokenizer="sentencepiece",
                        output_format="shards")
    assert not (tmp_path / "out").exists()
