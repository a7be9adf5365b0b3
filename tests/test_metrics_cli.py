"""`seesay score` and the results/reference readers."""

from __future__ import annotations

import json

import pytest

from seesay.cli import main
from seesay.errors import SeesayError
from seesay.metrics import compute_scores
from seesay.metrics.io import load_references, load_results, score_files
from seesay.metrics.synthetic import make_corpus


@pytest.fixture()
def files(tmp_path):
    results, refs = make_corpus(60, 5, seed=3)
    res_path = tmp_path / "captions.json"
    res_path.write_text(json.dumps([{"image_id": int(k), "caption": v} for k, v in results.items()]))
    coco = {
        "images": [{"id": int(k), "file_name": f"COCO_val2014_{int(k):012d}.jpg"} for k in refs],
        "annotations": [
            {"image_id": int(k), "id": i * 10 + j, "caption": c}
            for i, (k, caps) in enumerate(refs.items())
            for j, c in enumerate(caps)
        ],
    }
    coco_path = tmp_path / "captions_val2014.json"
    coco_path.write_text(json.dumps(coco))
    karpathy = {
        "images": [
            {"split": "test", "cocoid": int(k), "imgid": i, "filename": f"COCO_val2014_{int(k):012d}.jpg",
             "sentences": [{"raw": c, "tokens": c.split()} for c in caps]}
            for i, (k, caps) in enumerate(refs.items())
        ]
        + [{"split": "train", "cocoid": 1, "imgid": 999, "filename": "x.jpg", "sentences": [{"raw": "a"}]}]
    }  # fmt: skip
    karpathy_path = tmp_path / "dataset_coco.json"
    karpathy_path.write_text(json.dumps(karpathy))
    return results, refs, res_path, coco_path, karpathy_path


def test_score_cli_coco_annotations(files, tmp_path, capsys):
    results, refs, res_path, coco_path, _ = files
    out, per = tmp_path / "m.json", tmp_path / "per.json"
    rc = main(["score", "--results", str(res_path), "--references", str(coco_path), "--output", str(out),
               "--per-image", str(per)])  # fmt: skip
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert list(metrics) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert metrics["METEOR"] is None and metrics["SPICE"] is None
    expected = compute_scores(results, refs).corpus
    assert metrics["CIDEr"] == pytest.approx(expected["CIDEr"]) and metrics["Bleu_4"] == pytest.approx(
        expected["Bleu_4"]
    )
    rows = json.loads(per.read_text())
    assert len(rows) == len(results)
    assert {"image_id", "caption", "references", "Bleu_4", "CIDEr"} <= set(rows[0])
    ciders = [r["CIDEr"] for r in rows]
    assert ciders == sorted(ciders)  # worst first
    assert "CIDEr" in capsys.readouterr().out


def test_score_karpathy_split_and_aliases(files, tmp_path):
    results, refs, _, coco_path, karpathy_path = files
    report = score_files(tmp_path / "captions.json", karpathy_path, split="test", output=tmp_path / "m.json")
    assert report.corpus["CIDEr"] == pytest.approx(compute_scores(results, refs).corpus["CIDEr"])
    # results keyed by file name resolve to the same images
    by_name = [{"image_id": f"COCO_val2014_{int(k):012d}.jpg", "caption": v} for k, v in results.items()]
    (tmp_path / "by_name.json").write_text(json.dumps(by_name))
    again = score_files(tmp_path / "by_name.json", karpathy_path, split="test")
    assert again.corpus == report.corpus
    refs_k = load_references(karpathy_path, "test")
    assert len(refs_k.captions) == len(refs)
    assert len(load_references(karpathy_path).captions) == len(refs) + 1


def test_score_cli_errors(files, tmp_path, capsys):
    _, _, res_path, coco_path, karpathy_path = files
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["score", "--results", str(bad), "--references", str(coco_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.json: not valid JSON" in err and len(err.strip().splitlines()) == 1
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"image_id": 42, "caption": "a dog"}]))
    assert main(["score", "--results", str(unknown), "--references", str(coco_path),
                 "--output", str(tmp_path / "m.json")]) == 2  # fmt: skip
    assert "not in the references: 42" in capsys.readouterr().err
    assert (
        main(["score", "--results", str(res_path), "--references", str(karpathy_path), "--split", "nope"])
        == 2
    )
    assert "no images in split 'nope'" in capsys.readouterr().err
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    with pytest.raises(SeesayError, match="more than once"):
        load_results(dup)
    with pytest.raises(SeesayError, match="no such file"):
        load_results(tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"foo": 1}))
    with pytest.raises(SeesayError, match="not a COCO captions annotation file"):
        load_references(wrong)


def test_score_cli_chinese(tmp_path):
    pytest.importorskip("jieba")
    refs = [{"image_id": "a.jpg", "caption": ["一个男人在街上骑自行车。", "男人骑着自行车"]},
            {"image_id": "b.jpg", "caption": ["两只狗在草地上玩耍", "草地上有两只狗"]}]  # fmt: skip
    (tmp_path / "refs.json").write_text(json.dumps(refs, ensure_ascii=False), encoding="utf-8")
    res = [
        {"image_id": "a.jpg", "caption": "一个男人骑着自行车"},
        {"image_id": "b", "caption": "两只狗在草地上"},
    ]
    (tmp_path / "res.json").write_text(json.dumps(res, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "m.json"
    assert main(["score", "--results", str(tmp_path / "res.json"), "--references", str(tmp_path / "refs.json"),
                 "--lang", "zh", "--output", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["Bleu_1"] > 0.5
