"""The speed benchmarks run end to end at tiny sizes and print the JSON their docs describe.

They are timed only by hand (docs/performance.md); these runs keep them from rotting as the
code they measure changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_compile_check_times_eager_and_loop_scores():
    out = _run("compile_check.py", "--rows", "2", "--regions", "3", "--width", "4", "--steps", "2", "--repeats", "1",
               "--threads", "1", "--no-compile")
    res = out["results"]
    assert res["eager"]["ms_per_batch"] > 0 and res["loop_scores"]["ms_per_batch"] > 0
    assert res["eager"]["vs_eager"] == 1.0
    assert "--no-compile" in res["compiled"]["error"]


def test_loop_products_times_autograd_and_loop_linear():
    out = _run("loop_products.py", "--hidden", "64", "--enc", "128", "--attention", "32", "--rows", "8", "8", "4",
               "--repeats", "1", "--threads", "1")
    res = out["results"]
    # forward, input gradient and weight gradient of W_ih's context part, W_hh, f_beta, the query projection
    assert out["steps"] == 3 and out["macs_per_batch"] == 3 * 20 * (256 * 128 + 256 * 64 + 128 * 64 + 32 * 64)
    assert all(res[k]["ms_per_batch"] > 0 and res[k]["gmacs"] > 0 for k in ("autograd", "loop_linear"))


def test_train_throughput_reports_speed_macs_and_grouping():
    out = _run("train_throughput.py", "--presets", "demo", "--decoders", "soft_attention", "--modes", "cached",
               "cached_grouped", "--steps", "1", "--warmup", "1", "--no-roofline", "--threads", "1")
    rows = {r["mode"]: r for r in out["results"]}
    assert set(rows) == {"cached", "cached_grouped"}
    for r in rows.values():
        assert r["decoder"] == "soft_attention" and r["captions_per_s"] > 0 and r["mmacs_per_caption"] > 0
    # grouped batches count the grid's attention projection once per image: fewer multiply-adds per caption
    assert rows["cached_grouped"]["mmacs_per_caption"] < rows["cached"]["mmacs_per_caption"]


def test_train_throughput_takes_a_batch_size_and_profiles_steps():
    out = _run("train_throughput.py", "--presets", "demo", "--decoders", "show_tell", "soft_attention", "--modes",
               "cached", "--steps", "1", "--warmup", "0", "--no-roofline", "--threads", "1", "--batch", "6",
               "--profile", "--device", "cpu")
    rows = {r["decoder"]: r for r in out["results"]}
    for r in rows.values():
        assert r["batch_captions"] == 6 and r["per_step"]["wall_ms"] > 0
        assert 0 < r["per_step"]["host_ops_not_views"] < r["per_step"]["host_ops"]
        assert "gpu_busy_ms" not in r["per_step"]  # a CPU run has no GPU figures
    # soft attention's step does more than show_tell's: attention at every decoding step
    assert rows["soft_attention"]["per_step"]["host_ops"] > rows["show_tell"]["per_step"]["host_ops"]


def test_train_throughput_refuses_an_empty_batch():
    proc = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--batch", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip() == "--batch 0: a step needs at least one caption"


@pytest.mark.slow
def test_train_throughput_compiles_the_decoder_on_request():
    out = _run("train_throughput.py", "--presets", "demo", "--decoders", "show_tell", "--modes", "cached", "--steps",
               "1", "--warmup", "0", "--no-roofline", "--threads", "1", "--batch", "4", "--compile", "--device", "cpu")
    (r,) = out["results"]
    assert r["compiled"] is True and r["first_step_s"] > 0 and r["captions_per_s"] > 0
    assert r["mmacs_per_caption"] > 0  # counted on the eager decoder, before the first step compiles it


def test_loss_layout_times_padded_and_packed_logits():
    out = _run("loss_layout.py", "--reps", "2", "--batch", "4", "--vocab", "50", "--threads", "1")
    assert out["reps"] == 2 and out["batch"] == 4 and out["vocab"] == 50
    for route in ("padded", "packed"):
        assert 0 < out["ms"][route]["min"] <= out["ms"][route]["median"] <= out["ms"][route]["max"]
    assert out["padded_over_packed"] > 0
    # 4 captions of at most 16 words (T - 1 <= 17 positions) over 50 words
    assert 0 < out["padded_logits_mib_median"] <= 4 * 17 * 50 * 4 / 2**20 + 0.001  # (rounded to 3 places)


# A stand-in for a checkout of the tutorial (its code is the user's, never in this repository):
# the names tutorial_compare.py imports, written the way its files use today's-broken APIs
# (scipy.misc, a float index from `/`, two values from pack_padded_sequence), small and fast.
FAKE_TUTORIAL = {
    "models.py": """
import torch
from torch import nn

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder(nn.Module):
    def fine_tune(self, fine_tune=True):
        pass


class DecoderWithAttention(nn.Module):
    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 8)
        self.decode_step = nn.LSTMCell(8, 8)
        self.fc = nn.Linear(8, vocab_size)
        self.vocab_size = vocab_size

    def forward(self, encoder_out, encoded_captions, caption_lengths):
        caption_lengths, sort_ind = caption_lengths.squeeze(1).sort(dim=0, descending=True)
        encoded_captions = encoded_captions[sort_ind]
        decode_lengths = (caption_lengths - 1).tolist()
        emb = self.embedding(encoded_captions)
        h = c = encoder_out.new_zeros(emb.shape[0], 8)
        preds = []
        for t in range(max(decode_lengths)):
            h, c = self.decode_step(emb[:, t], (h, c))
            preds.append(self.fc(h))
        return torch.stack(preds, 1), encoded_captions, decode_lengths, None, sort_ind
""",
    "train.py": """
from torch.nn.utils.rnn import pack_padded_sequence

print_freq = 100


def train(train_loader, encoder, decoder, criterion, encoder_optimizer, decoder_optimizer, epoch):
    for i, (imgs, caps, caplens) in enumerate(train_loader):
        scores, caps_sorted, decode_lengths, alphas, sort_ind = decoder(encoder(imgs), caps, caplens)
        scores, _ = pack_padded_sequence(scores, decode_lengths, batch_first=True)
        targets, _ = pack_padded_sequence(caps_sorted[:, 1:], decode_lengths, batch_first=True)
        loss = criterion(scores, targets)
        decoder_optimizer.zero_grad()
        loss.backward()
        decoder_optimizer.step()
        if i % print_freq == 0:
            print("Epoch", epoch, "batch", i, "loss", float(loss))
""",
    "caption.py": """
import torch
from scipy.misc import imread, imresize


def caption_image_beam_search(encoder, decoder, image_path, word_map, beam_size=3):
    img = imresize(imread(image_path), (256, 256))
    encoder(img)
    k, vocab_size = beam_size, len(word_map)
    h = c = torch.zeros(k, 8)
    for step in range(1, 51):
        h, c = decoder.decode_step(torch.zeros(k, 8), (h, c))
        scores = torch.log_softmax(decoder.fc(h), dim=1).view(-1)
        top_k_scores, top_k_words = scores.topk(k)
        prev_word_inds = top_k_words / vocab_size
        h, c = h[prev_word_inds], c[prev_word_inds]
    raise ValueError("no beam ended")
""",
}


def test_tutorial_compare_runs_against_a_checkout(tmp_path):
    for name, text in FAKE_TUTORIAL.items():
        (tmp_path / name).write_text(text)
    out = _run("tutorial_compare.py", "--tutorial", str(tmp_path), "--steps", "1", "--warmup", "2", "--images", "2",
               "--sequential-images", "1", "--threads", "1", "--profile")
    assert out["training_steps"] == {"warmup": 2, "timed": 1}
    per_step = out["beam5_one_image_per_step"]  # --profile: operations of one beam step on each side
    assert per_step["tutorial_steps"] == 50 and per_step["seesay_steps"] == 20
    for side in ("tutorial", "seesay"):
        assert 0 < per_step[side]["host_ops_not_views"] <= per_step[side]["host_ops"]
    t, s, r = out["tutorial_captions_per_s"], out["seesay_captions_per_s"], out["ratios"]
    assert t["train_decoder_only"] > 0 and t["beam5_one_image"] > 0 and "train_frozen_resnet101" not in t
    assert out["tutorial_beam_steps_per_image"] == 50.0  # every decode_step call counted, the `/` index patched
    assert all(s[k] > 0 for k in ("train_cached", "train_cached_grouped", "beam5_batched", "beam5_one_image"))
    assert r["train_vs_decoder_only"] == pytest.approx(max(s["train_cached"], s["train_cached_grouped"])
                                                       / t["train_decoder_only"], rel=0.02, abs=0.006)  # 2 places


def test_tutorial_compare_needs_a_checkout(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "tutorial_compare.py"), "--tutorial", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (f"--tutorial {tmp_path}: not a checkout of the tutorial "
                                                    "(no models.py, caption.py, train.py)")


def test_decode_throughput_reports_batched_and_one_image_beam():
    out = _run("decode_throughput.py", "--preset", "demo", "--decoders", "soft_attention", "--images", "2",
               "--sequential-images", "1", "--repeats", "1", "--max-len", "4", "--threads", "1", "--profile")
    r = out["results"]["demo"]["soft_attention"]
    assert r["beam5_captions_per_s"] > 0 and r["beam5_one_at_a_time_captions_per_s"] > 0
    assert r["beam5_mmacs_per_caption"] > r["greedy_mmacs_per_caption"] > 0
    ops = {k: v["host_ops_not_views"] for k, v in r["per_decoding_step"].items()}  # --profile, per decoding step
    assert set(ops) == {"greedy", "beam5", "greedy_one_image", "beam5_one_image"}
    assert ops["beam5_one_image"] > ops["greedy_one_image"] > 5  # a decoder step alone is more than 5


def test_allocator_alternates_glibc_defaults_and_the_kept_setting():
    from seesay import allocator

    out = _run("allocator.py", "--workloads", "greedy_transformer", "--rounds", "2", "--reps", "1", "--warmup", "0",
               "--images", "1", "--threads", "1")
    r = out["results"]["greedy_transformer"]
    # each setting really ran as named (on glibc: the worker's keep_freed_memory() set it, or was told not to)
    assert r["glibc_defaults"]["applied"] is True
    assert r["kept"]["applied"] is (allocator._glibc() is not None)
    for k in ("glibc_defaults", "kept"):
        assert 0 < r[k]["best_s"] <= r[k]["median_s"] and r[k]["minor_faults"] >= 0 and r[k]["peak_rss_mib"] > 0
        assert [len(x) for x in r[k]["rss_mib_first_last"]] == [1, 1]  # one process per round; 1 rep: one reading
    assert r["speedup_median"] == round(r["glibc_defaults"]["median_s"] / r["kept"]["median_s"], 3)


def test_context_product_times_both_orientations_and_they_agree():
    out = _run("context_product.py", "--images", "3", "--beam", "2", "--regions", "4", "--width", "8", "--repeats", "1",
               "--rounds", "2", "--threads", "1")
    assert set(out["ms"]) == {"alpha_grid", "grid_t_alpha", "sum"} and all(len(v) == 2 for v in out["all_ms"].values())
    assert out["max_abs_difference"] < 1e-5  # the same context either way
    assert out["speedup"] > 0 and all(v > 0 for v in out["ms"].values())


def test_roofline_takes_the_faster_backend_as_its_peak():
    g = _run("roofline.py", "--threads", "1")["gmacs"]
    assert g["large_500x3072x2048"] > 0
    if "onednn_large_500x3072x2048" in g:  # a CPU with oneDNN: both backends timed
        assert g["peak"] == max(g["large_500x3072x2048"], g["onednn_large_500x3072x2048"])
        assert g["peak_backend"] == ("onednn" if g["peak"] == g["onednn_large_500x3072x2048"] else "torch")
    else:
        assert (g["peak"], g["peak_backend"]) == (g["large_500x3072x2048"], "torch")


def test_onednn_decode_times_both_paths_alternately():
    from seesay.layers import gemm

    if not gemm.available():
        pytest.skip("no oneDNN float32 product in this torch build")
    out = _run("onednn_decode.py", "--preset", "tutorial", "--decoders", "soft_attention", "--images", "2",
               "--sequential-images", "1", "--max-len", "2", "--rounds", "2", "--threads", "1")
    for k in ("greedy", "beam5", "beam5_one_at_a_time"):
        r = out["results"]["soft_attention"][k]
        assert len(r["all"]["torch"]) == len(r["all"]["onednn"]) == 2
        assert r["torch"] == max(r["all"]["torch"]) > 0 and r["onednn"] == max(r["all"]["onednn"]) > 0
        assert r["speedup"] == round(r["onednn"] / r["torch"], 2)


@pytest.mark.parametrize("name, message", [("train:soft_attention", "train needs a batch size"),
                                           ("beam5:nonesuch", "decoder 'nonesuch' is not in the demo preset"),
                                           ("fit:soft_attention:4", "kind must be train, beam5 or greedy")])
def test_onednn_varying_names_a_bad_workload_in_one_line(name, message):
    proc = subprocess.run([sys.executable, str(BENCH / "onednn_varying.py"), "--preset", "demo", "--workloads", name],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"workload {name!r}: {message}" in proc.stderr.strip().splitlines()[-1]


def test_onednn_varying_runs_each_setting_in_fresh_processes():
    from seesay.layers import gemm

    out = _run("onednn_varying.py", "--preset", "demo", "--workloads", "train:soft_attention:4", "beam5:soft_attention",
               "--rounds", "2", "--warmup", "1", "--steps", "2", "--images", "3", "--threads", "1")
    assert set(out["results"]) == {"train:soft_attention:4", "beam5:soft_attention"}
    for r in out["results"].values():
        assert r["onednn"]["applied"] == [gemm.available()] * 2 and r["torch"]["applied"] == [False, False]
        for setting in ("onednn", "torch"):
            assert len(r[setting]["rounds_median_s"]) == 2 and r[setting]["total_s"] > 0
            assert all(a > 0 and b > 0 for a, b in r[setting]["rss_mib_after_warmup_and_end"])
        assert r["onednn_speedup"] == pytest.approx(r["torch"]["total_s"] / r["onednn"]["total_s"], rel=0.05)
    assert out["results"]["train:soft_attention:4"]["torch"]["captions_per_s"][0] > 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script", ["roofline.py", "train_throughput.py", "decode_throughput.py", "compile_check.py",
                                    "tutorial_compare.py --tutorial ."])
def test_a_missing_cuda_device_is_one_line(script):
    script, *args = script.split()
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--device", "cuda"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)"


@pytest.mark.parametrize("interpreter, status", [("true", "0"), ("false", "1")])
def test_cuda_run_runs_every_step_and_records_each_status(tmp_path, interpreter, status):
    """benchmarks/cuda_run.sh's plumbing, with a stand-in interpreter: every step runs, whatever the
    one before it did, and leaves its output file and one line in steps.txt."""
    env = {**__import__("os").environ, "PYTHON": interpreter, "WORK": str(tmp_path / "work")}
    proc = subprocess.run(["bash", str(BENCH / "cuda_run.sh"), str(tmp_path / "out"), str(tmp_path / "tutorial")],
                          cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out" / "steps.txt").read_text().splitlines()
    names = [line.split()[0] for line in lines]
    assert {"env", "roofline", "train_tutorial_fp32", "train_tutorial_amp", "train_profile", "train_profile_amp", "decode",
            "tutorial_compare", "demo_amp.txt", "scst_step", "compile", "train_compiled"} <= set(names)
    assert len(names) == len(set(names)) and all(line.split()[1] == f"rc={status}" for line in lines)
    for name in names:
        assert (tmp_path / "out" / (name if "." in name else f"{name}.json")).is_file()
    assert (tmp_path / "out" / "log.txt").read_text().count("== ") == len(names)


def test_cuda_run_skips_the_steps_past_its_deadline(tmp_path):
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 2\n")
    slow.chmod(0o755)
    env = {**__import__("os").environ, "PYTHON": str(slow), "WORK": str(tmp_path / "work"), "DEADLINE_S": "8"}
    proc = subprocess.run(["bash", str(BENCH / "cuda_run.sh"), str(tmp_path / "out")], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out" / "steps.txt").read_text().splitlines()
    ran = [line.split()[0] for line in lines if "rc=0" in line]
    skipped = [line.split()[0] for line in lines if "skipped (DEADLINE_S=8)" in line]
    assert ran[:2] == ["env", "roofline"] and len(ran) <= 4  # 2 s each; a step needs 5 s left to start
    assert skipped and len(ran) + len(skipped) == len(lines) and skipped[-1] == "train_demo_amp"
