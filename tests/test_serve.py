"""`seesay serve`: the API started for real on a loopback port, every endpoint and error status,
request batching, and results equal to `caption_images` on the same images."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from seesay import cli
from seesay.captioner import caption_images
from seesay.checkpoint import load_checkpoint, save_checkpoint
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.decoding import Beam, Greedy
from seesay.model import build_model

pytest.importorskip("starlette")  # the serve extra (installed with dev)
httpx = pytest.importorskip("httpx")

torch.set_num_threads(1)
WORDS = ["a", "red", "blue", "circle", "square", "on", "white"]


# ---- helpers shared with test_serve_page.py -----------------------------------------------------


def make_checkpoint(root: Path, *, peaky_attention: bool = False) -> Path:
    """RUN/best: a tiny small-CNN + soft-attention captioner, with a run's metrics.jsonl beside it and
    a prepared-data manifest its config points at (what /v1/model reports)."""
    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *WORDS])
    spec = {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 4, "image_size": 32},
            "decoder": {"name": "soft_attention", "vocab_size": len(vocab), "embed_dim": 16, "attention_dim": 16,
                        "decoder_dim": 16, "dropout": 0.0}}
    model = build_model(spec, tokenizer=vocab, image_size=32).eval()
    with torch.no_grad():
        for special in (vocab.pad_id, vocab.bos_id, vocab.unk_id):  # an untrained model would say them
            model.decoder.fc.bias[special] = -10.0
        if peaky_attention:  # one grid cell clearly wins, so the page's heat map has a clear peak
            model.decoder.attention.score.weight *= 600
    data = root / "data"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"format": "karpathy", "lang": "en",
                                                    "splits": {"train": {"images": 18, "captions": 90}}}))
    run = root / "run"
    path = save_checkpoint(run / "best", model=model, config={
        "data": {"path": str(data), "train_split": "train", "val_split": "val"},
        "train": {"select_metric": "CIDEr"}})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"epoch": 1, "step": 10, "val": {"CIDEr": 0.5, "Bleu_4": 0.1}},
        {"epoch": 2, "step": 20, "val": {"CIDEr": 0.9, "Bleu_4": 0.2}},
        {"epoch": 3, "step": 30, "val": {"CIDEr": 0.7, "Bleu_4": 0.3}}]) + "\n")
    return path


def png_bytes(seed: int, size: tuple[int, int] = (40, 48), fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@contextlib.contextmanager
def running_server(app):
    """The app on uvicorn in a thread, on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.01)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def serve_checkpoint(path: Path, **settings):
    from seesay.serve.app import Settings, create_app, model_info

    ck = load_checkpoint(path)
    s = Settings(**settings)
    s.info = model_info(ck, path)
    return ck, create_app(ck.model, s)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ckpt_path):
    """The default server (small upload and pixel limits, so 413s are cheap to provoke)."""
    ck, app = serve_checkpoint(ckpt_path, max_upload_mb=0.05, max_pixels=250_000, max_batch=8, max_wait_ms=5)
    with running_server(app) as url:
        yield ck, url


def post(url: str, **kw):
    return httpx.post(url, timeout=30, **kw)


# ---- endpoints ---------------------------------------------------------------------------------


def test_healthz_model_and_page(server):
    ck, url = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    m = httpx.get(f"{url}/v1/model").json()
    assert m["family"] == "encoder_decoder" and m["encoder"] == "small_cnn" and m["decoder"] == "soft_attention"
    assert m["parameters"]["total"] == sum(p.numel() for p in ck.model.parameters())
    assert m["parameters"]["encoder"] + m["parameters"]["decoder"] == m["parameters"]["total"]
    assert m["tokenizer"] == {"kind": "word", "size": len(ck.tokenizer)}
    assert m["training_data"]["name"] == "data" and m["training_data"]["splits"]["train"]["images"] == 18
    assert m["metrics"]["best"]["step"] == 20 and m["metrics"]["last"]["step"] == 30
    assert m["checkpoint"] == "run/best"  # no absolute paths in a public answer
    assert {"batches", "images", "mean_batch_size", "requests", "in_progress", "errors"} <= set(m["serving"])
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<canvas" in page.text and "/v1/caption" in page.text


def test_unknown_route_and_method_are_json(server):
    _, url = server
    r = httpx.get(f"{url}/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{url}/v1/caption")
    assert r.status_code == 405 and "error" in r.json()


def _expect(ck, image: bytes, strategy, n: int = 1):
    out = caption_images(ck.model, [image], strategy, num_captions=n)[0]
    return out if n > 1 else [out]


def test_three_upload_forms_give_caption_images_results(server):
    ck, url = server
    img = png_bytes(1)
    want = _expect(ck, img, Beam(3), n=2)
    raw = post(f"{url}/v1/caption?beam_size=3&num_captions=2&attention=true", content=img,
               headers={"Content-Type": "image/png"})
    form = post(f"{url}/v1/caption", files={"file": ("x.png", img, "image/png")},
                data={"beam_size": "3", "num_captions": "2", "attention": "1"})
    js = post(f"{url}/v1/caption", json={"image": base64.b64encode(img).decode(), "beam-size": 3, "num_captions": 2,
                                         "attention": True})
    for r in (raw, form, js):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["caption"] == want[0].caption
        assert [c["tokens"] for c in body["captions"]] == [w.tokens for w in want]
        assert [c["score"] for c in body["captions"]] == pytest.approx([w.score for w in want], abs=1e-4)
        assert body["grid"] == {"height": 4, "width": 4, "sentinel": False}
        assert body["image"] == {"width": 48, "height": 40, "format": "PNG"}
        assert body["options"]["strategy"] == "beam" and body["options"]["size"] == 3
        for c, w in zip(body["captions"], want):
            att = np.array(c["attention"])
            assert att.shape == (len(w.tokens), 16)
            assert np.allclose(att, w.attention.numpy(), atol=1e-4)
            assert c["words"] == [ck.tokenizer.id_to_token(t) for t in w.tokens]
    plain = post(f"{url}/v1/caption", content=img, headers={"Content-Type": "image/png"}).json()
    assert "attention" not in plain["captions"][0] and "grid" not in plain  # only when asked
    assert plain["caption"] == _expect(ck, img, Beam(5))[0].caption  # seesay caption's default: 5 beams


def test_several_images_in_one_request(server):
    ck, url = server
    imgs = [png_bytes(i) for i in (2, 3, 4)]
    r = post(f"{url}/v1/caption?beam_size=1", json={"images": [base64.b64encode(i).decode() for i in imgs]})
    assert r.status_code == 200, r.text
    got = [x["captions"][0]["tokens"] for x in r.json()["results"]]
    assert got == [c.tokens for c in caption_images(ck.model, imgs, Greedy())]
    r = post(f"{url}/v1/caption", files=[("file", ("a.png", imgs[0], "image/png")), ("file", ("b.png", imgs[1]))])
    assert [x["caption"] for x in r.json()["results"]] == [c.caption for c in caption_images(ck.model, imgs[:2])]


def test_seeded_sampling_is_reproducible(server):
    ck, url = server
    img = png_bytes(5)
    q = "temperature=1.5&seed=7&num_captions=3"
    a, b = (post(f"{url}/v1/caption?{q}", content=img, headers={"Content-Type": "image/png"}).json() for _ in range(2))
    assert [c["tokens"] for c in a["captions"]] == [c["tokens"] for c in b["captions"]]
    assert a["options"]["strategy"] == "sample" and a["options"]["seed"] == 7


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("query, words", [
    ("beam_size=0", "beam_size must be >= 1"),
    ("beam_size=abc", "beam_size must be an integer"),
    ("temperature=0.5&beam_size=3", "cannot be combined"),
    ("num_captions=4&beam_size=2", "more than beam_size 2"),
    ("top_p=1.5", "top_p must be in (0, 1]"),
    ("min_length=9&max_length=3", "min_length 9 is more than max_length 3"),
    ("max_length=5000", "this server's limit"),
    ("beam_size=64", "this server's limit"),
    ("bad_endings=zebra", "none of zebra"),
    ("attention=maybe", "attention must be true or false"),
    ("colour=red", "unknown option 'colour'"),
])
def test_bad_options_are_422(server, query, words):
    _, url = server
    r = post(f"{url}/v1/caption?{query}", content=png_bytes(0), headers={"Content-Type": "image/png"})
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]


def test_option_given_twice_is_422(server):
    _, url = server
    r = post(f"{url}/v1/caption?beam_size=2", json={"image": base64.b64encode(png_bytes(0)).decode(), "beam_size": 3})
    assert r.status_code == 422 and "given twice" in r.json()["error"]


def test_upload_too_large_is_413_before_and_while_reading(server):
    _, url = server
    big = png_bytes(0, size=(200, 200))  # ~120 kB of noise > the 0.05 MiB limit
    r = post(f"{url}/v1/caption", content=big, headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: counted while it streams in
        for i in range(0, len(big), 4096):
            yield big[i: i + 4096]

    r = post(f"{url}/v1/caption", content=chunks(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_too_many_pixels_is_413(server):
    from PIL import Image

    _, url = server
    buf = io.BytesIO()
    Image.new("1", (4000, 4000)).save(buf, "PNG")  # 16 Mpx in ~2 kB: refused from its header
    assert len(buf.getvalue()) < 0.05 * 2**20
    r = post(f"{url}/v1/caption", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "too many pixels" in r.json()["error"]


@pytest.mark.parametrize("body, ctype, status, words", [
    (b"hello", "text/plain", 415, "Content-Type 'text/plain'"),
    (b"", None, 415, "no Content-Type"),
    (b"hello, not a picture", "image/png", 415, "not an image"),
    (b"", "image/png", 400, "empty"),
    (None, "image/png", 400, "truncated"),
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"image": "%%%"}', "application/json", 400, "not valid base64"),
    (b'{"beam_size": 2}', "application/json", 422, "no image"),
    (b"--x\r\nbroken", "multipart/form-data; boundary=x", 422, "no image"),
])
def test_unreadable_uploads(server, body, ctype, status, words):
    _, url = server
    if body is None:
        body = png_bytes(0)[:300]  # a PNG cut short
    headers = {"Content-Type": ctype} if ctype else {}
    r = post(f"{url}/v1/caption", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_a_bad_image_does_not_affect_its_neighbours(server):
    ck, url = server
    good = [png_bytes(i) for i in range(10, 14)]
    bodies = [*good, b"garbage"]
    out: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        out[i] = post(f"{url}/v1/caption?beam_size=1", content=bodies[i], headers={"Content-Type": "image/png"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[len(good)].status_code == 415
    want = caption_images(ck.model, good, Greedy())
    assert [out[i].json()["captions"][0]["tokens"] for i in range(len(good))] == [w.tokens for w in want]


# ---- batching ----------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_equal_caption_images(ckpt_path):
    # a long wait window, closed as soon as a batch is full: 12 clients form batches of up to 4
    ck, app = serve_checkpoint(ckpt_path, max_batch=4, max_wait_ms=1000)
    images = [png_bytes(100 + i) for i in range(12)]
    out: dict[int, dict] = {}
    with running_server(app) as url:
        start = threading.Barrier(len(images))

        def send(i: int) -> None:
            start.wait()
            r = post(f"{url}/v1/caption?beam_size=2", content=images[i], headers={"Content-Type": "image/png"})
            out[i] = r.json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = httpx.get(f"{url}/v1/model").json()["serving"]
    assert stats["images"] == 12 and stats["errors"] == {}
    assert stats["mean_batch_size"] > 1 and stats["batches"] < 12 and stats["largest_batch"] <= 4
    want = caption_images(ck.model, images, Beam(2))
    for i, w in enumerate(want):
        assert out[i]["captions"][0]["tokens"] == w.tokens
        assert out[i]["captions"][0]["score"] == pytest.approx(w.score, abs=1e-4)


def test_batcher_groups_by_options_and_isolates_a_failing_request():
    from seesay.serve.batcher import Batcher, Job

    calls: list[list[str]] = []

    def run(_captioner, jobs, _max_batch):
        names = [im for j in jobs for im in j.images]
        calls.append(names)
        if "poison" in names:
            raise RuntimeError("poison")
        return [[f"caption of {im}" for im in j.images] for j in jobs]

    b = Batcher(None, max_batch=4, max_wait_s=0.5, run=run)
    far = time.monotonic() + 60
    jobs = [Job(images=[name], decoding=None, key=key, deadline=far)
            for name, key in [("a", "greedy"), ("b", "beam"), ("c", "greedy"), ("poison", "greedy"), ("d", "beam")]]
    for j in jobs:  # queued before the worker starts: deterministic groups
        b.submit(j)
    b.start()
    try:
        results = [j.future.exception(timeout=10) or j.future.result() for j in jobs]
    finally:
        b.stop()
    assert calls[0] == ["a", "c", "poison"]  # the oldest job's options first, in arrival order
    assert sorted(calls[1:4]) == [["a"], ["c"], ["poison"]]  # the failed batch retried one by one
    assert calls[4] == ["b", "d"]
    assert results[0] == ["caption of a"] and results[2] == ["caption of c"] and results[1] == ["caption of b"]
    assert isinstance(results[3], RuntimeError)
    s = b.stats()
    assert s["failed"] == 1 and s["images"] == 4


def test_the_batcher_keeps_one_weight_packing_block_for_its_life():
    """The served weights never change, so the worker packs each for oneDNN once, not once per call."""
    from seesay.layers import gemm
    from seesay.serve.batcher import Batcher, Job

    blocks = []

    def run(_captioner, jobs, _max_batch):
        blocks.append(gemm._SCOPE.get())
        return [[None for _ in j.images] for j in jobs]

    b = Batcher(None, max_batch=1, max_wait_s=0.0, run=run)
    jobs = [Job(images=["x"], decoding=None, key=0, deadline=time.monotonic() + 60) for _ in range(2)]
    for j in jobs:
        b.submit(j)
    b.start()
    try:
        for j in jobs:
            j.future.result(timeout=10)
    finally:
        b.stop()
    assert len(blocks) == 2 and blocks[0] is not None and blocks[1] is blocks[0]
    assert gemm._SCOPE.get() is None  # the block is the worker thread's own


def test_batcher_respects_max_batch_and_drops_expired_and_cancelled_jobs():
    from seesay.serve.batcher import Batcher, Expired, Job

    sizes: list[int] = []

    def run(_captioner, jobs, _max_batch):
        sizes.append(sum(j.cost for j in jobs))
        return [[None] * len(j.images) for j in jobs]

    b = Batcher(None, max_batch=3, max_wait_s=0.0, run=run)
    far = time.monotonic() + 60
    ok = [Job(images=[1], decoding=None, key="k", deadline=far, cost=c) for c in (2, 1, 2, 1)]
    expired = Job(images=[1], decoding=None, key="k", deadline=time.monotonic() - 1)
    cancelled = Job(images=[1], decoding=None, key="k", deadline=far)
    for j in (ok[0], expired, cancelled, *ok[1:]):
        b.submit(j)
    cancelled.future.cancel()
    b.start()
    try:
        for j in ok:
            j.future.result(timeout=10)
        assert isinstance(expired.future.exception(timeout=10), Expired)
    finally:
        b.stop()
    assert max(sizes) <= 3 and sum(sizes) == 6
    assert b.stats()["expired"] == 1 and b.stats()["cancelled"] == 1


# ---- 503 and 504 -------------------------------------------------------------------------------


class BlockingCaptioner:
    """A captioner whose generate waits for `release` (a slow or stuck model)."""

    def __init__(self, model):
        self._model = model
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(30)
        return self._model.generate(*args, **kwargs)


def test_full_queue_is_503_and_slow_answer_is_504(ckpt_path):
    from seesay.serve.app import Settings, create_app

    ck = load_checkpoint(ckpt_path)
    slow = BlockingCaptioner(ck.model)
    app = create_app(slow, Settings(queue_size=1, timeout_s=1.0, max_wait_ms=0))
    img = png_bytes(0)
    with running_server(app) as url:
        first: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: first.update(r=post(f"{url}/v1/caption", content=img,
                                                                  headers={"Content-Type": "image/png"})))
        t.start()
        assert slow.entered.wait(20), "the first request never reached the model"
        busy = post(f"{url}/v1/caption", content=img, headers={"Content-Type": "image/png"})
        assert busy.status_code == 503 and "busy" in busy.json()["error"]
        assert busy.headers["Retry-After"] == "1"
        t.join(30)
        assert first["r"].status_code == 504 and "timeout" in first["r"].json()["error"]
        slow.release.set()  # the stuck work finishes; its result is dropped
        for _ in range(200):
            stats = httpx.get(f"{url}/v1/model").json()["serving"]
            if stats["running"] == 0:
                break
            time.sleep(0.05)
        assert stats["in_progress"] == 0 and stats["running"] == 0
        again = post(f"{url}/v1/caption", content=img, headers={"Content-Type": "image/png"})
        assert again.status_code == 200  # the server recovered
        assert again.json()["caption"] == caption_images(ck.model, [img], Beam(5))[0].caption
        assert stats["errors"] == {"503": 1, "504": 1}


def test_queued_requests_past_their_deadline_never_run(ckpt_path):
    from seesay.serve.app import Settings, create_app

    ck = load_checkpoint(ckpt_path)
    slow = BlockingCaptioner(ck.model)
    app = create_app(slow, Settings(queue_size=8, timeout_s=1.0, max_wait_ms=0, max_batch=1))
    with running_server(app) as url:
        results: list[int] = []
        threads = [threading.Thread(target=lambda i=i: results.append(post(
            f"{url}/v1/caption", content=png_bytes(i), headers={"Content-Type": "image/png"}).status_code))
            for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [504, 504, 504]
        slow.release.set()
        for _ in range(200):
            stats = httpx.get(f"{url}/v1/model").json()["serving"]
            if stats["running"] == 0 and stats["cancelled"] + stats["expired"] + stats["batches"] >= 3:
                break
            time.sleep(0.05)
    assert stats["batches"] == 1  # only the one already in the model ran; the queued two were dropped
    assert stats["cancelled"] + stats["expired"] == 2


# ---- the command -------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, words", [
    ("--max-batch", "0", "--max-batch must be >= 1"),
    ("--timeout-s", "0", "--timeout-s must be > 0"),
    ("--port", "70000", "--port must be at most 65535"),
    ("--max-wait-ms", "-1", "--max-wait-ms must be >= 0"),
])
def test_serve_flags_are_checked(ckpt_path, capsys, flag, value, words):
    assert cli.main(["serve", "--checkpoint", str(ckpt_path), flag, value]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_serve_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1


def test_serve_port_in_use_is_one_line(ckpt_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--checkpoint", str(ckpt_path), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen" in err and len(err.strip().splitlines()) == 1


def test_request_options_are_the_caption_flags():
    """Names, defaults and types come from `seesay caption`'s parser: a renamed flag fails here."""
    from seesay.serve.options import DECODING_OPTIONS, defaults

    d = defaults()
    assert set(d) == {*DECODING_OPTIONS, "attention"}
    assert d["beam_size"] is None and d["max_length"] == 50 and d["attention"] is False
