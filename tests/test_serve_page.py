"""The page at / of `seesay serve`, rendered and driven in headless Chromium against a live server:
an image is uploaded, its captions appear, a click on a word draws that word's attention."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import urllib.parse

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from test_serve import make_checkpoint, running_server, serve_checkpoint  # noqa: E402

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "chromium-browser")


def find_chromium() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        p = shutil.which(c)
        if p:
            return p
    return None


def shapes_png() -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (96, 72), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((8, 8, 48, 48), fill="red")
    d.rectangle((60, 30, 90, 66), fill="blue")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("page"), peaky_attention=True)
    ck, app = serve_checkpoint(path)
    with running_server(app) as url:
        yield ck, url


def chromium_run(url: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", *extra, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_page_is_self_contained(page_server):
    _, url = page_server
    page = httpx.get(f"{url}/").text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads something from elsewhere"
    assert "@import" not in page and "<link" not in page
    assert "<script src" not in page


def test_upload_caption_and_word_click_heat_map(page_server, tmp_path):
    ck, url = page_server
    img = shapes_png()
    data_url = "data:image/png;base64," + base64.b64encode(img).decode()
    res = chromium_run(f"{url}/?selftest=1&image={urllib.parse.quote(data_url, safe='')}", tmp_path, "--dump-dom")
    m = re.search(r'<pre id="selftest"[^>]*data-done="1"[^>]*>(.*?)</pre>', res.stdout, re.S)
    assert m, "the page never reported (caption not shown?)\n" + res.stdout[-2000:]
    report = json.loads(html.unescape(m.group(1)))
    assert "error" not in report, report

    # what the page shows is what the API answers for its default options (5 beams, 3 captions)
    api = httpx.post(f"{url}/v1/caption?beam_size=5&num_captions=3&attention=1", content=img,
                     headers={"Content-Type": "image/png"}).json()
    assert report["caption"] == api["caption"]
    assert report["captions"] == [c["caption"] for c in api["captions"]]
    assert f">{html.escape(api['caption'])}</p>" in res.stdout  # the caption is on the page
    first_words = [w.strip("<>") for w in api["captions"][0]["words"]]
    assert report["words"] == first_words and report["clicked"] == first_words[0]

    # the click pinned the word and drew its attention: brightest where the model looked most
    assert report["pinned"] is True
    assert report["grid"] == {"height": 4, "width": 4, "sentinel": False}
    w, h = report["canvas"]
    assert w == 480 and 0 < report["painted_pixels"] <= w * h
    att = np.array(report["attention"])
    alpha = np.array(report["cell_alpha"], dtype=float)
    assert np.allclose(att, api["captions"][0]["attention"][0][:16])
    top = np.sort(att)[::-1]
    assert top[0] > 2 * top[1], "the test model's attention should have one clear peak"
    assert int(alpha.argmax()) == int(att.argmax())
    assert alpha.max() > 150 and np.median(alpha) < alpha.max() / 4  # 0.85 * 255 at most, blurred a little


def test_page_reports_a_server_error(page_server, tmp_path):
    _, url = page_server
    data_url = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    res = chromium_run(f"{url}/?selftest=1&image={urllib.parse.quote(data_url, safe='')}", tmp_path, "--dump-dom")
    m = re.search(r'<pre id="selftest"[^>]*data-done="1"[^>]*>(.*?)</pre>', res.stdout, re.S)
    assert m, res.stdout[-2000:]
    report = json.loads(html.unescape(m.group(1)))
    assert report["error"].startswith("415:") and "not an image" in report["error"]
    assert 'data-state="error"' in res.stdout
