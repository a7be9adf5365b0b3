"""Issue 18: every mistake gets one line, before work is done, and nothing is lost or written.

Each case runs a verb in-process (`seesay.cli.main`) with one bad input and asserts the exact
one line on stderr (`seesay <verb>: error: ...`), the exit status, no traceback, and that no
file under the test's folders appeared, changed or went away. The checks run before data is
read, features computed or a model trained, so each case takes milliseconds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_DECODERS, TINY_ENCODERS, prepared_shapes
from seesay import cli

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SHAPES_RECIPE = REPO / "configs" / "shapes_demo.yaml"
TINY = ["--set", "encoder.width=8", "--set", "encoder.encoded_size=4", "--set", "encoder.image_size=32",
        "--set", "decoder.embed_dim=16", "--set", "decoder.attention_dim=16", "--set", "decoder.decoder_dim=16",
        "--set", "train.val_max_len=12", "--max-steps-per-epoch", "1", "--epochs", "1", "--batch-size", "20"]
TRAIN = ["train", "--data", "{data}", "--output", "{tmp}/run", "--device", "cpu", "--workers", "0",
         "--no-progress", *TINY]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny prepared dataset (train/val/test), a tiny checkpoint, an image and a plain file."""
    from seesay.checkpoint import save_checkpoint
    from seesay.data.store import PreparedData
    from seesay.model import build_model

    root = tmp_path_factory.mktemp("world")
    prepared_shapes(root, test_fraction=0.25)
    vocab = PreparedData(root / "data").vocab
    spec = {"encoder": {"name": "small_cnn", **TINY_ENCODERS["small_cnn"]},
            "decoder": {"name": "soft_attention", "vocab_size": len(vocab), **TINY_DECODERS["soft_attention"]}}
    torch.manual_seed(0)
    save_checkpoint(root / "run" / "best", model=build_model(spec, tokenizer=vocab, image_size=32).eval(), config={})
    (root / "afile").write_text("a plain file\n")
    return SimpleNamespace(root=root, data=root / "data", ckpt=root / "run" / "best", raw=root / "raw",
                           image=root / "raw" / "images" / "000000.png", file=root / "afile")


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under `roots`: path -> (size, mtime_ns)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def run_verb(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """(exit status, stderr, its lines that are not log records)."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err, [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]


# -- corrupt checkpoints (copies of the tiny one, changed by `setup`) -----------------------------------


def _copy(world, tmp: Path) -> Path:
    ck = tmp / "ck"
    shutil.copytree(world.ckpt, ck)
    return ck


def _write(rel: str, text: str):
    def setup(world, tmp):
        (_copy(world, tmp) / rel).write_text(text)
    return setup


def _spec(where: str, name: str):
    def setup(world, tmp):
        p = _copy(world, tmp) / "config.json"
        cfg = json.loads(p.read_text())
        cfg["model"][where]["name"] = name
        p.write_text(json.dumps(cfg))
    return setup


def _old_vocab(text: str):
    def setup(world, tmp):
        ck = _copy(world, tmp)
        shutil.rmtree(ck / "tokenizer")
        (ck / "vocab.json").write_text(text)
    return setup


# -- the cases: (id, argv, exit status, the one line (str: exact; re.Pattern: full match), setup) ---------

ENCODERS = "efficientnet_lite0, resnet101, resnet18, resnet50, small_cnn, swinv2, vit"
CASES = [
    # seesay train: settings refused before any data is read (so no RUN_DIR, no best/)
    ("train-batch-size-0", [*TRAIN, "--batch-size", "0"], 2,
     "--batch-size (train.batch_size) must be an integer >= 1, not 0"),
    ("train-batch-size-negative", [*TRAIN, "--batch-size", "-4"], 2,
     "--batch-size (train.batch_size) must be an integer >= 1, not -4"),
    ("train-workers-negative", [*TRAIN, "--workers", "-1"], 2,
     "--workers (data.workers) must be an integer >= 0, not -1"),
    ("train-epochs-negative", [*TRAIN, "--epochs", "-1"], 2,
     re.compile(r"--epochs \(train\.epochs\) must be an integer >= 1.*, not -1")),
    ("train-epochs-0", [*TRAIN, "--epochs", "0"], 2,
     re.compile(r"--epochs \(train\.epochs\) must be an integer >= 1.*, not 0")),
    ("train-lr-negative", [*TRAIN, "--lr", "-1"], 2, "--decoder-lr (decoder.lr) must be a number > 0, not -1.0"),
    ("train-decoder-lr-0", [*TRAIN, "--decoder-lr", "0"], 2, "--decoder-lr (decoder.lr) must be a number > 0, not 0.0"),
    ("train-encoder-lr-negative", [*TRAIN, "--encoder-lr", "-1"], 2,
     "--encoder-lr (encoder.lr) must be a number > 0, not -1.0"),
    ("train-grad-accum-0", [*TRAIN, "--grad-accum", "0"], 2,
     re.compile(r"--grad-accum \(train\.grad_accum\) must be an integer >= 1.*, not 0")),
    ("train-val-beam-size-0", [*TRAIN, "--val-beam-size", "0"], 2,
     "--val-beam-size (train.val_beam_size) must be an integer >= 1, not 0"),
    ("train-max-minutes-0", [*TRAIN, "--max-minutes", "0"], 2,
     "--max-minutes (train.max_minutes) must be a number > 0 (or unset), not 0.0"),
    ("train-max-minutes-text", [*TRAIN, "--set", "train.max_minutes=soon"], 2,
     "--max-minutes (train.max_minutes) must be a number > 0 (or unset), not 'soon'"),
    ("train-select-metric-unknown", [*TRAIN, "--select-metric", "BLEU4"], 2,
     re.compile(r"--select-metric \(train\.select_metric\) 'BLEU4' is not a validation metric "
                r"\(use one of Bleu_1, .*CIDEr.*\)")),
    ("train-set-unknown-field", [*TRAIN, "--set", "train.epocs=3"], 2,
     re.compile(r"--set train\.epocs=3: train\.epocs: unknown key \(did you mean 'epochs'\? known: amp, .*\)")),
    ("train-set-unknown-decoder-option", [*TRAIN, "--set", "decoder.nonsense=1"], 2,
     re.compile(r"decoder 'soft_attention' has no option 'nonsense' \(its options: alpha_c, .*\)")),
    ("train-set-unknown-encoder-option", [*TRAIN, "--set", "encoder.depth=3"], 2,
     re.compile(r"encoder 'small_cnn' has no option 'depth' \(its options: .*width.*\)")),
    ("train-set-unknown-section", [*TRAIN, "--set", "nosection.x=1"], 2,
     "--set nosection.x=1: unknown section 'nosection' (use data, encoder, decoder, train, captioner)"),
    ("train-unknown-encoder", [*TRAIN, "--set", "encoder.name=resnet7"], 2,
     f"unknown encoder 'resnet7' (--encoder, encoder.name); choose one of: {ENCODERS}"),
    ("train-unknown-decoder", [*TRAIN, "--decoder", "lstm"], 2,
     re.compile(r"unknown decoder 'lstm' \(--decoder, decoder\.name\); choose one of: .*soft_attention.*")),
    ("train-switch-family-keeps-explicit-option",
     ["train", "--config", str(SHAPES_RECIPE), "--data", "{data}", "--output", "{tmp}/run", "--device", "cpu",
      "--encoder", "efficientnet_lite0", "--set", "encoder.width=3"], 2,
     re.compile(r"encoder 'efficientnet_lite0' has no option 'width' \(its options: .*encoded_size.*\)")),
    ("train-output-is-a-file", [*TRAIN, "--output", "{file}"], 2, "--output {file}: is a file, not a folder"),
    ("train-output-below-a-file", [*TRAIN, "--output", "{file}/run"], 2,
     "--output {file}/run: {file} is a file, not a folder"),
    # --device: every verb that takes it
    ("train-device-cuda", [*TRAIN, "--device", "cuda"], 2,
     "--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)"),
    ("train-device-cuda-1", [*TRAIN, "--device", "cuda:1"], 2,
     "--device cuda:1: no CUDA GPU is available (torch.cuda.is_available() is False)"),
    ("train-device-unknown", [*TRAIN, "--device", "tpu"], 2,
     "--device tpu: unknown device (use auto, cpu, cuda, cuda:N or mps)"),
    ("caption-device-cuda", ["caption", "--checkpoint", "{ckpt}", "{image}", "--device", "cuda"], 2,
     "--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)"),
    ("evaluate-device-cuda", ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cuda"], 2,
     "--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)"),
    ("report-device-cuda", ["report", "--checkpoint", "{ckpt}", "--data", "{data}", "--output", "{tmp}/r.html",
                            "--device", "cuda:0"], 2,
     "--device cuda:0: no CUDA GPU is available (torch.cuda.is_available() is False)"),
    ("visualize-device-cuda", ["visualize", "--checkpoint", "{ckpt}", "--image", "{image}", "--output",
                               "{tmp}/v.png", "--device", "cuda"], 2,
     "--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)"),
    ("visualize-device-unknown", ["visualize", "--checkpoint", "{ckpt}", "--image", "{image}", "--output",
                                  "{tmp}/v.png", "--device", "gpu"], 2,
     "--device gpu: unknown device (use auto, cpu, cuda, cuda:N or mps)"),
    # --output: a directory, or below a plain file, refused before any decoding
    ("evaluate-output-directory", ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                                   "--output", "{tmp}"], 2, "--output {tmp}: is a directory, not a file"),
    ("evaluate-output-below-a-file", ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                                      "--output", "{file}/m.json"], 2,
     "--output {file}/m.json: {file} is a file, not a folder"),
    ("evaluate-results-directory", ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                                    "--output", "{tmp}/m.json", "--results", "{tmp}"], 2,
     "--results {tmp}: is a directory, not a file"),
    ("evaluate-results-same-as-output", ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--device",
                                         "cpu", "--output", "{tmp}/m.json", "--results", "{tmp}/m.json"], 2,
     "--results {tmp}/m.json: the same file as --output (one would overwrite the other)"),
    ("score-output-directory", ["score", "--results", "{tmp}/c.json", "--references", "{raw}/dataset_shapes.json",
                                "--output", "{tmp}"], 2, "--output {tmp}: is a directory, not a file"),
    ("score-per-image-below-a-file", ["score", "--results", "{tmp}/c.json", "--references",
                                      "{raw}/dataset_shapes.json", "--output", "{tmp}/m.json",
                                      "--per-image", "{file}/p.json"], 2,
     "--per-image {file}/p.json: {file} is a file, not a folder"),
    ("caption-output-directory", ["caption", "--checkpoint", "{ckpt}", "{image}", "--device", "cpu",
                                  "--output", "{tmp}"], 2, "--output {tmp}: is a directory, not a file"),
    ("caption-attention-map-below-a-file", ["caption", "--checkpoint", "{ckpt}", "{image}", "--device", "cpu",
                                            "--attention-map", "{file}/a.png"], 2,
     "--attention-map {file}/a.png: {file} is a file, not a folder"),
    ("report-output-directory", ["report", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                                 "--output", "{tmp}"], 2, "--output {tmp}: is a directory, not a file"),
    ("visualize-output-directory", ["visualize", "--checkpoint", "{ckpt}", "--image", "{image}", "--device", "cpu",
                                    "--output", "{tmp}"], 2, "--output {tmp}: is a directory, not a file"),
    ("plot-output-below-a-file", ["plot", "{root}/run", "--output", "{file}/c.png"], 2,
     "--output {file}/c.png: {file} is a file, not a folder"),
    # counts and beam sizes
    ("report-num-images-negative", ["report", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                                    "--output", "{tmp}/r.html", "--num-images", "-3"], 2,
     "--num-images must be an integer >= 0 (0: the whole split), not -3"),
    ("report-beam-size-0", ["report", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                            "--output", "{tmp}/r.html", "--beam-size", "0"], 2,
     "--beam-size must be an integer >= 1, not 0"),
    ("report-max-length-0", ["report", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                             "--output", "{tmp}/r.html", "--max-length", "0"], 2,
     "--max-length must be an integer >= 1, not 0"),
    ("evaluate-beam-size-0", ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                              "--beam-size", "0"], 2, "--beam-size must be >= 1, not 0"),
    ("evaluate-limit-negative", ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                                 "--limit", "-1"], 2, "--limit must be an integer >= 1, not -1"),
    ("visualize-beam-size-0", ["visualize", "--checkpoint", "{ckpt}", "--image", "{image}", "--device", "cpu",
                               "--output", "{tmp}/v.png", "--beam-size", "0"], 2,
     "--beam-size must be an integer >= 1, not 0"),
    ("visualize-cols-0", ["visualize", "--checkpoint", "{ckpt}", "--image", "{image}", "--device", "cpu",
                          "--output", "{tmp}/v.png", "--cols", "0"], 2, "--cols must be an integer >= 1, not 0"),
    ("report-sort-metric-unknown", ["report", "--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cpu",
                                    "--output", "{tmp}/r.html", "--sort-metric", "BLEU4"], 2,
     "--sort-metric 'BLEU4' is not a per-image score (use one of Bleu_1, Bleu_2, Bleu_3, Bleu_4, ROUGE_L, CIDEr)"),
    ("caption-top-k-negative", ["caption", "--checkpoint", "{ckpt}", "{image}", "--device", "cpu", "--top-k", "-1"],
     2, "--top-k must be >= 0 (0: all words), not -1"),
    ("plot-cols-0", ["plot", "{root}/run", "--output", "{tmp}/c.png", "--cols", "0"], 2,
     "--cols must be >= 1, not 0"),
    # images and checkpoints that are not what they should be: the message names the file
    ("caption-folder-without-images", ["caption", "--checkpoint", "{ckpt}", "{tmp}", "--device", "cpu"], 2,
     "{tmp}: no image files found"),
    ("visualize-directory-as-image", ["visualize", "--checkpoint", "{ckpt}", "--image", "{raw}", "--device", "cpu",
                                      "--output", "{tmp}/v.png"], 2, "{raw}: is a directory, not an image file"),
    ("caption-preprocess-not-json", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device", "cpu"], 2,
     re.compile(r".*/ck/preprocess\.json: .*"), _write("preprocess.json", "not json\n")),
    ("caption-preprocess-not-an-object", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device", "cpu"], 2,
     re.compile(r".*/ck/preprocess\.json: .*list.*"), _write("preprocess.json", "[1, 2]\n")),
    ("caption-config-unknown-encoder", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device", "cpu"], 2,
     re.compile(r".*/ck/config\.json: unknown encoder 'nope'.*"), _spec("encoder", "nope")),
    ("caption-config-unknown-decoder", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device", "cpu"], 2,
     re.compile(r".*/ck/config\.json: unknown decoder 'nope'.*"), _spec("decoder", "nope")),
    ("caption-tokenizer-garbage", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device", "cpu"], 2,
     re.compile(r".*/ck/tokenizer/tokenizer\.json: .*"), _write("tokenizer/tokenizer.json", "garbage\n")),
    ("caption-tokenizer-not-a-tokenizer", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device", "cpu"], 2,
     re.compile(r".*/ck/tokenizer/tokenizer\.json: .*"), _write("tokenizer/tokenizer.json", "[1, 2]\n")),
    ("caption-old-vocab-garbage", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device", "cpu"], 2,
     re.compile(r".*/ck/vocab\.json: .*"), _old_vocab("garbage\n")),
    ("caption-old-vocab-wrong-shape", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device", "cpu"], 2,
     re.compile(r".*/ck/vocab\.json: .*"), _old_vocab('{"itos": 3}\n')),
]
# seesay/checkpoint.py (read_checkpoint_files) checks preprocess.json: its image_size must
# be an integer >= 0 (and its encoder an object).
PREPROCESS_TYPES = [
    ("caption-preprocess-image-size-text", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device", "cpu"], 2,
     re.compile(r".*/ck/preprocess\.json: image_size .*"), _write("preprocess.json", '{"image_size": "big"}\n')),
    ("caption-preprocess-image-size-negative", ["caption", "--checkpoint", "{tmp}/ck", "{image}", "--device",
                                                "cpu"], 2,
     re.compile(r".*/ck/preprocess\.json: image_size .*"), _write("preprocess.json", '{"image_size": -5}\n')),
]
ALL_CASES = [pytest.param(c, id=c[0]) for c in [*CASES, *PREPROCESS_TYPES]]


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_input_is_one_line_and_changes_nothing(case, world, tmp_path, capsys, monkeypatch):
    name, argv, status, expected, *setup = case
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    work, cwd = tmp_path / "work", tmp_path / "cwd"
    work.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    if setup:
        setup[0](world, work)
    places = dict(data=world.data, ckpt=world.ckpt, image=world.image, raw=world.raw, file=world.file,
                  root=world.root, tmp=work)
    before = snapshot(world.root, tmp_path)
    code, err, lines = run_verb([a.format(**places) for a in argv], capsys)
    verb = argv[0]
    assert "Traceback" not in err
    assert code == status, err
    assert len(lines) == 1, err
    if isinstance(expected, str):
        assert lines[0] == f"seesay {verb}: error: {expected.format(**places)}"
    else:
        prefix = f"seesay {verb}: error: "
        assert lines[0].startswith(prefix) and expected.fullmatch(lines[0][len(prefix):]), lines[0]
    assert snapshot(world.root, tmp_path) == before  # nothing written, changed or lost
    assert list(cwd.iterdir()) == []


def test_a_bad_input_in_a_real_process_prints_no_traceback(world, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "seesay", "train", "--data", str(world.data), "--output",
                           str(tmp_path / "run"), "--device", "cpu", "--batch-size", "0"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["seesay train: error: --batch-size (train.batch_size) must be an integer >= 1, "
                                        "not 0"]
    assert not (tmp_path / "run").exists()


# -- a recipe's family switched on the command line ------------------------------------------------------


def _train_config(argv: list[str]):
    from seesay.commands.train import build_config

    return build_config(cli.build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("switch", [["--encoder", "efficientnet_lite0"], ["--set", "encoder.name=efficientnet_lite0"]])
def test_switching_the_encoder_family_drops_the_recipes_options(switch, caplog):
    from seesay.config import check_model_options

    with caplog.at_level(logging.INFO, logger="seesay.config"):
        cfg = _train_config(["--config", str(SHAPES_RECIPE), *switch])
    assert cfg.encoder.name == "efficientnet_lite0"
    assert cfg.encoder.options == {"encoded_size": 8, "image_size": 64}  # the options it also takes stay
    assert cfg.decoder.options["embed_dim"] == 64  # the decoder did not change: all its options stay
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert lines == ["encoder efficientnet_lite0 replaces the recipe's small_cnn: dropped the recipe's small_cnn "
                     "options width (efficientnet_lite0 does not take them)"]
    check_model_options(cfg)  # what is left builds


def test_switching_the_decoder_family_keeps_explicit_options():
    from seesay.config import check_model_options
    from seesay.errors import SeesayError

    cfg = _train_config(["--config", str(SHAPES_RECIPE), "--decoder", "transformer", "--set", "decoder.d_model=32"])
    assert cfg.decoder.options == {"embed_dim": 64, "dropout": 0.3, "d_model": 32}  # attention_dim, ... dropped
    check_model_options(cfg)
    cfg = _train_config(["--config", str(SHAPES_RECIPE), "--decoder", "transformer", "--alpha-c", "0.5"])
    assert cfg.decoder.options["alpha_c"] == 0.5  # given on the command line: kept, and refused by name
    with pytest.raises(SeesayError, match=r"decoder 'transformer' has no option 'alpha_c'"):
        check_model_options(cfg)


def test_the_same_family_keeps_every_recipe_option():
    cfg = _train_config(["--config", str(SHAPES_RECIPE), "--encoder", "small_cnn"])
    assert cfg.encoder.options == {"width": 64, "encoded_size": 8, "image_size": 64}


# -- nothing is lost when the last write fails -----------------------------------------------------------


def _disk_full_for(monkeypatch, target: Path) -> None:
    import seesay.files as files

    real = files.write_json_atomic

    def write(path, obj, **kwargs):
        if Path(path) == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj, **kwargs)

    monkeypatch.setattr(files, "write_json_atomic", write)


def test_evaluate_keeps_the_captions_when_the_metrics_cannot_be_written(world, tmp_path, capsys, monkeypatch):
    import tempfile

    kept_dir = tmp_path / "system-tmp"
    kept_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(kept_dir))
    out = tmp_path / "eval" / "metrics.json"
    _disk_full_for(monkeypatch, out)
    code, err, lines = run_verb(["evaluate", "--checkpoint", str(world.ckpt), "--data", str(world.data), "--split",
                                 "val", "--device", "cpu", "--beam-size", "1", "--max-length", "6",
                                 "--output", str(out)], capsys)
    kept = list(kept_dir.glob("seesay-captions-*.json"))
    assert code == 2 and len(kept) == 1, err
    assert lines == [f"seesay evaluate: error: {out}: cannot write (No space left on device); the captions were "
                     f"saved to {kept[0]}"]
    rows = json.loads(kept[0].read_text())
    assert len(rows) == 6 and all(set(r) == {"image_id", "caption"} for r in rows)
    assert not out.exists()


def test_evaluate_says_where_the_captions_are_when_they_were_written(world, tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-tmp"))
    out, results = tmp_path / "metrics.json", tmp_path / "captions.json"
    _disk_full_for(monkeypatch, out)
    code, err, lines = run_verb(["evaluate", "--checkpoint", str(world.ckpt), "--data", str(world.data), "--split",
                                 "val", "--device", "cpu", "--beam-size", "1", "--max-length", "6",
                                 "--output", str(out), "--results", str(results)], capsys)
    assert code == 2
    assert lines == [f"seesay evaluate: error: {out}: cannot write (No space left on device); the captions are in "
                     f"{results}"]
    assert len(json.loads(results.read_text())) == 6 and not (tmp_path / "system-tmp").exists()


def test_score_keeps_the_scores_when_they_cannot_be_written(world, tmp_path, capsys, monkeypatch):
    import tempfile

    kept_dir = tmp_path / "system-tmp"
    kept_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(kept_dir))
    refs = json.loads((world.raw / "dataset_shapes.json").read_text())
    rows = [{"image_id": im["cocoid"] if "cocoid" in im else im["imgid"], "caption": "a red circle"}
            for im in refs["images"] if im["split"] == "test"]
    results = tmp_path / "captions.json"
    results.write_text(json.dumps(rows))
    out = tmp_path / "captions.metrics.json"
    _disk_full_for(monkeypatch, out)
    code, err, lines = run_verb(["score", "--results", str(results), "--references",
                                 str(world.raw / "dataset_shapes.json"), "--split", "test"], capsys)
    kept = list(kept_dir.glob("seesay-scores-*.json"))
    assert code == 2 and len(kept) == 1, err
    assert lines == [f"seesay score: error: {out}: cannot write (No space left on device); the scores were saved "
                     f"to {kept[0]}"]
    assert json.loads(kept[0].read_text())["metrics"]["CIDEr"] is not None


# -- first-run experience ---------------------------------------------------------------------------------


def test_evaluate_writes_metrics_beside_the_run_not_in_the_working_directory(world, tmp_path, capsys,
                                                                             monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(world.ckpt, run / "best")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["evaluate", "--checkpoint", "run/best", "--data", str(world.data), "--split", "val",
                     "--device", "cpu", "--beam-size", "1", "--max-length", "6"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads((run / "eval-val" / "metrics.json").read_text())["CIDEr"] is not None
    assert out.splitlines()[-1].endswith(f"wrote {Path('run') / 'eval-val' / 'metrics.json'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_coco_dir_is_prepared_beside_the_run_not_in_the_raw_folder(tmp_path, monkeypatch, caplog):
    import seesay.data.prepare as prepare
    from seesay.config import Config
    from seesay.train.setup import prepare_if_needed

    calls = []

    def fake_prepare(fmt, output, **kwargs):
        calls.append((fmt, Path(output), kwargs))
        Path(output).mkdir(parents=True)
        (Path(output) / "manifest.json").write_text("{}")

    monkeypatch.setattr(prepare, "prepare_dataset", fake_prepare)
    raw = tmp_path / "coco"
    raw.mkdir()
    cfg = Config()
    cfg.data.coco_dir, cfg.train.output, cfg.train.progress = str(raw), str(tmp_path / "runs" / "a"), False
    with caplog.at_level(logging.INFO, logger="seesay.train.setup"):
        prepare_if_needed(cfg)
    target = tmp_path / "runs" / "a" / "data"
    assert calls == [("coco", target, {"coco_dir": str(raw), "progress": False})]
    assert cfg.data.path == str(target) and list(raw.iterdir()) == []
    assert any(str(target) in r.getMessage() for r in caplog.records)
    cfg2 = Config()  # a second run of the same output reuses it
    cfg2.data.coco_dir, cfg2.train.output = str(raw), str(tmp_path / "runs" / "a")
    prepare_if_needed(cfg2)
    assert len(calls) == 1 and cfg2.data.path == str(target)


def test_no_best_checkpoint_is_not_reported_as_one(world, tmp_path, monkeypatch, caplog):
    from seesay.config import Config
    from seesay.train import caption_task

    monkeypatch.setattr(caption_task.CaptionTask, "validate", lambda self: {"CIDEr": float("nan")})
    cfg = Config()
    cfg.data.path, cfg.data.workers = str(world.data), 0
    cfg.encoder.options = dict(TINY_ENCODERS["small_cnn"])
    cfg.decoder.options = dict(TINY_DECODERS["soft_attention"])
    cfg.train.output, cfg.train.batch_size, cfg.train.epochs = str(tmp_path / "run"), 20, 2
    cfg.train.max_steps_per_epoch, cfg.train.patience = 1, 1
    cfg.train.progress, cfg.train.tensorboard, cfg.train.device = False, False, "cpu"
    with caplog.at_level(logging.INFO, logger="seesay.train.caption_task"):
        caption_task.train_captioner(cfg)
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert not (tmp_path / "run" / "best").exists()
    assert done == [f"done: no best/ checkpoint (no validation gave a usable CIDEr); the last state is in "
                    f"{tmp_path / 'run'}/last"]


def _verb_parsers() -> dict:
    import argparse

    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("verb", cli.VERBS)
def test_help_states_each_default_once(verb):
    parser = _verb_parsers()[verb]
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("(default") <= 1, f"seesay {verb} {action.option_strings}: {text}"
        assert "(default: None)" not in text, f"seesay {verb} {action.option_strings}: {text}"
    assert parser.format_help()
