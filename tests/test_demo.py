"""`seesay demo`: the whole pipeline end to end at tiny sizes, resuming, the time budget,
the baseline, the shipped recipe matching the demo's, the CLI."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from seesay import cli
from seesay import demo as demo_mod
from seesay.errors import SeesayError

# a model small enough that an epoch of 48 images takes well under a second
TINY = ["decoder.embed_dim=16", "decoder.attention_dim=16", "decoder.decoder_dim=32", "decoder.dropout=0.0",
        "encoder.width=8", "encoder.encoded_size=4", "train.tensorboard=false", "train.val_max_len=12",
        "train.epochs=3"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = demo_mod.run_demo(out, minutes=0.05, num_images=60, seed=0, progress=False, metrics="fast",
                               beam_size=2, num_samples=2, overrides=TINY)
    return out, result


def test_demo_end_to_end(demo_run):
    out, r = demo_run
    # every step left its output
    assert (out / "shapes" / "dataset_shapes.json").is_file()
    assert (out / "data" / "manifest.json").is_file()
    assert (out / "run" / "best" / "model.safetensors").is_file()
    assert (out / "run" / "metrics.jsonl").is_file()
    assert r["dataset"]["splits"] == {"train": 48, "val": 6, "test": 6}
    assert r["training"]["epochs"] >= 1
    # scores for the model and the baseline, on the same keys, as numbers
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert isinstance(r["scores"][key], float) and r["scores"][key] >= 0.0
        assert isinstance(r["baseline"]["scores"][key], float)
    written = json.loads((out / "test_metrics.json").read_text())
    assert written["CIDEr"] == pytest.approx(r["scores"]["CIDEr"])
    captions = json.loads((out / "test_captions.json").read_text())
    assert len(captions) == 6 and all(isinstance(c["caption"], str) for c in captions)
    base = json.loads((out / "baseline_metrics.json").read_text())
    assert base["caption"] == r["baseline"]["caption"] and base["CIDEr"] == pytest.approx(r["baseline"]["scores"]["CIDEr"])
    # samples: generated caption (the same as in the results file), a true reference, an attention map
    by_id = {str(c["image_id"]): c["caption"] for c in captions}
    refs = {json.loads(line)["image_id"]: json.loads(line)["references"]
            for line in (out / "data" / "test" / "references.jsonl").read_text().splitlines()}
    assert len(r["samples"]) == 2
    for s in r["samples"]:
        assert by_id[s["image_id"]] == s["caption"]
        assert s["reference"] in refs[s["image_id"]]
        assert Path(s["attention"]).is_file() and Path(s["attention"]).parent == out / "attention"
        assert Path(s["attention"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["scores"]["CIDEr"] == pytest.approx(r["scores"]["CIDEr"])
    text = demo_mod.format_summary(r)
    assert "baseline" in text and "CIDEr" in text and r["samples"][0]["reference"] in text


def test_demo_rerun_reuses_data_and_resumes_training(demo_run):
    out, first = demo_run
    ann = out / "shapes" / "dataset_shapes.json"
    manifest = out / "data" / "manifest.json"
    before = (ann.stat().st_mtime_ns, manifest.stat().st_mtime_ns)
    old_lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    epochs_before = len(old_lines)
    # the recipe's epoch cap allows exactly one more epoch; the budget is no constraint
    r = demo_mod.run_demo(out, minutes=5, num_images=60, seed=0, progress=False, metrics="fast", beam_size=1,
                          num_samples=1, attention=False, resume=True,
                          overrides=[*TINY, f"train.epochs={epochs_before + 1}"])
    assert (ann.stat().st_mtime_ns, manifest.stat().st_mtime_ns) == before  # dataset not remade
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines[:epochs_before] == old_lines  # resumed: earlier epochs kept, one appended
    assert json.loads(lines[-1])["epoch"] == epochs_before + 1
    assert r["training"]["epochs"] == epochs_before + 1
    assert r["samples"][0]["attention"] is None


def test_budget_goes_to_the_training_loop(monkeypatch, tmp_path):
    calls: list[dict] = []

    def fake_train(cfg):
        calls.append({"max_minutes": cfg.train.max_minutes, "resume": cfg.train.resume})
        return types.SimpleNamespace(epoch=3, best_score=0.5, best_epoch=2, stopped_early=False)

    import seesay.train.caption_task as ct

    monkeypatch.setattr(ct, "train_captioner", fake_train)
    cfg = demo_mod.demo_config()
    cfg.train.output = str(tmp_path / "run")
    info = demo_mod.train_demo_model(cfg, minutes=2.5)
    assert calls == [{"max_minutes": 2.5, "resume": False}]
    assert info["epochs"] == 3 and info["best_epoch"] == 2


def test_most_common_caption():
    refs = [["A red circle.", "a  red circle."], ["A blue square.", "A red circle"], ["A blue square."]]
    # "a red circle." x2 (case and spaces ignored) and "a red circle" differ by the full stop
    assert demo_mod.most_common_caption(refs) == "A red circle."
    assert demo_mod.most_common_caption([["x y"], ["z"]]) == "x y"  # ties: first seen
    with pytest.raises(SeesayError):
        demo_mod.most_common_caption([[], [""]])


def test_bad_arguments(tmp_path):
    import torch

    threads = torch.get_num_threads()
    with pytest.raises(SeesayError, match="num-images"):
        demo_mod.run_demo(tmp_path / "o", num_images=5, threads=threads + 1)
    assert torch.get_num_threads() == threads  # the demo's thread setting does not leak out
    with pytest.raises(SeesayError, match="minutes"):
        demo_mod.run_demo(tmp_path / "o", minutes=0)
    with pytest.raises(SeesayError, match="metrics"):
        demo_mod.run_demo(tmp_path / "o", metrics="slow")


def test_shipped_recipe_matches_the_demo():
    from seesay.config import load_config

    root = Path(__file__).resolve().parents[1]
    shipped = load_config(root / "configs" / "shapes_demo.yaml").to_dict()
    assert shipped == demo_mod.demo_config().to_dict()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--minutes", "--output", "--num-images", "--resume", "--metrics"):
        assert flag in out


def test_cli_one_line_error(capsys):
    assert cli.main(["demo", "--minutes", "-1", "--output", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seesay demo: error:") and len(err.splitlines()) == 1


def test_ctrl_c_in_training_stops_the_demo(monkeypatch, tmp_path, caplog):
    """A training run stopped by Ctrl-C (step finished, run/last saved) ends the demo: no evaluation of a half-run."""
    import seesay.train.caption_task as ct

    monkeypatch.setattr(ct, "train_captioner", lambda cfg: types.SimpleNamespace(
        epoch=0, best_score=float("-inf"), best_epoch=-1, stopped_early=False, stopped_by_signal=True))
    cfg = demo_mod.demo_config()
    cfg.train.output = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        demo_mod.train_demo_model(cfg, minutes=1)
    assert "seesay demo --resume" in caplog.text
