"""Fault injection: nothing hangs and nothing is lost.

- a checkpoint replacement killed at every one of its steps (and by real SIGKILLs at random
  moments) always leaves a loadable checkpoint, which `--resume` finds; it never silently
  restarts from scratch when a checkpoint exists in some form;
- an error in the middle of an epoch with DataLoader workers (a checkpoint write that fails)
  ends the run with a non-zero status within seconds instead of waiting for the workers forever.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import prepared_shapes
from seesay import checkpoint as ck_mod
from seesay.checkpoint import load_checkpoint, load_train_state, recover_checkpoint, save_checkpoint
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.errors import SeesayError
from seesay.model import build_model

torch.set_num_threads(1)

SPEC = {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 2, "image_size": 32},
        "decoder": {"name": "show_tell", "vocab_size": 8, "embed_dim": 8, "decoder_dim": 8}}
VOCAB = Vocab([*SPECIALS, "a", "b", "c", "d"])


def _model(seed: int):
    torch.manual_seed(seed)
    return build_model(SPEC, tokenizer=VOCAB, image_size=32)


def _marker(path: Path) -> int:
    return load_train_state(path)["loop"]["version"]


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `except Exception` handlers."""


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_a_save_killed_at_every_step_of_the_replacement_leaves_a_checkpoint(tmp_path, monkeypatch, kill_at):
    last = tmp_path / "last"
    save_checkpoint(last, model=_model(0), train_state={"loop": {"version": 1}})
    tmp = _write_new_tmp(last, tmp_path)
    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def step(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise _Killed
            return fn(*args, **kwargs)
        return wrapped

    # the replacement's steps: 3 renames, then removing the old copy
    monkeypatch.setattr(ck_mod.os, "replace", step(real_replace))
    monkeypatch.setattr(ck_mod.shutil, "rmtree", step(real_rmtree))
    with pytest.raises(_Killed):
        ck_mod._atomic_replace(tmp, last)
    monkeypatch.undo()
    recovered = recover_checkpoint(last)
    assert recovered == last
    version = _marker(last)
    # killed before the first rename the new copy is only a temporary (maybe half-written) one: the
    # old checkpoint stays; from then on the new copy is complete and recovery keeps it
    assert version == (1 if kill_at == 1 else 2)
    assert load_checkpoint(last).model is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no leftovers


def _write_new_tmp(last: Path, root: Path) -> Path:
    """A complete new checkpoint in the temporary name save_checkpoint uses."""
    staging = root / "staging"
    save_checkpoint(staging / "x", model=_model(1), train_state={"loop": {"version": 2}})
    tmp = last.parent / f".{last.name}.tmp-deadbeef"
    os.replace(staging / "x", tmp)
    shutil.rmtree(staging)
    return tmp


def test_a_kill_while_writing_keeps_the_old_checkpoint(tmp_path):
    last = tmp_path / "last"
    save_checkpoint(last, model=_model(0), train_state={"loop": {"version": 1}})
    half = tmp_path / ".last.tmp-0badc0de"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)  # killed while writing: incomplete
    assert recover_checkpoint(last) == last
    assert _marker(last) == 1 and not half.exists()


def test_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "best", model=_model(0))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.rglob("*")}
    assert modes["model.safetensors"] == 0o644 and modes["config.json"] == 0o644 and modes["tokenizer"] == 0o755


_SAVER = r"""
import sys, torch
from seesay.checkpoint import save_checkpoint
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.model import build_model
torch.set_num_threads(1)
spec = {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 2, "image_size": 32},
        "decoder": {"name": "show_tell", "vocab_size": 8, "embed_dim": 8, "decoder_dim": 8}}
model = build_model(spec, tokenizer=Vocab([*SPECIALS, "a", "b", "c", "d"]), image_size=32)
i = 0
print("ready", flush=True)
while True:
    i += 1
    save_checkpoint(sys.argv[1], model=model, train_state={"loop": {"version": i}})
"""


def test_sigkill_at_random_moments_never_loses_the_checkpoint(tmp_path):
    """A process saving RUN_DIR/last in a loop, killed with SIGKILL at 8 moments: each time the
    checkpoint loads after recovery and no leftovers remain."""
    last = tmp_path / "last"
    delays = [0.05, 0.11, 0.17, 0.23, 0.29, 0.37, 0.43, 0.53]
    for delay in delays:
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(last)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        if not last.exists():  # the first save must have happened for there to be something to keep
            deadline = time.monotonic() + 60
            while not last.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert recover_checkpoint(last) == last
        assert _marker(last) >= 1
        load_checkpoint(last)
        assert [p.name for p in tmp_path.iterdir()] == ["last"]


# ---- training: resume finds the checkpoint in any form; errors end the run ---------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_shapes(tmp_path_factory.mktemp("faults"), num_images=40, seed=0, val_fraction=0.2)


SMALL = ["--set", "encoder.width=8", "--set", "encoder.encoded_size=2", "--set", "encoder.image_size=32",
         "--set", "decoder.embed_dim=8", "--set", "decoder.attention_dim=8", "--set", "decoder.decoder_dim=8",
         "--set", "train.tensorboard=false", "--set", "train.val_max_len=8", "--device", "cpu", "--no-progress"]


def _train(data_dir: Path, out: Path, *extra: str) -> int:
    from seesay import cli

    return cli.main(["train", "--data", str(data_dir), "--output", str(out), "--batch-size", "20", "--workers", "0",
                     *SMALL, *extra])


def test_resume_completes_an_interrupted_save_and_never_restarts_silently(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data_dir, out, "--epochs", "1") == 0
    # a kill between the renames of the last save: RUN_DIR/last is gone, its copies are aside
    os.replace(out / "last", out / ".last.new-12345678")
    assert _train(data_dir, out, "--epochs", "2", "--resume") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # resumed after epoch 1, not from scratch
    assert not list(out.glob(".last.*"))
    # only best/ left: refuse to start over it
    shutil.rmtree(out / "last")
    capsys.readouterr()
    assert _train(data_dir, out, "--epochs", "3", "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to start from scratch" in err[0] and "best" in err[0]


def test_an_error_mid_epoch_with_workers_ends_the_run(data_dir, tmp_path):
    """A checkpoint write fails inside an epoch (file size limit, as a full disk would) while two
    DataLoader workers run: the process exits non-zero within seconds, workers included."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "seesay", "train", "--data", str(data_dir), "--output", str(out),
           "--batch-size", "10", "--workers", "2", "--epochs", "2", "--save-every-steps", "2", "--fine-tune-encoder",
           *SMALL, "--set", "decoder.decoder_dim=128"]  # ~0.3 MB of weights
    # 64 KiB: the data and logs fit, a checkpoint's model.safetensors does not
    script = f"ulimit -f 64; exec {' '.join(_quote(c) for c in cmd)}"
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("seesay train hung after an error mid-epoch with DataLoader workers")
    assert proc.returncode not in (0, None)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"seesay train: error: {out / 'last'}: cannot write the checkpoint") and "File too large" in last
    assert proc.returncode == 2
    # no worker outlived it
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == []


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def test_recover_checkpoint_without_anything_is_none(tmp_path):
    assert recover_checkpoint(tmp_path / "last") is None
    with pytest.raises(SeesayError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "last")


def test_an_os_error_anywhere_is_one_line(tmp_path, monkeypatch, capsys):
    """A disk-full (or any I/O) error that reaches the command line is one line with the file and the
    reason, exit 2, never a traceback."""
    import errno

    from seesay import cli
    from seesay.data import synth

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "raw" / "images" / "000001.png"))

    monkeypatch.setattr(synth, "make_shapes", full)
    rc = cli.main(["synth", "shapes", "--output", str(tmp_path / "raw"), "--num-images", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [f"seesay synth: error: {tmp_path / 'raw' / 'images' / '000001.png'}: No space left on device"]
