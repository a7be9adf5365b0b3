"""Training schedules and the loop's parts: optimizers, warm-up and decay schedules, training by
steps, interval validation and checkpoints, exact resume mid-warm-up and mid-accumulation, the
objective contract (summed loss_* keys, any metric), and one-line errors for bad settings.

Most tests drive `fit` with a tiny fake task (a two-layer regression with dropout: it trains in
milliseconds, draws random numbers, and returns two loss_* keys and a metric other than top5);
the resume and checkpoint tests train the real captioner on the tiny synthetic dataset."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import prepared_shapes, tiny_train_config
from seesay.checkpoint import load_train_state, save_tree
from seesay.config import Config, TrainConfig
from seesay.errors import SeesayError
from seesay.train.distributed import DistInfo
from seesay.train.loop import check_config, fit, total_loss
from seesay.train.optim import LRSchedule, build_optimizer, lr_multiplier


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeTask:
    """The loop's task interface over a tiny regression: 2 parameter groups (lr 0.01, 0.001),
    6 batches of 4 rows per epoch in an order fixed by the epoch, dropout, and an objective that
    returns loss_mse + loss_l1 and a mean-absolute-error metric."""

    def __init__(self, scores=None, n_rows: int = 24, batch: int = 4):
        torch.manual_seed(0)
        self.module = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n_rows, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
        self.batch = batch
        self.scores = iter(scores) if scores is not None else None
        self.steps = 0

    def param_groups(self):
        return [{"params": list(self.module[0].parameters()), "lr": 0.01, "name": "first"},
                {"params": list(self.module[2].parameters()), "lr": 0.001, "name": "second"}]

    def train_batches(self, epoch, start=0):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))
        batches = [order[i: i + self.batch] for i in range(0, len(order), self.batch)]
        return batches[start:]

    def training_step(self, batch, model):
        self.steps += 1
        err = model(self.x[batch]).squeeze(-1) - self.y[batch]
        return {"loss_mse": (err ** 2).mean(), "loss_l1": 0.1 * err.abs().mean(), "mae": err.abs().mean().detach(),
                "n": len(batch)}

    def validate(self):
        if self.scores is not None:
            return {"CIDEr": next(self.scores)}
        with torch.no_grad():
            self.module.eval()
            score = -float(((self.module(self.x).squeeze(-1) - self.y) ** 2).mean())
            self.module.train()
        return {"CIDEr": score}

    def save(self, path, train_state):
        path = Path(path)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, str(path / "model.safetensors"))
        if train_state is not None:
            save_tree(path / "train_state", train_state)

    def load_weights(self, path):
        self.module.load_state_dict(load_file(str(Path(path) / "model.safetensors")))


def _train_cfg(out, **over) -> TrainConfig:
    cfg = TrainConfig(output=str(out), batch_size=4, progress=False, tensorboard=False, device="cpu")
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _fit(tmp_path, name, task=None, **over):
    task = task or FakeTask()
    state = fit(task, _train_cfg(tmp_path / name, **over), DistInfo(), tmp_path / name, {})
    return task, state


def _records(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    a, b = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- schedules and optimizers -------------------------------------------------------------------


def test_schedule_functions():
    for kind in ("none", "plateau", "linear", "cosine"):
        assert [lr_multiplier(kind, k, warmup=4, total=20) for k in range(4)] == [0.0, 0.25, 0.5, 0.75]
        assert lr_multiplier(kind, 4, warmup=4, total=20) == 1.0
    assert lr_multiplier("none", 1000, warmup=4) == lr_multiplier("plateau", 1000) == 1.0
    assert lr_multiplier("linear", 12, warmup=4, total=20) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 12, warmup=4, total=20) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 8, warmup=4, total=20) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    for kind in ("linear", "cosine"):
        assert lr_multiplier(kind, 20, warmup=4, total=20) == pytest.approx(0.0, abs=1e-12)
        assert lr_multiplier(kind, 25, warmup=4, total=20) == pytest.approx(0.0, abs=1e-12)

    # each group relative to its own base rate; the plateau factor is state, only for "plateau"
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-2}]
    opt = build_optimizer("adam", groups, 0.0)
    sched = LRSchedule(opt, "plateau", warmup=4)
    sched.apply(1)
    assert sched.lrs() == pytest.approx([2.5e-4, 2.5e-3])
    assert sched.plateau(0.5, 8) and sched.lrs() == pytest.approx([5e-4, 5e-3])
    other = LRSchedule(opt, "cosine", warmup=0, total=10)
    assert not other.plateau(0.5, 0) and other.factor == 1.0
    restored = LRSchedule(build_optimizer("adam", [dict(g, lr=b) for g, b in zip(groups, (1e-3, 1e-2))], 0.0),
                          "plateau", warmup=4)
    restored.load_state_dict(sched.state_dict())
    restored.apply(8)
    assert restored.lrs() == pytest.approx(sched.lrs())


def test_adamw_decay_is_decoupled():
    """A step with a zero gradient: AdamW shrinks the weights by lr * wd * w; Adam's L2 term goes
    through the adaptive step instead (about lr * sign(w))."""
    lr, wd = 0.1, 0.5
    w0 = torch.tensor([2.0, -4.0, 0.5])
    after = {}
    for name in ("adam", "adamw"):
        p = torch.nn.Parameter(w0.clone())
        opt = build_optimizer(name, [{"params": [p], "lr": lr}], wd)
        p.grad = torch.zeros_like(p)
        opt.step()
        after[name] = p.detach().clone()
    assert torch.allclose(after["adamw"], w0 * (1 - lr * wd))
    assert torch.allclose(after["adam"], w0 - lr * torch.sign(w0), atol=1e-4)
    assert not torch.allclose(after["adam"], after["adamw"])
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("sgd", [{"params": [torch.nn.Parameter(w0.clone())], "lr": lr}], 0.0)


def test_adamw_through_fit_differs_from_adam(tmp_path):
    _fit(tmp_path, "adam", num_steps=3, weight_decay=0.1)
    _fit(tmp_path, "adamw", num_steps=3, weight_decay=0.1, optimizer="adamw")
    a = load_file(str(tmp_path / "adam" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "adamw" / "last" / "model.safetensors"))
    assert not torch.equal(a["0.weight"], b["0.weight"])
    saved = load_train_state(tmp_path / "adamw" / "last")["optimizer"]
    assert all(g["weight_decay"] == 0.1 for g in saved["param_groups"])


def test_warmup_raises_each_group_rate_through_fit(tmp_path):
    _, state = _fit(tmp_path, "run", warmup_steps=5, num_steps=4, val_interval=1)
    recs = _records(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert r["lrs"] == pytest.approx([0.01 * r["step"] / 5, 0.001 * r["step"] / 5])
        assert r["lr"] == r["lrs"][0]
    assert [r["epoch"] for r in recs] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6], abs=1e-4)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_linear_and_cosine_reach_zero_at_the_end(tmp_path, kind):
    """2 epochs x 6 batches / grad_accum 2 = 6 steps: the total comes from the epoch length."""
    _, state = _fit(tmp_path, "run", lr_scheduler=kind, warmup_steps=2, epochs=2, grad_accum=2, val_interval=1)
    assert state.step == 6
    recs = _records(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        m = lr_multiplier(kind, r["step"], warmup=2, total=6)
        assert r["lrs"] == pytest.approx([0.01 * m, 0.001 * m])
    lrs = [r["lr"] for r in recs]
    assert lrs[1] == pytest.approx(0.01) and lrs[2] < lrs[1] and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    # by steps, with a per-epoch cap: the total is the first limit reached
    _, state = _fit(tmp_path, "steps", lr_scheduler=kind, num_steps=5, max_steps_per_epoch=2)
    assert state.step == 5 and state.epoch == 2 and state.batches_done == 1
    assert _records(tmp_path / "steps")[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_plateau_decays_and_stops_on_validations(tmp_path):
    """Validations every 2 steps with a flat score: decay after every 2 bad validations, stop
    after 3 — inside epoch 2, where RUN_DIR/last is written."""
    task = FakeTask(scores=[0.5] * 10)
    _, state = _fit(tmp_path, "run", task, val_interval=2, lr_decay_patience=2, lr_decay=0.5, patience=3)
    recs = _records(tmp_path / "run")
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    assert [r["lr"] for r in recs] == pytest.approx([0.01, 0.01, 0.005, 0.005])
    assert state.stopped_early and state.step == 8 and (state.epoch, state.batches_done) == (1, 2)
    saved = load_train_state(tmp_path / "run" / "last")
    assert saved["loop"]["bad_validations"] == 3 and saved["schedule"]["factor"] == 0.5
    assert state.best_step == 2


# -- steps, intervals, checkpoints --------------------------------------------------------------


def test_num_steps_stops_inside_an_epoch_and_resumes_exactly(tmp_path):
    _, full = _fit(tmp_path, "full", num_steps=9, warmup_steps=6)
    assert (full.step, full.epoch, full.batches_done) == (9, 1, 3)
    assert load_train_state(tmp_path / "full" / "last")["loop"]["step"] == 9
    recs = _records(tmp_path / "full")
    assert [(r["epoch"], r["step"]) for r in recs] == [(1, 6), (1.5, 9)]  # the final validation inside epoch 2
    assert (tmp_path / "full" / "best" / "model.safetensors").is_file()

    _, part = _fit(tmp_path, "split", num_steps=4, warmup_steps=6)
    assert (part.step, part.epoch, part.batches_done) == (4, 0, 4)
    _, rest = _fit(tmp_path, "split", num_steps=9, warmup_steps=6, resume=True)
    assert (rest.step, rest.epoch, rest.batches_done) == (9, 1, 3)
    _same_weights(tmp_path / "full" / "last", tmp_path / "split" / "last")
    # both limits: the first one reached wins
    _, both = _fit(tmp_path, "both", num_steps=100, epochs=2)
    assert (both.step, both.epoch) == (12, 2)


def test_val_interval_validates_at_those_steps_and_at_the_end(tmp_path):
    task, state = _fit(tmp_path, "run", epochs=2, val_interval=5)
    recs = _records(tmp_path / "run")
    assert [r["step"] for r in recs] == [5, 10, 12]  # 12: the end, not a multiple of 5
    assert [r["epoch"] for r in recs] == pytest.approx([5 / 6, 1 + 4 / 6, 2], abs=1e-4)
    for r in recs:
        assert {"epoch", "step", "train_loss", "lr", "lrs", "val", "time_s", "train_time_s", "captions_per_s",
                "train"} <= set(r)
    assert state.step == 12 and state.epoch == 2
    # the same weights as validating every epoch: validation never touches training's random numbers
    _fit(tmp_path, "per_epoch", epochs=2)
    assert [r["step"] for r in _records(tmp_path / "per_epoch")] == [6, 12]
    _same_weights(tmp_path / "run" / "last", tmp_path / "per_epoch" / "last")


def test_objective_losses_are_summed_and_metrics_logged(tmp_path):
    task, _ = _fit(tmp_path, "run", epochs=1)
    (rec,) = _records(tmp_path / "run")
    assert set(rec["train"]) == {"loss_mse", "loss_l1", "mae"} and "train_top5" not in rec
    assert rec["train_loss"] == pytest.approx(rec["train"]["loss_mse"] + rec["train"]["loss_l1"])
    assert rec["train"]["loss_l1"] == pytest.approx(0.1 * rec["train"]["mae"])
    a, b = torch.tensor(2.0), torch.tensor(3.0)
    assert float(total_loss({"loss_a": a, "loss_b": b, "acc": 0.5, "n": 1})) == 5.0
    with pytest.raises(KeyError, match="loss"):
        total_loss({"acc": a, "n": 1})

    class Cancelling(FakeTask):
        """loss_up and loss_down cancel: only their sum gives a zero gradient (no step moves)."""

        def training_step(self, batch, model):
            out = model(self.x[batch]).sum()
            return {"loss_up": out, "loss_down": -out, "n": len(batch)}

    task = Cancelling()
    before = {k: v.clone() for k, v in task.module.state_dict().items()}
    _fit(tmp_path, "cancel", task, num_steps=3, grad_clip=None)
    for k, v in task.module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_top5_is_still_written_for_the_curves(tmp_path):
    class WithTop5(FakeTask):
        def training_step(self, batch, model):
            out = super().training_step(batch, model)
            return {"loss": out["loss_mse"], "top5": 0.25, "n": out["n"]}

    _fit(tmp_path, "run", WithTop5(), epochs=1)
    (rec,) = _records(tmp_path / "run")
    assert rec["train_top5"] == pytest.approx(0.25) and rec["train"]["top5"] == pytest.approx(0.25)
    assert rec["train_loss"] == pytest.approx(rec["train"]["loss"])


def test_resume_mid_warmup_and_mid_accumulation_fake(tmp_path):
    """grad_accum 3 (2 steps per epoch), warm-up over 6 steps, saved every step, crash on the 2nd
    micro-batch of step 4 (last/ saved at step 3, inside epoch 2)."""
    opts = dict(epochs=2, grad_accum=3, warmup_steps=6, save_every_steps=1, val_interval=3)
    _fit(tmp_path, "full", **opts)

    class Crash(FakeTask):
        def training_step(self, batch, model):
            if self.steps == 10:
                raise RuntimeError("power cut")
            return super().training_step(batch, model)

    with pytest.raises(RuntimeError, match="power cut"):
        _fit(tmp_path, "split", Crash(), **opts)
    saved = load_train_state(tmp_path / "split" / "last")
    assert (saved["loop"]["epoch"], saved["loop"]["step"], saved["loop"]["batches_done"]) == (1, 3, 3)
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == pytest.approx([0.01 * 3 / 6, 0.001 * 3 / 6])
    _, state = _fit(tmp_path, "split", resume=True, **opts)
    assert (state.step, state.epoch) == (4, 2)
    _same_weights(tmp_path / "full" / "last", tmp_path / "split" / "last")
    full, split = _records(tmp_path / "full"), _records(tmp_path / "split")
    assert [r["train_loss"] for r in full] == [r["train_loss"] for r in split]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, flag", [
    ({"optimizer": "sgd"}, "--optimizer"),
    ({"lr_scheduler": "step"}, "--lr-scheduler"),
    ({"warmup_steps": -1}, "--warmup-steps"),
    ({"num_steps": 0}, "--num-steps"),
    ({"save_interval": 0}, "--save-interval"),
    ({"val_interval": 0}, "--val-interval"),
    ({"grad_accum": 0}, "--grad-accum"),
    ({"epochs": 0}, "--epochs"),
    ({"lr_decay_patience": 0}, "--lr-decay-patience"),
    ({"num_steps": "ten"}, "--num-steps"),
    ({"select_metric": "BLEU"}, "--select-metric"),
])
def test_bad_settings_are_one_line_errors(tmp_path, bad, flag):
    with pytest.raises(SeesayError) as e:
        check_config(_train_cfg(tmp_path, **bad))
    assert flag in str(e.value) and "\n" not in str(e.value)
    task = FakeTask()
    with pytest.raises(SeesayError):
        _fit(tmp_path, "run", task, **bad)
    assert task.steps == 0  # checked up front, before any training


def test_select_metric_follows_the_task_metric_names(tmp_path):
    class Accuracy(FakeTask):
        def metric_names(self):
            return ["accuracy"]

        def validate(self):
            return {"accuracy": 0.5}

    with pytest.raises(SeesayError, match="select-metric.*accuracy"):
        _fit(tmp_path, "a", Accuracy(), epochs=1)
    _, state = _fit(tmp_path, "b", Accuracy(), epochs=1, select_metric="accuracy")
    assert state.best_score == 0.5


def test_command_line_flags(tmp_path, capsys):
    from seesay.cli import build_parser, main
    from seesay.commands.train import build_config

    args = build_parser().parse_args(["train", "--accumulation-steps", "3", "--optimizer", "adamw", "--weight-decay",
                                      "0.01", "--lr-scheduler", "cosine", "--warmup-steps", "10", "--num-steps", "50",
                                      "--val-interval", "5", "--save-interval", "25"])
    t = build_config(args).train
    assert (t.grad_accum, t.optimizer, t.weight_decay, t.lr_scheduler) == (3, "adamw", 0.01, "cosine")
    assert (t.warmup_steps, t.num_steps, t.val_interval, t.save_interval, t.epochs) == (10, 50, 5, 25, None)
    assert Config().train.epochs is None and Config().train.lr_scheduler == "plateau"
    rc = main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "r"), "--device", "cpu",
               "--warmup-steps", "-2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--warmup-steps" in err and len(err.splitlines()) == 1


# -- the real captioner --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_shapes(tmp_path_factory.mktemp("shapes"), num_images=24, seed=0, val_fraction=0.25)


def _cfg(data_dir, out, **train) -> Config:
    # a narrower CNN, dropout on, batch 10 (several steps per epoch), the default epochs unless told
    return tiny_train_config(data_dir, out, encoder={"width": 8}, decoder={"dropout": 0.3},
                             **{"batch_size": 10, "epochs": None, "val_max_len": 8, **train})


def test_resume_mid_warmup_and_mid_accumulation_is_exact(data_dir, tmp_path, monkeypatch):
    """90 captions / 10 = 9 batches = 3 steps per epoch with grad_accum 3; warm-up over 5 steps.
    A run that saves every step and dies on the 2nd micro-batch of step 3 (last/ at step 2),
    resumed, ends with the weights and losses of an uninterrupted run."""
    from seesay.train.caption_task import CaptionTask, train_captioner

    def cfg(out, resume):
        return _cfg(data_dir, out, epochs=2, grad_accum=3, warmup_steps=5, save_every_steps=1, seed=4,
                    resume=resume, select_metric="Bleu_4")

    train_captioner(cfg(tmp_path / "full", False))
    full = _records(tmp_path / "full")
    assert [r["step"] for r in full] == [3, 6]
    assert full[0]["lr"] == pytest.approx(4e-4 * 3 / 5) and full[1]["lr"] == pytest.approx(4e-4)

    original, calls = CaptionTask.training_step, {"n": 0}

    def power_cut(self, batch, model):
        calls["n"] += 1
        if calls["n"] == 8:  # the 2nd micro-batch of step 3
            raise RuntimeError("power cut")
        return original(self, batch, model)

    monkeypatch.setattr(CaptionTask, "training_step", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        train_captioner(cfg(tmp_path / "split", False))
    monkeypatch.undo()
    saved = load_train_state(tmp_path / "split" / "last")
    assert (saved["loop"]["epoch"], saved["loop"]["batches_done"], saved["loop"]["step"]) == (0, 6, 2)
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(4e-4 * 2 / 5)  # mid warm-up
    state = train_captioner(cfg(tmp_path / "split", True))
    assert (state.epoch, state.step) == (2, 6)
    _same_weights(tmp_path / "full" / "last", tmp_path / "split" / "last")
    assert [r["train_loss"] for r in full] == [r["train_loss"] for r in _records(tmp_path / "split")]


def test_save_interval_writes_loadable_step_checkpoints(data_dir, tmp_path):
    from seesay.checkpoint import load_checkpoint
    from seesay.train.caption_task import train_captioner

    run = tmp_path / "run"
    state = train_captioner(_cfg(data_dir, run, num_steps=4, save_interval=2, select_metric="Bleu_4"))
    assert state.step == 4 and state.batches_done == 4  # stopped inside epoch 1 of 9 batches
    assert sorted(p.name for p in run.glob("step-*")) == ["step-2", "step-4"]
    for name in ("step-2", "step-4"):
        ck = load_checkpoint(run / name)
        assert ck.model is not None and not (run / name / "train_state").exists()
    _same_weights(run / "step-4", run / "last")
    a, b = load_file(str(run / "step-2" / "model.safetensors")), load_file(str(run / "step-4" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_optimizer_is_fused_where_torch_supports_it_and_updates_like_the_loop():
    """The fused Adam(W) (the default on CPU/CUDA) takes the same steps as the per-parameter loop."""
    torch.manual_seed(0)
    w0 = [torch.randn(7, 3), torch.randn(3)]
    grads = [[torch.randn_like(w) for w in w0] for _ in range(4)]
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        fused = [torch.nn.Parameter(w.clone()) for w in w0]
        loop = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = build_optimizer(name, [{"params": fused, "lr": 0.01}], 0.1)
        assert opt.defaults["fused"] is True
        ref = cls([{"params": loop, "lr": 0.01}], weight_decay=0.1, foreach=False)
        for g in grads:
            for p, q, gi in zip(fused, loop, g):
                p.grad, q.grad = gi.clone(), gi.clone()
            opt.step()
            ref.step()
        for p, q in zip(fused, loop):
            assert torch.allclose(p, q, atol=1e-6)
            assert not torch.equal(p, torch.zeros_like(p))
        # the state dict is the loop's: a checkpoint written by one resumes in the other
        ref.load_state_dict(opt.state_dict())
        assert torch.equal(ref.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # a device torch has no fused kernel for (here the meta device) keeps the per-parameter loop
    assert build_optimizer("adam", [{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))], "lr": 1.0}],
                           0.0).defaults["fused"] is None
