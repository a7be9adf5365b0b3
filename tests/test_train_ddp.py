"""DDP: 2 CPU processes (gloo, launched by torchrun) with half the batch each end with the
same weights as 1 process with the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import prepared_shapes
from seesay.checkpoint import load_train_state

# Adam turns float-rounding differences of near-zero gradients into full-size steps, so the
# comparison runs one short epoch at a small learning rate (differences grow with lr x steps).
ARGS = ["--encoder", "small_cnn", "--freeze-encoder", "--decoder", "soft_attention", "--epochs", "1", "--workers", "0",
        "--lr", "1e-4",
        "--device", "cpu", "--no-progress", "--seed", "5",
        "--set", "encoder.width=8", "--set", "encoder.encoded_size=4", "--set", "encoder.image_size=32",
        # no dropout: the two runs draw different random numbers; the frozen CNN's BatchNorm stays in eval mode
        "--set", "decoder.embed_dim=16", "--set", "decoder.attention_dim=16", "--set", "decoder.decoder_dim=16",
        "--set", "decoder.dropout=0.0", "--set", "train.val_max_len=8", "--set", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_shapes(tmp_path_factory.mktemp("shapes_ddp"), num_images=24, seed=1, val_fraction=0.25)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@pytest.mark.slow
def test_ddp_two_processes_match_one(data_dir, tmp_path):
    import json

    manifest = json.loads((data_dir / "manifest.json").read_text())
    n_captions = manifest["splits"]["train"]["captions"]
    batch = 10
    assert n_captions % (2 * batch // 2) == 0  # no sampler padding: both runs see the same captions
    one = subprocess.run([sys.executable, "-m", "seesay", "train", "--data", str(data_dir), "--output",
                          str(tmp_path / "one"), "--batch-size", str(batch), *ARGS],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "seesay", "train", "--data", str(data_dir), "--output", str(tmp_path / "two"),
                          "--batch-size", str(batch // 2), "--save-every-steps", "2", *ARGS],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "inside epoch 1" in two.stderr  # checkpoints inside the epoch (all ranks gather) did not change training
    assert len(load_train_state(tmp_path / "two" / "last")["rng"]) == 2
    a = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print("max |one - two| =", worst)
    assert worst < 1e-5
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    assert m1[-1]["train_loss"] == pytest.approx(m2[-1]["train_loss"], rel=1e-4)


TITANS = ["--decoder", "titans_mac", "--set", "decoder.dim=16", "--set", "decoder.depth=1", "--set", "decoder.heads=2",
          "--set", "decoder.dim_head=8", "--set", "decoder.num_image_tokens=2", "--set", "decoder.max_len=12",
          "--set", "decoder.num_persist_mem_tokens=1", "--set", "decoder.num_longterm_mem_tokens=1"]


@pytest.mark.slow
def test_ddp_titans_mac_two_processes(data_dir, tmp_path):
    """titans_mac leaves some neural-memory parameters without a gradient: DDP needs
    find_unused_parameters (chosen automatically), else the 2nd step fails. Text-only rows are
    mixed in too (both processes must run the same number of steps)."""
    import math

    (tmp_path / "extra.txt").write_text("a red square\na blue circle\n", encoding="utf-8")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "seesay", "train", "--data", str(data_dir), "--output", str(tmp_path / "two"),
                          "--batch-size", "5", *_strip_decoder(ARGS), *TITANS,
                          "--set", f"data.text_data_path={tmp_path / 'extra.txt'}"], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "find_unused_parameters=True" in two.stderr
    weights = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    assert all(math.isfinite(v.float().abs().sum().item()) for v in weights.values())
    steps = [json.loads(x)["step"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    n_captions = json.loads((data_dir / "manifest.json").read_text())["splits"]["train"]["captions"]
    text_batches = math.ceil(math.ceil(round(0.25 * n_captions) / 2) / 5)  # data.text_ratio 0.25, per process
    assert steps == [math.ceil(n_captions / 10) + text_batches]  # every step ran (2 processes x 5 captions)


def _strip_decoder(args: list[str]) -> list[str]:
    """ARGS without the soft_attention decoder and its --set decoder.* options."""
    out, k = [], 0
    while k < len(args):
        if args[k] == "--decoder" or (args[k] == "--set" and args[k + 1].startswith("decoder.")):
            k += 2
            continue
        out.append(args[k])
        k += 1
    return out
