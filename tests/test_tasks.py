"""Tasks: prompts in training batches, pretraining rows, mixed datasets (with exact resume),
classification evaluation, the built-in classification set and the recipe-set parameter names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_DECODERS, prepared_shapes, tiny_train_config
from seesay.config import Config, load_config, merge_into
from seesay.data.prepare import prepare_dataset
from seesay.data.store import PreparedData
from seesay.data.tasks import (
    DEFAULT_PROMPT,
    DatasetTask,
    MixtureSampler,
    Source,
    dataset_task,
    mixture_counts,
    parse_weights,
    task_rows,
)
from seesay.errors import SeesayError
from seesay.span_corruption import reconstruct

torch.set_num_threads(1)


class FakeTok:
    """A tokenizer with T5-style sentinels (<extra_id_k> = 99 - k)."""

    pad_id, bos_id, eos_id, unk_id, kind = 0, 1, 2, 3, "fake"
    sentinel_ids = list(range(99, 89, -1))

    def encode_prompt(self, text):
        return [10 + len(w) for w in text.split()]


def _rows(words):
    tokens = torch.zeros((len(words), max(len(w) for w in words) + 2), dtype=torch.long)
    for i, w in enumerate(words):
        tokens[i, : len(w) + 2] = torch.tensor([1, *w, 2])
    return tokens, torch.tensor([len(w) + 2 for w in words])


def _sources(*tasks):
    return [Source(Path("."), None, DatasetTask(t, None if t == "pretrain" else f"prompt of {t}")) for t in tasks]


# -- prompts and pretraining rows -----------------------------------------------------------------------
def test_caption_rows_get_their_datasets_prompt():
    tokens, lengths = _rows([[20, 21], [22, 23, 24], [25]])
    batch = {"dataset": torch.tensor([0, 1, 0]), "image_index": torch.tensor([0, 1, 2])}
    prompt, t, n = task_rows(batch, tokens, lengths, None, _sources("caption", "classify"), FakeTok(), prompts=True,
                             seed=0, epoch=0)
    tok = FakeTok()
    assert prompt[0].tolist()[:3] == tok.encode_prompt("prompt of caption")
    assert prompt[1].tolist()[:3] == tok.encode_prompt("prompt of classify")
    assert t is tokens and n is lengths
    none, t2, _ = task_rows(batch, tokens, lengths, None, _sources("caption", "classify"), tok, prompts=False,
                            seed=0, epoch=0)
    assert none is None and t2 is tokens  # a model that reads no prompt: exactly today's batches


def test_pretraining_rows_are_span_corrupted_per_epoch_and_row():
    words = [list(range(20, 60)), list(range(60, 70)), [70]]
    tokens, lengths = _rows(words)
    batch = {"dataset": torch.tensor([0, 0, 0]), "image_index": torch.tensor([4, 5, 6])}
    src = _sources("pretrain")
    prompt, targets, tlen = task_rows(batch, tokens, lengths, None, src, FakeTok(), prompts=True, seed=1, epoch=0)
    sentinels = FakeTok.sentinel_ids
    for r, w in enumerate(words):
        p = [i for i in prompt[r].tolist() if i != 0]
        t = targets[r, : int(tlen[r])].tolist()
        assert t[0] == 1 and t[-1] == 2 and t[1] == sentinels[0]
        assert reconstruct(p, t[1:-1], sentinels) == w
    again = task_rows(batch, tokens, lengths, None, src, FakeTok(), prompts=True, seed=1, epoch=0)
    other = task_rows(batch, tokens, lengths, None, src, FakeTok(), prompts=True, seed=1, epoch=1)
    assert torch.equal(again[0], prompt) and torch.equal(again[1], targets)
    assert not torch.equal(other[0][0], prompt[0])  # a new epoch corrupts anew
    # a batch mixing pretraining and captioning rows keeps the captioning rows' targets
    mixed = {"dataset": torch.tensor([0, 1, 0]), "image_index": torch.tensor([4, 5, 6])}
    p2, t2, n2 = task_rows(mixed, tokens, lengths, None, _sources("pretrain", "caption"), FakeTok(), prompts=True,
                           seed=1, epoch=0)
    assert t2[1, : int(n2[1])].tolist() == tokens[1, : int(lengths[1])].tolist()


def test_pretraining_needs_sentinels_and_a_prompt_reading_model():
    from seesay.data.tokenize import Vocab

    tokens, lengths = _rows([[5, 6, 7]])
    batch = {"image_index": torch.tensor([0])}
    with pytest.raises(SeesayError, match="word tokenizer has none"):
        task_rows(batch, tokens, lengths, None, _sources("pretrain"), Vocab(["<pad>", "<start>", "<end>", "<unk>"]),
                  prompts=True, seed=0, epoch=0)
    with pytest.raises(SeesayError, match="reads prompts"):
        task_rows(batch, tokens, lengths, None, _sources("pretrain"), FakeTok(), prompts=False, seed=0, epoch=0)


def test_old_manifests_read_as_caption_without_prompt():
    assert dataset_task({"splits": {}}) == DatasetTask("caption", None, None)
    assert dataset_task({}, "pretrain") == DatasetTask("pretrain", None, None)
    assert dataset_task({"task": "caption"}, "caption").prompt == DEFAULT_PROMPT


# -- mixing -----------------------------------------------------------------------------------------------
def test_mixture_proportions():
    assert mixture_counts([30, 10], None) == [30, 10]
    assert mixture_counts([30, 10], [1, 1]) == [20, 20]
    assert mixture_counts([7, 3], [0.7, 0.3]) == [7, 3]
    assert parse_weights("0.7,0.3", 2) == [0.7, 0.3]
    with pytest.raises(SeesayError, match="2 weights for 3 datasets"):
        parse_weights("1,2", 3)
    s = MixtureSampler([30, 10], [1, 3], seed=4)
    s.set_epoch(2)
    order = list(s)
    assert len(order) == 40 and sum(i >= 30 for i in order) == 30  # three quarters from the second dataset
    assert len(set(i for i in order if i >= 30)) == 10  # the small dataset is cycled through whole
    s.set_epoch(2)
    assert list(s) == order
    s.set_epoch(3)
    assert list(s) != order
    ranks = [MixtureSampler([30, 11], seed=4, rank=r, world_size=2) for r in (0, 1)]
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == 21 and set(a) | set(b) == set(range(41))


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Shapes prepared twice with the same vocabulary: 5 and 2 captions per image."""
    root = tmp_path_factory.mktemp("mix")
    a = prepared_shapes(root, num_images=16, val_fraction=0.25)
    b = root / "data2"
    prepare_dataset("karpathy", b, annotations=root / "raw" / "dataset_shapes.json", images=root / "raw",
                    image_size=32, min_word_freq=1, workers=1, progress=False, captions_per_image=2,
                    prompt="Describe it.")
    return a, b


def _mix_cfg(a, b, out, epochs, resume, fine_tune=False):
    cfg = tiny_train_config(a, out, epochs=epochs, resume=resume, seed=3, batch_size=10)
    cfg.decoder.options["dropout"] = 0.3
    cfg.encoder.fine_tune = fine_tune
    cfg.data.datasets, cfg.data.data_weights = [str(a), str(b)], "1,2"
    return cfg


@pytest.mark.parametrize("fine_tune", [False, True], ids=["cached", "fine_tune"])
def test_mixed_datasets_resume_exactly(two_datasets, tmp_path, fine_tune):
    from seesay.train.caption_task import train_captioner

    a, b = two_datasets
    train_captioner(_mix_cfg(a, b, tmp_path / "full", 2, False, fine_tune))
    train_captioner(_mix_cfg(a, b, tmp_path / "split", 1, False, fine_tune))
    state = train_captioner(_mix_cfg(a, b, tmp_path / "split", 2, True, fine_tune))
    assert state.epoch == 2
    x = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    y = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    for k in x:
        assert torch.equal(x[k], y[k]), k
    if not fine_tune:
        assert sorted(p.name.split("-")[0] for p in (tmp_path / "full" / "features").iterdir()) == [
            "train", "train", "val"]  # each dataset's train features, the first's val


def test_mixed_datasets_rows_and_prompts(two_datasets, tmp_path, monkeypatch):
    """Every training row carries its own dataset's prompt; the rows come from both datasets by weight."""
    import seesay.train.caption_task as ct
    from seesay.train.objectives import CrossEntropy

    a, b = two_datasets
    seen = []
    original = CrossEntropy.__call__

    def spy(self, model, src, tokens, lengths, image_rows=None, prompt=None):
        seen.append(prompt)
        return original(self, model, src, tokens, lengths, image_rows, prompt=prompt)

    monkeypatch.setattr(CrossEntropy, "__call__", spy)
    monkeypatch.setattr(ct, "reads_prompt", lambda model: True)
    task_of = {}
    real_task_rows = ct.task_rows

    def rows(batch, *args, **kwargs):
        out = real_task_rows(batch, *args, **kwargs)
        task_of[len(task_of)] = batch["dataset"].tolist()
        return out

    monkeypatch.setattr(ct, "task_rows", rows)
    cfg = _mix_cfg(a, b, tmp_path / "run", 1, False)
    ct.train_captioner(cfg)
    tok = PreparedData(a).vocab
    first, second = tok.encode_prompt(DEFAULT_PROMPT), tok.encode_prompt("Describe it.")
    counts = [0, 0]
    for k, prompt in enumerate(seen):
        for ds, row in zip(task_of[k], prompt.tolist()):
            want = first if ds == 0 else second
            assert row[: len(want)] == want and all(i == tok.pad_id for i in row[len(want):])
            counts[ds] += 1
    n_a, n_b = 12 * 5, 12 * 2  # train images x captions per image
    assert sum(counts) == n_a + n_b and counts[1] == round((n_a + n_b) * 2 / 3)


def test_several_datasets_need_the_same_vocabulary(two_datasets, tmp_path):
    from seesay.train.caption_task import train_captioner

    a, _ = two_datasets
    other = prepared_shapes(tmp_path / "other", num_images=12, seed=9)
    cfg = tiny_train_config(a, tmp_path / "run", epochs=1)
    cfg.data.datasets = [str(a), str(other)]
    with pytest.raises(SeesayError, match="different vocabularies"):
        train_captioner(cfg)


def test_cli_data_flags(tmp_path):
    import argparse

    from seesay.commands.train import add_arguments, build_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = build_config(p.parse_args(["--data", "A", "--data", "B", "--data-weights", "0.7,0.3"]))
    assert cfg.data.path == "A" and cfg.data.datasets == ["A", "B"] and cfg.data.data_weights == "0.7,0.3"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("datasets: [imagenet, sun397]\nroot_dir: /local\n")
    one = build_config(p.parse_args(["--config", str(recipe), "--data", "X"]))
    assert one.data.path == "X" and one.data.datasets == []  # one --data replaces the recipe's list
    from seesay.data.tasks import resolve_datasets

    cfg = build_config(p.parse_args(["--config", str(recipe)]))
    resolve_datasets(cfg)
    assert cfg.data.datasets == ["/local/imagenet", "/local/sun397"] and cfg.data.path == "/local/imagenet"


# -- classification ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classify_data(tmp_path_factory):
    from seesay.data.synth import make_shapes_imagefolder

    root = tmp_path_factory.mktemp("cls")
    make_shapes_imagefolder(root / "raw", num_images=40, image_size=32, val_fraction=0.2, test_fraction=0.2)
    prepare_dataset("imagefolder", root / "data", images=root / "raw", image_size=32, workers=1, progress=False)
    return root


def test_synth_imagefolder_is_a_classification_set(classify_data):
    raw = classify_data / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["test", "train", "val"]
    classes = {p.name for p in (raw / "train").iterdir()}
    assert "red_circle" in classes and len(classes) <= 30
    m = PreparedData(classify_data / "data").manifest
    assert m["task"] == "classify" and "red circle" in m["labels"] and m["captions_per_image"] == 1
    assert m["splits"]["train"]["images"] == 24


def test_classification_evaluation(classify_data, tmp_path):
    from seesay import cli
    from seesay.checkpoint import load_checkpoint
    from seesay.data.classify_formats import target_text
    from seesay.evaluate import _label_logprobs, evaluate_checkpoint
    from seesay.train.caption_task import train_captioner
    from seesay.train.objectives import sequence_logprobs

    data = classify_data / "data"
    cfg = tiny_train_config(data, tmp_path / "run", epochs=2, batch_size=8)
    train_captioner(cfg)
    ev = evaluate_checkpoint(tmp_path / "run" / "last", data, split="test", per_image=tmp_path / "per.jsonl",
                             output=tmp_path / "m.json", device="cpu")
    labels = PreparedData(data).manifest["labels"]
    assert len(ev.rows) == 8 and 0.0 <= ev.accuracy <= 1.0 and 0.0 <= ev.closed_set_accuracy <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "per.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {"image", "generated", "predicted", "gold", "closed_set"} <= set(lines[0])
    assert all(r["closed_set"] in labels and r["gold"] in labels for r in lines)
    for r in lines:  # a generated text that is a label's target names that label
        hit = [lab for lab in labels if target_text(lab) == r["generated"]]
        assert r["predicted"] == (hit[0] if hit else None)
    body = json.loads((tmp_path / "m.json").read_text())
    assert body["accuracy"] == ev.accuracy and body["closed_set_accuracy"] == ev.closed_set_accuracy
    # the batched label scores are each label's teacher-forced log-likelihood
    model = load_checkpoint(tmp_path / "run" / "last").model.eval()
    tok = model.tokenizer
    store = PreparedData(data).split("test")
    x = torch.from_numpy(np.ascontiguousarray(store.images[:2].transpose(0, 3, 1, 2)))
    ids = [[tok.bos_id, *tok.encode(target_text(lab)), tok.eos_id] for lab in labels]
    from seesay.data.tasks import pad_rows

    targets, lens = pad_rows(ids, tok.pad_id), torch.tensor([len(r) for r in ids])
    with torch.no_grad():
        enc = model.encode(x)
        scores = _label_logprobs(model, enc, targets, lens, None, max_rows=7)  # several label chunks
        one = sequence_logprobs(model(enc, targets[3:4].repeat(2, 1), lens[3:4].repeat(2),
                                      torch.tensor([1, 1])).logits, targets[3:4].repeat(2, 1), lens[3:4].repeat(2))
    assert torch.allclose(scores[1, 3], one[0], atol=1e-4)
    rc = cli.main(["evaluate", "--checkpoint", str(tmp_path / "run" / "last"), "--data", str(data), "--split", "test",
                   "--device", "cpu", "--no-progress", "--output", str(tmp_path / "m2.json")])
    assert rc == 0


# -- the recipe set's parameter names ------------------------------------------------------------------------
def test_recipe_aliases(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("image_model_name: microsoft/swinv2-base-patch4-window8-256\nimage_model_train: true\n"
                      "language_model_name: t5-large\nffn: true\nmax_source_length: 512\nmax_target_length: 64\n"
                      "pretrain: true\nseed: 999\nlr: 0.001\noptimizer: AdamW\nlr_scheduler: null\nbatch_size: 64\n"
                      "accumulation_steps: 2\nnum_epochs: 3\nnum_steps: null\nwarmup_steps: 100\nsave_interval: 500\n"
                      "datasets: imagenet sun397\nroot_dir: /local/\nresult_dir: results/\n")
    cfg = load_config(recipe, ["lr=0.01", "pretrain=false", "batch_size=8"])
    assert cfg.encoder.name == "swinv2" and cfg.encoder.options["image_model_name"].startswith("microsoft/swinv2")
    assert cfg.encoder.fine_tune is True and cfg.decoder.name == "t5"
    assert cfg.decoder.options == {"language_model_name": "t5-large", "ffn": True, "max_source_length": 512,
                                   "max_target_length": 64}
    assert cfg.decoder.lr == cfg.encoder.lr == 0.01 and cfg.data.task is None and cfg.train.batch_size == 8
    assert (cfg.train.seed, cfg.train.optimizer, cfg.train.lr_scheduler, cfg.train.grad_accum) == (999, "adamw", "none", 2)
    assert (cfg.train.epochs, cfg.train.num_steps, cfg.train.warmup_steps, cfg.train.save_interval) == (3, None, 100, 500)
    assert cfg.data.datasets == ["imagenet", "sun397"] and cfg.data.root_dir == "/local/"
    assert cfg.train.output == "results/"
    assert load_config(recipe).data.task == "pretrain"
    with pytest.raises(SeesayError, match="unknown section 'image_model'"):
        merge_into(Config(), {"image_model": "x"})
    with pytest.raises(SeesayError, match="--set 'bogus=1'"):
        load_config(None, ["bogus=1"])


def test_pretraining_trains_a_prompt_reading_model_and_resumes_exactly(two_datasets, tmp_path, monkeypatch):
    """Span corruption end to end with the tiny t5 decoder (`pretrain: true` on caption data): the
    corrupted captions reach the model as prompts, and a resumed run corrupts exactly as an
    uninterrupted one. The word vocabulary has no sentinels: its last ten words stand in for them."""
    import seesay.data.tasks as tasks
    from conftest import TINY_DECODERS
    from seesay.train.caption_task import train_captioner
    from seesay.train.objectives import CrossEntropy

    a, _ = two_datasets
    vocab_size = len(PreparedData(a).vocab)
    monkeypatch.setattr(tasks, "sentinel_ids", lambda tok: list(range(vocab_size - 1, vocab_size - 11, -1)))
    prompts = []
    original = CrossEntropy.__call__

    def spy(self, model, src, tokens, lengths, image_rows=None, prompt=None):
        prompts.append(prompt)
        return original(self, model, src, tokens, lengths, image_rows, prompt=prompt)

    monkeypatch.setattr(CrossEntropy, "__call__", spy)

    def cfg(out, epochs, resume):
        c = tiny_train_config(a, out, epochs=epochs, resume=resume, seed=2, batch_size=20)
        c.decoder.name, c.decoder.options = "t5", {**TINY_DECODERS["t5"], "dropout": 0.1}
        c.data.task = "pretrain"
        return c

    train_captioner(cfg(tmp_path / "full", 2, False))
    assert prompts and all(p is not None and p.shape[0] > 0 for p in prompts)
    sentinels = set(range(vocab_size - 1, vocab_size - 11, -1))
    assert any(int(i) in sentinels for p in prompts for i in p.flatten())
    train_captioner(cfg(tmp_path / "split", 1, False))
    train_captioner(cfg(tmp_path / "split", 2, True))
    x = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    y = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    for k in x:
        assert torch.equal(x[k], y[k]), k


@pytest.mark.slow
def test_a_tiny_t5_learns_the_labels(classify_data, tmp_path):
    """Classification as captioning end to end: a tiny T5 (over a small CNN trained with it) on the
    labelled shapes, with their prompt, names the labels of the images it trained on, as generated
    text and in the closed set. (A tiny random Swin v2 learns these too, but far more slowly: see
    benchmarks/vlm_shapes.py; test_swinv2_t5.py overfits captions through it.)"""
    from seesay.evaluate import evaluate_checkpoint
    from seesay.train.caption_task import train_captioner

    data = classify_data / "data"
    cfg = tiny_train_config(data, tmp_path / "run", epochs=60, batch_size=8, patience=1000, lr_scheduler="none")
    cfg.decoder.name, cfg.decoder.options = "t5", dict(TINY_DECODERS["t5"])
    cfg.encoder.fine_tune, cfg.encoder.lr, cfg.decoder.lr = True, 3e-3, 3e-3
    train_captioner(cfg)
    ev = evaluate_checkpoint(tmp_path / "run" / "last", data, split="train", device="cpu",
                             output=tmp_path / "m.json")
    assert ev.closed_set_accuracy >= 0.9, ev.rows
    assert ev.accuracy >= 0.75, [r["generated"] for r in ev.rows]
