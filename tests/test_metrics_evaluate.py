"""`seesay evaluate` end to end: tiny shapes dataset, tiny random model, real decoding."""

from __future__ import annotations

import json

import pytest
import torch

from seesay.cli import main

SPEC = {
    "encoder": {"name": "small_cnn", "width": 8, "encoded_size": 4, "image_size": 32},
    "decoder": {"name": "soft_attention", "embed_dim": 8, "attention_dim": 8, "decoder_dim": 8},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from seesay.checkpoint import save_checkpoint
    from seesay.data.prepare import prepare_dataset
    from seesay.data.store import PreparedData
    from seesay.data.synth import make_shapes
    from seesay.model import build_model

    tmp = tmp_path_factory.mktemp("evaluate")
    ann = make_shapes(
        tmp / "shapes", num_images=40, seed=0, image_size=32, val_fraction=0.2, test_fraction=0.25
    )
    data = tmp / "data"
    prepare_dataset("karpathy", data, annotations=ann, images=ann.parent, image_size=32, min_word_freq=1,
                    workers=1, progress=False)  # fmt: skip
    vocab = PreparedData(data).vocab
    spec = json.loads(json.dumps(SPEC))
    spec["decoder"]["vocab_size"] = len(vocab)
    torch.manual_seed(0)
    model = build_model(spec, tokenizer=vocab, image_size=32)
    ck = save_checkpoint(tmp / "run" / "best", model=model, config={})
    return tmp, data, ck


def test_evaluate_cli_writes_metrics_results_and_per_image(setup, capsys):
    tmp, data, ck = setup
    out, res, per = tmp / "metrics.json", tmp / "captions.json", tmp / "per_image.json"
    rc = main(["evaluate", "--checkpoint", str(ck), "--data", str(data), "--split", "test", "--beam-size", "2",
               "--max-length", "8", "--batch-size", "4", "--output", str(out), "--results", str(res),
               "--per-image", str(per), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert list(metrics) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert all(isinstance(metrics[k], float) for k in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"))
    assert metrics["METEOR"] is None and metrics["SPICE"] is None
    from seesay.data.store import PreparedData

    store = PreparedData(data).split("test")
    results = json.loads(res.read_text())
    assert len(results) == len(store) and {"image_id", "caption"} == set(results[0])
    rows = json.loads(per.read_text())
    assert len(rows) == len(store)
    assert {"image_id", "caption", "references", "Bleu_4", "CIDEr"} <= set(rows[0])
    keys = [(r["CIDEr"], r["Bleu_4"]) for r in rows]
    assert keys == sorted(keys)
    # the results file can be re-scored with `seesay score` and gives the same numbers
    refs = {r["image_id"]: r["references"] for r in rows}
    (tmp / "refs.json").write_text(json.dumps(refs))
    assert main(["score", "--results", str(res), "--references", str(tmp / "refs.json"),
                 "--output", str(tmp / "m2.json")]) == 0  # fmt: skip
    assert json.loads((tmp / "m2.json").read_text()) == metrics
    assert "CIDEr" in capsys.readouterr().out


def test_evaluate_library_and_errors(setup):
    from seesay.decoding import Greedy
    from seesay.errors import SeesayError
    from seesay.evaluate import evaluate_checkpoint

    tmp, data, ck = setup
    ev = evaluate_checkpoint(ck, data, split="val", strategy=Greedy(), max_length=6, batch_size=3, output=None, limit=5,
                             device="cpu")  # fmt: skip
    assert len(ev.captions) == 5 and set(ev.report.per_image) == set(ev.captions)
    with pytest.raises(SeesayError, match="no split"):
        evaluate_checkpoint(ck, data, split="nope", output=None, device="cpu")
    with pytest.raises(SeesayError):
        evaluate_checkpoint(tmp / "missing", data, output=None, device="cpu")
