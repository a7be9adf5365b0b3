"""The prepared store and the PyTorch datasets: shapes, padding, DistributedSampler, many workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from seesay.data import (
    CaptionDataset,
    ImageCaptionDataset,
    collate_captions,
    collate_images,
    open_prepared,
    prepare_dataset,
)
from seesay.errors import SeesayError

WORDS = ["red", "blue", "green", "circle", "square", "small", "big", "left", "right", "of"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    recs = []
    for i in range(30):
        path = tmp / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(path)
        sents = [" ".join(WORDS[(i + j + k) % 10] for k in range(1 + (i + j) % 6)) for j in range(3 + i % 4)]
        recs.append({"image": str(path), "image_id": f"im{i}", "split": "train" if i < 24 else "val",
                     "sentences": sents})
    out = tmp / "data"
    prepare_dataset(None, out, records=recs, image_size=12, min_word_freq=1, captions_per_image=4, workers=1,
                    progress=False)
    return out


def test_caption_dataset_items_and_collate(data_dir):
    ds = CaptionDataset(data_dir, "train")
    assert len(ds) == 24 * 4
    item = ds[5]
    assert item["image_index"] == 1 and item["image"].shape == (3, 12, 12) and item["image"].dtype == torch.uint8
    assert item["caption"][0] == ds.vocab.start_id and item["caption"][-1] == ds.vocab.end_id
    assert len(item["caption"]) == item["length"]
    store = open_prepared(data_dir).split("train")
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), store.images[1])
    batch = collate_captions([ds[i] for i in range(8)])
    assert batch["images"].shape == (8, 3, 12, 12)
    assert batch["captions"].shape == (8, int(batch["lengths"].max())) and batch["captions"].dtype == torch.long
    for row, n in zip(batch["captions"], batch["lengths"]):
        assert (row[n:] == 0).all() and row[n - 1] == ds.vocab.end_id
    feats_only = CaptionDataset(data_dir, "train", load_images=False)[0]
    assert "image" not in feats_only and collate_captions([feats_only])["image_index"].tolist() == [0]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_image_dataset_keeps_all_references(data_dir):
    ds = ImageCaptionDataset(data_dir, "val")
    assert len(ds) == 6
    batch = collate_images([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 3, 12, 12)
    assert batch["captions"].shape[0] == 12 and batch["lengths"].shape == (12,)
    assert batch["image_rows"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batch["image_ids"] == ["im24", "im25", "im26"]
    assert len(batch["references"][0]) == 3 + 24 % 4 and len(batch["references"][1]) == 3 + 25 % 4
    assert ds.vocab.decode(batch["captions"][0]) == batch["references"][0][0]


def test_store_pickles_without_memory_maps(data_dir):
    st = open_prepared(data_dir).split("train")
    _ = st.images[0], st.references[0]
    blob = pickle.dumps(st)
    assert len(blob) < 1000
    st2 = pickle.loads(blob)
    np.testing.assert_array_equal(st2.images[3], st.images[3])
    assert isinstance(st.images, np.memmap)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_many_workers_read_at_once(data_dir):
    ds = CaptionDataset(data_dir, "train")
    ref = [b for b in DataLoader(ds, batch_size=7, collate_fn=collate_captions, num_workers=0)]
    got = [b for b in DataLoader(ds, batch_size=7, collate_fn=collate_captions, num_workers=4)]
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["captions"], b["captions"])


def test_distributed_sampler_shards_the_dataset(data_dir):
    ds = ImageCaptionDataset(data_dir, "train")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_size=5, sampler=sampler, collate_fn=collate_images, num_workers=2)
        for batch in loader:
            seen += batch["image_index"].tolist()
            assert batch["images"].shape[0] * 4 == batch["captions"].shape[0]
    assert sorted(seen) == list(range(24))


def test_unprepared_dir_errors(tmp_path, data_dir):
    with pytest.raises(SeesayError, match="not a prepared dataset"):
        open_prepared(tmp_path)
    (tmp_path / "x.partial").mkdir()
    with pytest.raises(SeesayError, match="did not finish"):
        open_prepared(tmp_path / "x")
    with pytest.raises(SeesayError, match="no split 'test'"):
        CaptionDataset(data_dir, "test")
