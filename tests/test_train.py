"""Training: every encoder x decoder learns, the train command end to end, exact resume,
frozen-encoder features computed once per image, config precedence."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_DECODERS, TINY_ENCODERS, prepared_shapes, tiny_train_config
from seesay.config import Config, apply_overrides, load_config
from seesay.errors import SeesayError
from seesay.registry import list_decoders, list_encoders

DEC_SMALL = ["--set", "decoder.embed_dim=16", "--set", "decoder.attention_dim=16", "--set", "decoder.decoder_dim=16",
             "--set", "decoder.dropout=0.0", "--set", "encoder.width=8", "--set", "encoder.encoded_size=4",
             "--set", "encoder.image_size=32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_shapes(tmp_path_factory.mktemp("shapes"), num_images=24, seed=0, val_fraction=0.25)


def _cfg(data_dir, out, **train) -> Config:
    return tiny_train_config(data_dir, out, **train)


# ---------------------------------------------------------------------------------------------


def _learn_tiny_captions(encoder: str, decoder: str, *, autocast: torch.dtype | None = None) -> list[float]:
    """Six Adam steps of a tiny encoder + decoder on two images with two captions each (encoder
    trained), forward under CPU autocast to `autocast` when given; the losses. Every step's
    gradients are float32 and finite."""
    import contextlib

    from seesay.model import build_model
    from seesay.train.objectives import token_cross_entropy as caption_loss

    torch.manual_seed(0)
    spec = {"encoder": {"name": encoder, **TINY_ENCODERS[encoder]},
            "decoder": {"name": decoder, **TINY_DECODERS[decoder], "vocab_size": 11}}
    model = build_model(spec)
    model.encoder.set_fine_tune(True)
    model.train()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tokens = torch.tensor([[1, 4, 5, 6, 2, 0], [1, 7, 8, 2, 0, 0], [1, 4, 9, 10, 6, 2], [1, 7, 2, 0, 0, 0]])
    lengths = torch.tensor([5, 4, 6, 3])
    image_rows = torch.tensor([0, 0, 1, 1])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        cast = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with cast:
            out = model(images, tokens, lengths, image_rows)
            loss, _, _ = caption_loss(out.logits, tokens, lengths)
            if out.extras and out.extras.get("aux_loss") is not None:
                loss = loss + out.extras["aux_loss"]
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("decoder", sorted(set(list_decoders())))
@pytest.mark.parametrize("encoder", sorted(set(list_encoders())))
def test_every_encoder_decoder_learns(encoder, decoder):
    losses = _learn_tiny_captions(encoder, decoder)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("decoder", sorted(set(list_decoders())))
def test_every_decoder_learns_under_cpu_bfloat16_autocast(decoder):
    """What `--amp --amp-dtype bfloat16` does on the CPU: forward under bfloat16 autocast, float32
    weights get finite float32 gradients, and the loss goes down."""
    losses = _learn_tiny_captions("small_cnn", decoder, autocast=torch.bfloat16)
    assert losses[-1] < losses[0] - 0.05, losses


def test_caption_loss_ignores_padding():
    from seesay.train.objectives import token_cross_entropy as caption_loss

    logits = torch.randn(2, 4, 7)
    tokens = torch.tensor([[1, 3, 4, 2, 0], [1, 5, 2, 0, 0]])
    lengths = torch.tensor([4, 3])
    loss, n, _ = caption_loss(logits, tokens, lengths)
    assert int(n) == 5
    logits2 = logits.clone()
    logits2[0, 3] += 100.0  # predicts after <end>: padding
    logits2[1, 2:] -= 100.0
    assert torch.allclose(loss, caption_loss(logits2, tokens, lengths)[0])


# ---------------------------------------------------------------------------------------------


def test_train_command_end_to_end(data_dir, tmp_path):
    from seesay.checkpoint import load_checkpoint
    from seesay.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--data", str(data_dir), "--encoder", "small_cnn", "--decoder", "soft_attention",
               "--output", str(out), "--epochs", "2", "--batch-size", "20", "--workers", "2", "--device", "cpu",
               "--no-progress", "--fine-tune-encoder", *DEC_SMALL, "--set", "train.val_max_len=12"])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert {"epoch", "step", "train_loss", "train_top5", "lr", "val", "time_s"} <= set(r)
        assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(r["val"])
    assert (out / "best" / "model.safetensors").is_file() and (out / "last" / "train_state").is_dir()
    assert not (out / "best" / "train_state").exists()
    assert any((out / "tb").iterdir())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"]["fine_tune"] is True and cfg["decoder"]["options"]["embed_dim"] == 16
    ck = load_checkpoint(out / "best")
    assert ck.preprocess["image_size"] == 32
    res = ck.model.generate(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), max_len=6)
    assert res.tokens.shape[0] == 1


def test_frozen_encoder_without_cache(data_dir, tmp_path):
    from seesay.train.caption_task import train_captioner

    cfg = _cfg(data_dir, tmp_path / "run", epochs=1, cache_features=False, max_steps_per_epoch=2)
    state = train_captioner(cfg)
    assert state.step == 2 and not (tmp_path / "run" / "features").exists()


def test_train_command_errors(tmp_path, capsys):
    from seesay.cli import main

    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err


@pytest.mark.parametrize("fine_tune", [False, True], ids=["cached", "fine_tune"])
def test_resume_is_exact(data_dir, tmp_path, fine_tune):
    """2 epochs in one go == 1 epoch, stop, resume for the 2nd (CPU, fixed seed, workers=0)."""
    from seesay.train.caption_task import train_captioner

    def cfg(out, epochs, resume):
        c = _cfg(data_dir, out, epochs=epochs, resume=resume, seed=3)
        c.decoder.options["dropout"] = 0.3  # dropout draws random numbers: RNG state must resume too
        c.encoder.fine_tune = fine_tune
        return c

    train_captioner(cfg(tmp_path / "full", 2, False))
    train_captioner(cfg(tmp_path / "split", 1, False))
    state = train_captioner(cfg(tmp_path / "split", 2, True))
    assert state.epoch == 2
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in full] == [r["train_loss"] for r in split]


@pytest.mark.parametrize("mode", ["cached", "cached_by_image", "fine_tune"])
def test_resume_inside_an_epoch_is_exact(data_dir, tmp_path, mode, monkeypatch):
    """2 epochs in one go == a run that saves every 2 steps, dies in its 2nd epoch, and is resumed."""
    from seesay.checkpoint import load_train_state
    from seesay.train.caption_task import CaptionTask, train_captioner

    def cfg(out, resume):
        c = _cfg(data_dir, out, epochs=2, resume=resume, seed=5, save_every_steps=2,
                 batch_by="image" if mode == "cached_by_image" else "caption")
        c.decoder.options["dropout"] = 0.3  # dropout draws random numbers: RNG state must resume too
        c.encoder.fine_tune = mode == "fine_tune"
        return c

    train_captioner(cfg(tmp_path / "full", False))
    per_epoch = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])["step"]
    assert per_epoch == 5
    original, calls = CaptionTask.training_step, {"n": 0}

    def power_cut(self, batch, model):
        calls["n"] += 1
        if calls["n"] == per_epoch + 4:  # the 4th batch of epoch 2; last/ was saved at step 8 (its 3rd)
            raise RuntimeError("power cut")
        return original(self, batch, model)

    monkeypatch.setattr(CaptionTask, "training_step", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        train_captioner(cfg(tmp_path / "split", False))
    monkeypatch.undo()
    saved = load_train_state(tmp_path / "split" / "last")["loop"]
    assert (saved["epoch"], saved["batches_done"], saved["step"]) == (1, 3, 8)  # saved at step 8, inside epoch 2
    state = train_captioner(cfg(tmp_path / "split", True))
    assert (state.epoch, state.step, state.batches_done) == (2, 10, 0)
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in full] == [r["train_loss"] for r in split]  # the epoch's loss sums resumed too


def test_ctrl_c_saves_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    """SIGINT finishes the step, writes RUN_DIR/last inside the epoch, returns; --resume ends as if never stopped."""
    import signal

    from seesay.checkpoint import load_train_state
    from seesay.train.caption_task import CaptionTask, train_captioner

    def cfg(out, resume):
        c = _cfg(data_dir, out, epochs=2, resume=resume, seed=7)
        c.decoder.options["dropout"] = 0.3
        return c

    train_captioner(cfg(tmp_path / "full", False))
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / `&`
    original, calls = CaptionTask.training_step, {"n": 0}

    def interrupted(self, batch, model):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)
        return original(self, batch, model)

    monkeypatch.setattr(CaptionTask, "training_step", interrupted)
    state = train_captioner(cfg(tmp_path / "split", False))
    monkeypatch.undo()
    assert state.stopped_by_signal and state.step == 2
    assert load_train_state(tmp_path / "split" / "last")["loop"]["batches_done"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers given back
    state = train_captioner(cfg(tmp_path / "split", True))
    assert not state.stopped_by_signal and state.epoch == 2
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_inside_an_epoch_needs_the_same_batches_and_sane_save_settings(data_dir, tmp_path, monkeypatch):
    import signal

    from seesay.train.caption_task import CaptionTask, train_captioner

    original, calls = CaptionTask.training_step, {"n": 0}

    def interrupted(self, batch, model):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)
        return original(self, batch, model)

    monkeypatch.setattr(CaptionTask, "training_step", interrupted)
    assert train_captioner(_cfg(data_dir, tmp_path / "run", epochs=2)).stopped_by_signal
    monkeypatch.undo()
    with pytest.raises(SeesayError, match="same batches .*batch_size 20 -> 10"):
        train_captioner(_cfg(data_dir, tmp_path / "run", epochs=2, resume=True, batch_size=10))
    for bad in ({"save_every_steps": -1}, {"save_every_minutes": 0.0}):
        with pytest.raises(SeesayError, match="save_every"):
            train_captioner(_cfg(data_dir, tmp_path / "other", epochs=1, **bad))


def test_frozen_encoder_runs_once_per_image(data_dir, tmp_path, monkeypatch):
    """With a frozen encoder an epoch never runs it: every image is encoded exactly once, total."""
    from seesay.encoders.cnn import SmallCNNEncoder
    from seesay.train.caption_task import train_captioner

    seen = {"images": 0, "calls": 0}
    original = SmallCNNEncoder.forward

    def counting(self, x):
        seen["images"] += x.shape[0]
        seen["calls"] += 1
        return original(self, x)

    monkeypatch.setattr(SmallCNNEncoder, "forward", counting)
    cfg = _cfg(data_dir, tmp_path / "run", epochs=3)
    cfg.train.val_max_len = 3
    manifest = json.loads((data_dir / "manifest.json").read_text())
    n_train, n_val = manifest["splits"]["train"]["images"], manifest["splits"]["val"]["images"]
    assert manifest["captions_per_image"] == 5
    train_captioner(cfg)
    assert seen["images"] == n_train + n_val  # not 3 epochs x 5 captions x images
    # a second run with the same encoder reuses the cache: no encoder call at all
    seen["images"] = 0
    cfg2 = _cfg(data_dir, tmp_path / "run2", epochs=1, feature_cache_dir=str(tmp_path / "run" / "features"))
    train_captioner(cfg2)
    assert seen["images"] == 0


def test_cached_features_batched_by_image_reach_the_decoder_once_per_image(data_dir, tmp_path, monkeypatch):
    """train.batch_by image: each batch is whole images with all their captions, the decoder gets one
    feature row per image and `image_rows`; a caption batch (the default) gets one row per caption."""
    from seesay.model import CaptionModel
    from seesay.train.caption_task import train_captioner

    seen = []
    original = CaptionModel.forward

    def spy(self, src, tokens, lengths, image_rows=None, **kw):
        if self.training:
            grid_rows = src.grid.shape[0] if hasattr(src, "grid") else src.shape[0]
            seen.append((grid_rows, None if image_rows is None else image_rows.tolist(), tokens.shape[0]))
        return original(self, src, tokens, lengths, image_rows, **kw)

    monkeypatch.setattr(CaptionModel, "forward", spy)
    state = train_captioner(_cfg(data_dir, tmp_path / "img", epochs=1, batch_by="image"))
    assert state.step == len(seen) == 5  # 18 training images, 4 per batch of 20 captions
    for grid_rows, rows, captions in seen:
        assert rows == [i for i in range(grid_rows) for _ in range(5)] and captions == 5 * grid_rows
    assert sum(g for g, _, _ in seen) == 18
    seen.clear()
    train_captioner(_cfg(data_dir, tmp_path / "cap", epochs=1))
    assert all(rows is None and g == n for g, rows, n in seen)
    with pytest.raises(SeesayError, match="--batch-by must be caption or image"):
        train_captioner(_cfg(data_dir, tmp_path / "bad", epochs=1, batch_by="images"))


def test_image_grouped_batches_encode_each_image_once(data_dir):
    """With --fine-tune-encoder a batch holds whole images with all their captions (data layer)."""
    from seesay.data.loader import ImageCaptionDataset, collate_images

    ds = ImageCaptionDataset(data_dir, "train")
    batch = collate_images([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["captions"].shape[0] == 15
    assert batch["image_rows"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert int(batch["lengths"].max()) == batch["captions"].shape[1]


def test_early_stop_and_lr_decay(data_dir, tmp_path, monkeypatch):
    from seesay.train import caption_task
    from seesay.train.caption_task import train_captioner

    monkeypatch.setattr(caption_task.CaptionTask, "validate", lambda self: {"CIDEr": 0.5, "Bleu_4": 0.1})
    cfg = _cfg(data_dir, tmp_path / "run", epochs=10, patience=3, lr_decay_patience=2, lr_decay=0.5,
               max_steps_per_epoch=1)
    state = train_captioner(cfg)
    assert state.stopped_early and state.epoch == 4 and state.best_epoch == 1
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([4e-4, 4e-4, 2e-4, 2e-4])


def test_time_budget_stops_at_an_epoch_boundary(data_dir, tmp_path, monkeypatch):
    from seesay.train import caption_task, loop
    from seesay.train.caption_task import train_captioner

    scores = iter([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # always improving: only the budget can stop it
    monkeypatch.setattr(caption_task.CaptionTask, "validate", lambda self: {"CIDEr": next(scores)})
    clock = iter(range(0, 10_000, 20))  # every perf_counter() call advances 20 s
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(clock)))
    cfg = _cfg(data_dir, tmp_path / "run", epochs=6, max_steps_per_epoch=1, max_minutes=5.0)
    state = train_captioner(cfg)
    done = state.epoch
    assert 1 <= done < 6 and not state.stopped_early
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == done  # every finished epoch was validated and logged
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()

    cfg = _cfg(data_dir, tmp_path / "free", epochs=3, max_steps_per_epoch=1)  # no budget: all epochs
    monkeypatch.setattr(caption_task.CaptionTask, "validate", lambda self: {"CIDEr": 0.5})
    assert train_captioner(cfg).epoch == 3


def test_select_metric_must_exist(data_dir, tmp_path):
    from seesay.train.caption_task import train_captioner

    cfg = _cfg(data_dir, tmp_path / "run", epochs=1, select_metric="NOPE", max_steps_per_epoch=1)
    with pytest.raises(SeesayError, match="select-metric"):
        train_captioner(cfg)


# ---------------------------------------------------------------------------------------------


def test_config_precedence(tmp_path):
    from seesay.cli import build_parser
    from seesay.commands.train import build_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 7\n  batch_size: 8\ndecoder:\n  name: show_tell\n  embed_dim: 64\n")
    args = build_parser().parse_args(["train", "--config", str(recipe), "--set", "train.epochs=9",
                                      "--set", "decoder.decoder_dim=32", "--batch-size", "4", "--lr", "0.01"])
    cfg = build_config(args)
    assert cfg.train.epochs == 9 and cfg.train.batch_size == 4 and cfg.decoder.lr == 0.01
    assert cfg.decoder.name == "show_tell" and cfg.decoder.options == {"embed_dim": 64, "decoder_dim": 32}
    assert cfg.train.patience == 20 and cfg.train.grad_clip == 5.0  # defaults kept
    with pytest.raises(SeesayError, match="unknown key"):
        apply_overrides(Config(), ["train.nope=1"])
    with pytest.raises(SeesayError, match="section.key"):
        apply_overrides(Config(), ["epochs=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(SeesayError, match="malformed"):
        load_config(bad)


def test_shipped_recipes_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.encoder.name in list_encoders() and cfg.decoder.name in list_decoders(), path


def test_pairs_config_is_prepared_and_trained(tmp_path):
    """The Titans extension's config.json (image_dir, annotations_file) trains directly."""
    import numpy as np
    from PIL import Image

    from seesay.cli import main

    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        pairs += [{"image": f"{i}.png", "text": f"a picture number {i % 3}"},
                  {"image": f"{i}.png", "text": f"an image of kind {i % 3}"}]
    (tmp_path / "ann.json").write_text(json.dumps(pairs))
    (tmp_path / "config.json").write_text(json.dumps({"image_dir": "imgs", "annotations_file": "ann.json",
                                                      "epochs": 1}))
    out = tmp_path / "run"
    rc = main(["train", "--config", str(tmp_path / "config.json"), "--output", str(out), "--device", "cpu",
               "--workers", "0", "--no-progress", "--batch-size", "8", *DEC_SMALL, "--set", "train.val_max_len=6"])
    assert rc == 0
    assert (out / "data" / "manifest.json").is_file() and (out / "best" / "model.safetensors").is_file()


class _SignalProbe(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        import signal

        return int(signal.getsignal(signal.SIGINT) is signal.SIG_IGN), int(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)


def test_data_workers_leave_ctrl_c_to_the_training_process(data_dir, tmp_path):
    """A terminal's Ctrl-C reaches the DataLoader workers too; they must not die before the trainer saves."""
    from seesay.train.caption_task import CaptionTask
    from seesay.train.distributed import DistInfo

    cfg = _cfg(data_dir, tmp_path / "run", epochs=1)
    cfg.data.workers = 1
    task = CaptionTask(cfg, DistInfo(), tmp_path / "run")
    probe = torch.utils.data.DataLoader(_SignalProbe(), num_workers=1, worker_init_fn=task.loader.worker_init_fn)
    assert [tuple(int(v) for v in b) for b in probe] == [(1, 1)]
    assert next(iter(task.train_batches(0)))["captions"].shape[0] > 0  # the real loader runs with it


def test_ctrl_c_on_the_command_line_with_data_workers(data_dir, tmp_path):
    """SIGINT to the whole process group (a terminal's Ctrl-C), DataLoader workers included: the
    command saves RUN_DIR/last and exits 130; --resume then finishes the run."""
    import os
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    args = [sys.executable, "-m", "seesay", "train", "--data", str(data_dir), "--output", str(run), "--device", "cpu",
            "--workers", "2", "--no-progress", "--epochs", "400", "--save-every-steps", "1", "--batch-size", "20",
            *DEC_SMALL, "--set", "train.tensorboard=false", "--set", "train.val_max_len=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    lines = []
    for line in proc.stderr:  # wait until training is under way
        lines.append(line)
        if "inside epoch 2" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, rest = proc.communicate(timeout=120)  # a hang guard, not a measurement
    err = "".join(lines) + rest
    assert proc.returncode == 130, err[-3000:]
    assert "stopping after this optimizer step" in err and "continue with --resume" in err
    assert "Traceback" not in err and "exited unexpectedly" not in err
    from seesay.checkpoint import load_train_state

    loop = load_train_state(run / "last")["loop"]
    assert loop["epoch"] >= 1 and (loop["stopped_by_signal"] or loop["batches_done"] == 0)  # (0: during validation)
    # it stopped promptly: inside epoch 2, where the signal arrived, or in the validation that ends it,
    # not after more of its 400 epochs
    assert loop["epoch"] <= 2, loop
    resumed = subprocess.run([*args[:args.index("--epochs")], "--epochs", str(loop["epoch"] + 1),
                              *args[args.index("--epochs") + 2:], "--resume"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_train_state(run / "last")["loop"]["epoch"] == loop["epoch"] + 1


def test_amp_on_the_cpu_trains_under_bfloat16_autocast(data_dir, tmp_path, monkeypatch, caplog):
    """--amp --amp-dtype bfloat16 on the CPU: every training forward runs under CPU bfloat16
    autocast (the decoder's products in bfloat16), float32 weights stay float32 and the loss is
    finite; --amp with float16 on the CPU says so once and trains in float32; a bad dtype is one line."""
    from seesay.model import CaptionModel
    from seesay.train.caption_task import train_captioner

    seen = []
    original = CaptionModel.forward

    def spy(self, *a, **kw):
        out = original(self, *a, **kw)
        if self.training:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.logits.dtype))
        return out

    monkeypatch.setattr(CaptionModel, "forward", spy)
    state = train_captioner(_cfg(data_dir, tmp_path / "bf16", epochs=1, amp=True, amp_dtype="bfloat16"))
    assert seen and all(on and dt == torch.bfloat16 and logits == torch.bfloat16 for on, dt, logits in seen)
    weights = load_file(str(tmp_path / "bf16" / "last" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    metrics = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert state.step > 0 and losses and all(torch.isfinite(torch.tensor(losses)))

    seen.clear()
    with caplog.at_level("WARNING", logger="seesay.train.loop"):
        train_captioner(_cfg(data_dir, tmp_path / "fp16", epochs=1, amp=True))
    assert seen and not any(on for on, _, _ in seen) and all(logits == torch.float32 for _, _, logits in seen)
    assert sum("--amp on the CPU" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(SeesayError, match="--amp-dtype must be float16 or bfloat16, not 'fp32'"):
        train_captioner(_cfg(data_dir, tmp_path / "bad", epochs=1, amp=True, amp_dtype="fp32"))
