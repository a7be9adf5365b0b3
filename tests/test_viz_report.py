"""The HTML report: page structure, ordering, and a real render in headless Chromium."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from seesay.viz.report import ReportItem, build_report_html, save_report_html, split_ranking  # noqa: E402

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "chromium-browser")

# Appended to a copy of the page by the test only (the report itself has no scripts): after
# load, count the <img> elements whose data: URI decoded into a real bitmap.
_IMAGE_CHECK = (
    "<script>window.addEventListener('load',function(){var a=[].slice.call(document.images);"
    "var ok=a.filter(function(i){return i.complete&&i.naturalWidth>0&&i.naturalHeight>0;}).length;"
    "var d=document.createElement('div');d.id='seesay-image-check';d.setAttribute('data-total',a.length);"
    "d.setAttribute('data-decoded',ok);document.body.appendChild(d);});</script>"
)


def find_chromium() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        p = shutil.which(c)
        if p:
            return p
    return None


def render_dom(page: Path, tmp_path: Path) -> str:
    """The DOM after load, as headless Chromium sees it (with the image-decoding check added)."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    checked = tmp_path / f"{page.stem}-checked.html"
    text = page.read_text(encoding="utf-8")
    checked.write_text(text.replace("</body>", _IMAGE_CHECK + "</body>"), encoding="utf-8")
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        checked.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def image_check(dom: str) -> tuple[int, int]:
    m = re.search(r'id="seesay-image-check" data-total="(\d+)" data-decoded="(\d+)"', dom)
    assert m, "the image check did not run"
    return int(m.group(1)), int(m.group(2))


def make_items(n: int = 6, seed: int = 0) -> list[ReportItem]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        words = ["a", "red", "circle", "&", "<end>"]
        att = rng.random((len(words), 17))
        att /= att.sum(1, keepdims=True)
        items.append(
            ReportItem(
                image_id=f"img{i}",
                image=img,
                caption=f"caption {i}: a red circle & <square>",
                references=[f"reference {i}.1", f"reference {i}.2 \u7ea2\u8272\u7684\u5706"],
                scores={"CIDEr": float(i * 0.37 % 1.3), "Bleu_4": 0.1 * i},
                words=words,
                attention=att,
                grid_hw=(4, 4),
            )
        )
    return items


def test_split_ranking_worst_then_best():
    items = make_items(5)
    scores = {it.image_id: it.scores["CIDEr"] for it in items}
    worst, best = split_ranking(items, "CIDEr")
    assert len(worst) == 3 and len(best) == 2
    assert [scores[i.image_id] for i in worst] == sorted(scores.values())[:3]
    assert [scores[i.image_id] for i in best] == sorted(scores.values(), reverse=True)[:2]
    items[0].scores.pop("CIDEr")
    worst, _ = split_ranking(items, "CIDEr")
    assert worst[0] is items[0]  # missing score ranks as worst


def test_page_is_self_contained_and_escaped(tmp_path):
    items = make_items(4)
    page = build_report_html(items, title="t <1>", info={"checkpoint": "runs/x/best"}, corpus_scores={"CIDEr": 1.2, "SPICE": None})
    assert "<title>t &lt;1&gt;</title>" in page
    assert "<square>" not in page and "&lt;square&gt;" in page
    # no external resources: every src is a data: URI, no links, no scripts
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 4 * (1 + 5)
    assert all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in srcs)
    assert not re.search(r"(href|url)\s*[=(]", page) and "<script" not in page
    # worst first: the first item on the page has the lowest score
    ids = re.findall(r'<div class="item" id="img-([^"]+)"', page)
    lowest = min(items, key=lambda it: it.scores["CIDEr"]).image_id
    highest = max(items, key=lambda it: it.scores["CIDEr"]).image_id
    assert ids[0] == lowest and ids[len(ids) // 2] == highest
    assert page.index("Worst examples") < page.index("Best examples")
    out = save_report_html(tmp_path / "r" / "report.html", page)
    assert out.read_text(encoding="utf-8") == page


def test_report_renders_in_headless_chromium(tmp_path):
    items = make_items(6)
    page = build_report_html(items, title="render test")
    out = save_report_html(tmp_path / "report.html", page)
    dom = render_dom(out, tmp_path)
    total, decoded = image_check(dom)
    assert total == 6 * (1 + 5) and decoded == total
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    for it in items:
        assert it.caption in text
        for r in it.references:
            assert r in text
    assert "Worst examples" in text and "Best examples" in text


def test_image_check_detects_a_broken_image(tmp_path):
    # control for the check above: a corrupt data: URI is counted as not decoded
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="data:image/png;base64,iVBORw0KGgoAAAAAAAA="></body></html>'
    )
    total, decoded = image_check(render_dom(page, tmp_path))
    assert (total, decoded) == (1, 0)
