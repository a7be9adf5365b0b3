"""Self-critical training: the baselines on hand-computed numbers, the reward against the metrics
code and the training references, the direction of the gradient, training through the command
line, exact resume, and `--init`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_DECODERS, TINY_ENCODERS, prepared_shapes, tiny_train_config
from seesay import cli
from seesay.config import Config
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.decoders.base import DecoderOutput
from seesay.decoding import DecodeResult, Greedy, Sample
from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError
from seesay.metrics import CiderD, cider_score
from seesay.registry import list_decoders
from seesay.train.objectives import SelfCritical, mean_of_others
from seesay.train.reward import EOS_WORD, CaptionReward, document_frequencies, load_document_frequencies

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_shapes(tmp_path_factory.mktemp("shapes_scst"), num_images=24, seed=0, val_fraction=0.25)


def _cfg(data_dir, out, **train) -> Config:
    return tiny_train_config(data_dir, out, decoder={"dropout": 0.3}, **train)


@pytest.fixture(scope="module")
def xe_run(data_dir, tmp_path_factory):
    """A cross-entropy model to start self-critical training from (RUN/best)."""
    from seesay.train.caption_task import train_captioner

    out = tmp_path_factory.mktemp("xe") / "run"
    train_captioner(_cfg(data_dir, out, epochs=2, seed=1))
    assert (out / "best" / "model.safetensors").is_file()
    return out


# ---- baselines ---------------------------------------------------------------------------------


def test_mean_of_others_baseline_by_hand():
    reward = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 40.0])  # two images x 3 samples
    assert torch.allclose(mean_of_others(reward, 3), torch.tensor([4.0, 3.5, 1.5, 25.0, 25.0, 10.0]))
    assert torch.allclose(mean_of_others(torch.tensor([3.0, 5.0]), 2), torch.tensor([5.0, 3.0]))
    with pytest.raises(SeesayError, match="scst-samples"):
        mean_of_others(reward, 1)


VOCAB = Vocab([*SPECIALS, "red", "square", "blue", "circle"])


def _ids(text: str) -> list[int]:
    return [*VOCAB.encode(text), VOCAB.eos_id]


class ToyCaptioner(torch.nn.Module):
    """A captioner whose next-token distribution is one learnt table (any image, any position),
    and whose `generate` returns scripted captions: the gradient and the loss can be worked out by hand."""

    def __init__(self, greedy: list[str], sampled: list[str]) -> None:
        super().__init__()
        self.tokenizer = VOCAB
        self.table = torch.nn.Parameter(torch.zeros(len(VOCAB)))
        self.scripted = {Greedy: greedy, Sample: sampled}
        self.calls: list[tuple[str, int, bool, bool]] = []

    def encode(self, images):
        flat = images.float().flatten(1)
        return EncoderOutput(flat[:, None, :], flat, (1, 1))

    def forward(self, src, tokens, lengths, image_rows=None):
        rows, steps = tokens.size(0), tokens.size(1) - 1
        return DecoderOutput(self.table.expand(rows, steps, -1), None, {})

    def generate(self, src, strategy=Greedy(), *, prompt=None, max_len=50):
        texts = self.scripted[type(strategy)]
        self.calls.append((type(strategy).__name__, src.grid.size(0), self.training, torch.is_grad_enabled()))
        assert src.grid.size(0) == len(texts)
        rows = [_ids(t) for t in texts]
        width = max(map(len, rows))
        tokens = torch.tensor([r + [VOCAB.pad_id] * (width - len(r)) for r in rows])
        return DecodeResult(tokens, torch.tensor([len(r) for r in rows]), torch.zeros(len(rows)), None)

    def logprob(self, text: str) -> float:
        logp = torch.log_softmax(self.table.detach(), -1)
        return float(sum(logp[i] for i in _ids(text)))


class WordReward:
    """1 point per "red" in the caption, 0.5 for finishing it."""

    def __call__(self, references, candidates, finished, image_of):
        return [c.split().count("red") + 0.5 * f for c, f in zip(candidates, finished)]


def test_greedy_baseline_and_loss_by_hand():
    images = torch.zeros(2, 3, 2, 2)
    model = ToyCaptioner(greedy=["red square", "blue circle"],
                         sampled=["red red", "blue", "blue circle", "red"])  # image 0: 2 samples, image 1: 2
    model.train()
    objective = SelfCritical(WordReward(), samples=2, baseline="greedy", max_len=5)
    out = objective(model, images, [["a red square"], ["a blue circle"]])
    # rewards 2.5, 0.5 | 0.5, 1.5; greedy rewards 1.5 (image 0), 0.5 (image 1); every caption has
    # 2 or 3 tokens (eos included) of probability 1/8 under the all-zero table
    reward, base = [2.5, 0.5, 0.5, 1.5], [1.5, 1.5, 0.5, 0.5]
    logp = [model.logprob(t) for t in ["red red", "blue", "blue circle", "red"]]
    expected = -sum((r - b) * lp for r, b, lp in zip(reward, base, logp)) / 4
    assert out["loss_scst"].item() == pytest.approx(expected, rel=1e-5)
    assert out["reward"].item() == pytest.approx(1.25) and out["baseline"].item() == pytest.approx(1.0)
    assert out["greedy_reward"].item() == pytest.approx(1.0) and out["n"] == 4
    # sampling and the greedy pass ran without autograd, in eval mode, the samples image-major
    assert model.calls == [("Sample", 4, False, False), ("Greedy", 2, False, False)]
    assert model.training


class PackedToy(ToyCaptioner):
    """The same table, given packed (decoders/base.py): one logits row per real position, with its place."""

    packs_logits = True

    def forward(self, src, tokens, lengths, image_rows=None, packed=False):
        assert packed  # the objective asks for it
        steps = tokens.size(1) - 1
        pos = [b * steps + t for b, n in enumerate(lengths.tolist()) for t in range(n - 1)]
        return DecoderOutput(self.table.expand(len(pos), -1), None, {}, torch.tensor(pos))


def test_packed_logits_give_the_same_loss_and_gradient():
    images = torch.zeros(2, 3, 2, 2)
    texts = {"greedy": ["red square", "blue circle"], "sampled": ["red red", "blue", "blue circle", "red"]}
    grads, losses = [], []
    for cls in (ToyCaptioner, PackedToy):
        model = cls(**texts)
        with torch.no_grad():
            model.table.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3, 0.5, -0.4, 0.2, 0.7, -0.1])[: len(VOCAB)])
        out = SelfCritical(WordReward(), samples=2, baseline="greedy", max_len=5)(
            model, images, [["a red square"], ["a blue circle"]])
        out["loss_scst"].backward()
        losses.append(out["loss_scst"].item())
        grads.append(model.table.grad.clone())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    torch.testing.assert_close(grads[1], grads[0])


def test_a_step_raises_the_log_prob_of_captions_above_the_baseline():
    model = ToyCaptioner(greedy=[], sampled=["red", "blue circle", "red square", "circle"])
    objective = SelfCritical(WordReward(), samples=2, baseline="mean", max_len=5)
    before = {t: model.logprob(t) for t in ["red", "blue circle", "red square", "circle"]}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = objective(model, torch.zeros(2, 3, 2, 2), [["red"], ["red square"]])
    assert out["baseline"].item() == pytest.approx(out["reward"].item())  # the mean baseline's mean is the mean reward
    out["loss_scst"].backward()
    opt.step()
    after = {t: model.logprob(t) for t in before}
    assert after["red"] > before["red"] and after["red square"] > before["red square"]  # rewards 1.5 vs 0.5
    assert after["blue circle"] < before["blue circle"] and after["circle"] < before["circle"]


# ---- the reward ---------------------------------------------------------------------------------

TRAIN_REFS = [["A red square.", "a big red square", "red square on the left"],
              ["A blue circle.", "a small blue circle", "blue circle at the top"],
              ["a green triangle", "A green triangle and a red square.", "green triangle"],
              ["two red squares", "a pair of red squares", "red squares"]]


def _tokenized(refs):
    from seesay.metrics import tokenize_corpus

    return tokenize_corpus(dict(enumerate(refs)), lang="en", tokenizer="python")


def test_reward_is_the_metrics_cider_d_with_the_training_statistics(tmp_path):
    reward = CaptionReward.for_training_data(tmp_path, "train", TRAIN_REFS, lang="en")
    # the batch is the training set: CIDEr-D as `seesay.metrics` computes it, with <eos> words
    cands = ["a red square", "a blue circle", "a red square", "red squares"]
    got = reward(TRAIN_REFS, cands, [True] * 4, [0, 1, 2, 3])
    gts = {k: [f"{r} {EOS_WORD}" for r in refs] for k, refs in _tokenized(TRAIN_REFS).items()}
    _, expected = cider_score(gts, {k: f"{c} {EOS_WORD}" for k, c in enumerate(cands)})
    assert got == pytest.approx(expected, abs=1e-12)
    # a caption that never ended misses the n-grams ending in <eos>: a lower reward
    _, plain = cider_score(gts, dict(enumerate(cands)))
    assert reward(TRAIN_REFS, cands, [False] * 4, [0, 1, 2, 3]) == pytest.approx(plain, abs=1e-12)
    assert all(plain < expected)

    # a batch of two images (one sampled twice): the statistics still come from all 4 training images
    batch = [TRAIN_REFS[1], TRAIN_REFS[3]]
    got = reward(batch, ["a blue circle", "red squares", "blue circle"], [True, True, True], [0, 1, 0])
    df, n = document_frequencies(TRAIN_REFS, "en")
    assert n == 4
    refs = {k: [f"{r} {EOS_WORD}" for r in v] for k, v in _tokenized(batch).items()}
    train_stats = CiderD(refs, document_frequency=df, num_documents=n)
    cands = [f"a blue circle {EOS_WORD}", f"red squares {EOS_WORD}", f"blue circle {EOS_WORD}"]
    assert got == pytest.approx(train_stats.score_many([0, 1, 0], cands), abs=1e-12)
    batch_stats = CiderD(refs)  # what a reward with the batch's own statistics would give
    assert not batch_stats.score_many([0, 1, 0], cands) == pytest.approx(got, abs=1e-3)


def test_document_frequencies_are_cached_beside_the_data_and_follow_it(tmp_path, monkeypatch):
    import seesay.train.reward as rw

    path = tmp_path / "cider_df_train.json"
    df, n = load_document_frequencies(path, TRAIN_REFS, "en")
    saved = json.loads(path.read_text())
    assert saved["num_documents"] == 4 and saved["df"]["red square"] == 2.0 and saved["df"][f"circle {EOS_WORD}"] == 1
    assert df[("red", "square")] == 2.0 and df[(EOS_WORD,)] == 4.0  # images, not references

    def no_recount(*a, **k):
        raise AssertionError("recounted")

    monkeypatch.setattr(rw, "document_frequencies", no_recount)
    assert load_document_frequencies(path, TRAIN_REFS, "en") == (df, n)  # read back, not recounted
    monkeypatch.undo()
    changed = [*TRAIN_REFS, ["a red square"]]
    df2, n2 = load_document_frequencies(path, changed, "en")  # other references: recounted and rewritten
    assert n2 == 5 and df2[("red", "square")] == 3.0
    assert json.loads(path.read_text())["num_documents"] == 5


def test_bleu_weight_adds_bleu_4(tmp_path):
    from seesay.metrics import bleu_score

    plain = CaptionReward.for_training_data(tmp_path, "train", TRAIN_REFS, lang="en")
    mixed = CaptionReward.for_training_data(tmp_path, "train", TRAIN_REFS, lang="en", bleu_weight=0.5)
    cand = ["a big red square on the left"]
    gts = {0: [f"{r} {EOS_WORD}" for r in _tokenized(TRAIN_REFS)[0]]}
    _, per = bleu_score(gts, {0: f"a big red square on the left {EOS_WORD}"})
    assert mixed(TRAIN_REFS, cand, [True], [0])[0] == pytest.approx(plain(TRAIN_REFS, cand, [True], [0])[0]
                                                                    + 0.5 * per[3][0])


# ---- training ------------------------------------------------------------------------------------


def test_scst_trains_through_the_command_line(data_dir, xe_run, tmp_path):
    run = tmp_path / "scst"
    rc = cli.main(["train", "--data", str(data_dir), "--output", str(run), "--objective", "scst", "--init",
                   str(xe_run / "best"), "--encoder", "small_cnn", "--freeze-encoder", "--decoder", "soft_attention",
                   "--epochs", "2", "--batch-size", "20", "--lr", "5e-4", "--lr-scheduler", "none",
                   "--scst-samples", "4", "--device", "cpu", "--no-progress", "--seed", "1",
                   *[x for k, v in TINY_ENCODERS["small_cnn"].items() for x in ("--set", f"encoder.{k}={v}")],
                   *[x for k, v in TINY_DECODERS["soft_attention"].items() for x in ("--set", f"decoder.{k}={v}")],
                   "--set", "decoder.dropout=0.3", "--set", "train.val_max_len=12", "--set", "train.tensorboard=false"])
    assert rc == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert {"reward", "baseline", "loss_scst", "sample_length", "finished"} <= set(r["train"])
        assert r["train"]["baseline"] == pytest.approx(r["train"]["reward"], abs=1e-5)  # the mean-of-others baseline
        assert "CIDEr" in r["val"]
    df = json.loads((data_dir / "cider_df_train.json").read_text())  # the training references' statistics
    n_train = json.loads((data_dir / "manifest.json").read_text())["splits"]["train"]["images"]
    assert df["num_documents"] == n_train and df["df"][EOS_WORD] == n_train
    config = json.loads((run / "config.json").read_text())["train"]
    assert (config["objective"], config["scst_samples"], config["init"]) == ("scst", 4, str(xe_run / "best"))
    # it started from the cross-entropy weights: its first validation is far above a random model's
    xe = [json.loads(x) for x in (xe_run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["val"]["CIDEr"] > 0.5 * max(r["val"]["CIDEr"] for r in xe)


MAC = {"image_size": 32, "patch_size": 8, "vision_dim": 16, "vision_depth": 1, "vision_heads": 2,
       "vision_mlp_dim": 32, "num_tokens": 256, "text_dim": 16, "depth": 1, "segment_len": 64,
       "num_image_tokens": 4, "heads": 2, "dim_head": 8}


@pytest.mark.parametrize("family", [*sorted(set(list_decoders())), "multimodal_mac"])
def test_every_family_takes_scst_steps(data_dir, tmp_path, family):
    """Through the captioner interface only (generate + forward): every decoder, and the Titans model."""
    from seesay.train.caption_task import train_captioner

    cfg = _cfg(data_dir, tmp_path / "run", objective="scst", scst_samples=2, num_steps=2, epochs=None, batch_size=8,
               val_max_len=6, lr_scheduler="none")
    cfg.data.val_max_images = 2
    if family == "multimodal_mac":
        cfg.captioner.family, cfg.captioner.options = family, dict(MAC)
    else:
        cfg.decoder.name, cfg.decoder.options = family, dict(TINY_DECODERS[family])
    state = train_captioner(cfg)
    assert state.step == 2
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(record["train"]["loss_scst"]) and record["train"]["sample_length"] > 0


@pytest.mark.parametrize("fine_tune", [False, True], ids=["cached", "fine_tune"])
def test_scst_resume_inside_an_epoch_is_exact(data_dir, xe_run, tmp_path, fine_tune, monkeypatch):
    """An SCST run that saves every 2 steps, dies in its 2nd epoch and is resumed ends with the
    weights of a run that was never interrupted (the samples come from the RNG the loop saves)."""
    from seesay.checkpoint import load_train_state
    from seesay.train.caption_task import CaptionTask, train_captioner

    def cfg(out, resume):
        c = _cfg(data_dir, out, epochs=2, resume=resume, seed=5, save_every_steps=2, objective="scst",
                 init=str(xe_run / "best"), scst_samples=4, lr_scheduler="none")  # dropout 0.3: RNG draws too
        c.encoder.fine_tune = fine_tune
        return c

    train_captioner(cfg(tmp_path / "full", False))
    per_epoch = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])["step"]
    assert per_epoch >= 3
    original, calls = CaptionTask.training_step, {"n": 0}

    def power_cut(self, batch, model):
        calls["n"] += 1
        if calls["n"] == per_epoch + 3:  # the 3rd batch of epoch 2: last/ was saved inside the epoch or at its start
            raise RuntimeError("power cut")
        return original(self, batch, model)

    monkeypatch.setattr(CaptionTask, "training_step", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        train_captioner(cfg(tmp_path / "split", False))
    monkeypatch.undo()
    saved = load_train_state(tmp_path / "split" / "last")["loop"]
    assert saved["epoch"] == 1 and saved["step"] > per_epoch
    state = train_captioner(cfg(tmp_path / "split", True))
    assert (state.epoch, state.step) == (2, 2 * per_epoch)
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["reward"] for r in full] == [r["train"]["reward"] for r in split]


def test_init_loads_the_weights_and_refuses_another_model(data_dir, xe_run, tmp_path):
    from seesay.train.caption_task import CaptionTask, train_captioner
    from seesay.train.distributed import DistInfo

    cfg = _cfg(data_dir, tmp_path / "a", init=str(xe_run / "best"))
    task = CaptionTask(cfg, DistInfo(), tmp_path / "a")
    saved = load_file(str(xe_run / "best" / "model.safetensors"))
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, saved[k]), k

    other = _cfg(data_dir, tmp_path / "b", init=str(xe_run / "best"), objective="scst")
    other.decoder.options["decoder_dim"] = 24
    with pytest.raises(SeesayError) as e:
        train_captioner(other)
    msg = str(e.value)
    assert "\n" not in msg and "--init" in msg and "decoder.decoder_dim 16 vs 24" in msg
    with pytest.raises(SeesayError, match="not a checkpoint directory"):
        train_captioner(_cfg(data_dir, tmp_path / "c", init=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("setting, message", [
    ({"objective": "rl"}, "--objective must be xe or scst"),
    ({"objective": "scst", "scst_samples": 1}, "--scst-samples must be an integer >= 2"),
    ({"objective": "scst", "scst_baseline": "beam"}, "--scst-baseline must be mean or greedy"),
    ({"objective": "scst", "scst_bleu_weight": -1.0}, "--scst-bleu-weight must be a number >= 0"),
])
def test_bad_scst_settings_are_one_line(data_dir, tmp_path, setting, message):
    from seesay.train.caption_task import train_captioner

    with pytest.raises(SeesayError, match=message):
        train_captioner(_cfg(data_dir, tmp_path / "run", **setting))
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_scst_with_ddp_two_processes(data_dir, xe_run, tmp_path):
    """torchrun, 2 CPU processes (gloo): each samples and scores its own images; rank 0 validates."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "seesay", "train", "--data", str(data_dir), "--output", str(run), "--objective", "scst",
                           "--init", str(xe_run / "best"), "--scst-samples", "2", "--scst-baseline", "greedy",
                           "--batch-size", "8", "--epochs", "1", "--encoder", "small_cnn", "--freeze-encoder",
                           "--decoder", "soft_attention", "--workers", "0", "--device", "cpu", "--no-progress",
                           "--save-every-steps", "1",
                           *[x for k, v in TINY_ENCODERS["small_cnn"].items() for x in ("--set", f"encoder.{k}={v}")],
                           *[x for k, v in TINY_DECODERS["soft_attention"].items()
                             for x in ("--set", f"decoder.{k}={v}")],
                           "--set", "decoder.dropout=0.3", "--set", "train.val_max_len=12",
                           "--set", "train.tensorboard=false"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "greedy_reward", "loss_scst"} <= set(record["train"]) and "CIDEr" in record["val"]
    from seesay.checkpoint import load_train_state

    assert len(load_train_state(run / "last")["rng"]) == 2  # both ranks' sampling RNG saved for resume
