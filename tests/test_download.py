"""`seesay download` against a local HTTP server on 127.0.0.1 that the tests start."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from seesay.cli import main
from seesay.data import download as dl
from seesay.data.download import RemoteFile, download_dataset, extract_archive, fetch, load_manifest
from seesay.errors import SeesayError


class Server:
    """Serves `files` with Range support; misbehaves on request.

    fail[path] = n: answer HTTP 500 the next n times; drop[path] = k: on the next request send
    the full Content-Length but only k bytes, then close; corrupt: paths served with flipped
    bytes; ignore_range: answer 200 with the whole body even to a Range request.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}
        self.drop: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                path = self.path
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                if server.fail.get(path, 0) > 0:
                    server.fail[path] -= 1
                    self.send_error(500, "boom")
                    return
                if path not in server.files:
                    self.send_error(404, "not found")
                    return
                body = server.files[path]
                if path in server.corrupt:
                    body = bytes(b ^ 0x5A if i % 97 == 3 else b for i, b in enumerate(body))
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                chunk = body[start:]
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if path in server.drop:
                    k = server.drop.pop(path)
                    self.wfile.write(chunk[:k])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def add(self, name: str, data: bytes) -> str:
        self.files["/" + name] = data
        return f"{self.base}/{name}"

    def count(self, name: str) -> int:
        return sum(1 for p, _ in self.requests if p == "/" + name)


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def blob(n: int, seed: int = 0) -> bytes:
    out, x = bytearray(), seed
    while len(out) < n:
        x = hashlib.sha256(x.to_bytes(8, "little") if isinstance(x, int) else x).digest()
        out += x
    return bytes(out[:n])


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


FAST = {"retry_delay": 0.001, "timeout": 10, "progress": False}


# ----------------------------------------------------------------------------- downloads


def test_download_verifies_and_second_run_skips(server, tmp_path):
    data = blob(300_000)
    f = RemoteFile(server.add("a.bin", data), len(data), md5(data))
    path = fetch(f, tmp_path, **FAST)
    assert path == tmp_path / "a.bin" and path.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    mtime = path.stat().st_mtime_ns
    fetch(f, tmp_path, **FAST)
    assert server.count("a.bin") == 1  # complete: no second request, no re-download
    assert path.stat().st_mtime_ns == mtime


def test_interrupted_download_resumes_with_range(server, tmp_path):
    data = blob(1_000_000, seed=1)
    url = server.add("big.bin", data)
    server.drop["/big.bin"] = 400_000  # the connection dies 40% of the way
    path = fetch(RemoteFile(url, len(data), md5(data)), tmp_path, **FAST)
    assert path.read_bytes() == data
    ranges = [r for p, r in server.requests if p == "/big.bin"]
    assert ranges[0] is None and ranges[1] == "bytes=400000-"


def test_killed_download_resumes_from_part_file(server, tmp_path):
    data = blob(500_000, seed=2)
    url = server.add("k.bin", data)
    (tmp_path / "k.bin.part").write_bytes(data[:123_456])  # what a killed run left
    path = fetch(RemoteFile(url, None, md5(data)), tmp_path, **FAST)
    assert path.read_bytes() == data
    assert server.requests == [("/k.bin", "bytes=123456-")]


def test_part_already_complete_and_server_ignoring_range(server, tmp_path):
    data = blob(50_000, seed=3)
    url = server.add("c.bin", data)
    # a complete .part with unknown size: the server answers 416, the file is kept
    (tmp_path / "c.bin.part").write_bytes(data)
    assert fetch(RemoteFile(url), tmp_path, **FAST).read_bytes() == data
    # a server that ignores Range: start over instead of appending the whole body again
    server.ignore_range = True
    url2 = server.add("d.bin", data)
    (tmp_path / "d.bin.part").write_bytes(data[:1000])
    assert fetch(RemoteFile(url2, len(data)), tmp_path, **FAST).read_bytes() == data


def test_server_errors_retried_then_reported(server, tmp_path):
    data = blob(10_000, seed=4)
    url = server.add("e.bin", data)
    server.fail["/e.bin"] = 2
    assert fetch(RemoteFile(url, len(data)), tmp_path, retries=3, **FAST).read_bytes() == data
    assert server.count("e.bin") == 3

    url = server.add("f.bin", data)
    server.fail["/f.bin"] = 100
    with pytest.raises(SeesayError, match=r"f\.bin: giving up after 4 failed attempts in a row: HTTP 500"):
        fetch(RemoteFile(url, len(data)), tmp_path, retries=3, **FAST)
    assert server.count("f.bin") == 4
    assert not (tmp_path / "f.bin").exists()

    # a client error is not retried
    with pytest.raises(SeesayError, match="HTTP 404"):
        fetch(RemoteFile(f"{server.base}/missing.bin"), tmp_path, retries=3, **FAST)
    assert server.count("missing.bin") == 1


def test_unreachable_server_reports_clearly(tmp_path):
    with pytest.raises(SeesayError, match="cannot connect"):
        fetch(RemoteFile("http://127.0.0.1:9/x.zip"), tmp_path, retries=1, **FAST)


def test_corrupt_download_detected(server, tmp_path):
    data = blob(20_000, seed=5)
    url = server.add("g.bin", data)
    server.corrupt.add("/g.bin")
    with pytest.raises(SeesayError, match="corrupt .*md5"):
        fetch(RemoteFile(url, len(data), md5(data)), tmp_path, **FAST)
    assert not (tmp_path / "g.bin").exists() and not (tmp_path / "g.bin.part").exists()
    # wrong size announced by the server: refused before writing
    with pytest.raises(SeesayError, match="expected 999"):
        fetch(RemoteFile(url, 999), tmp_path, **FAST)


def test_existing_file_that_does_not_match_is_replaced(server, tmp_path):
    data = blob(30_000, seed=6)
    url = server.add("h.bin", data)
    (tmp_path / "h.bin").write_bytes(b"x" * len(data))  # right size, wrong content
    assert fetch(RemoteFile(url, len(data), md5(data)), tmp_path, **FAST).read_bytes() == data


# ----------------------------------------------------------------------------- extraction


def test_extract_zip_resumes_and_marks(tmp_path):
    archive = tmp_path / "x.zip"
    archive.write_bytes(make_zip({"d/a.txt": b"alpha", "d/sub/b.txt": b"beta" * 100, "c.txt": b""}))
    out = tmp_path / "out"
    assert extract_archive(archive, out, progress=False) is True
    assert (out / "d/a.txt").read_bytes() == b"alpha" and (out / "d/sub/b.txt").read_bytes() == b"beta" * 100
    assert extract_archive(archive, out, progress=False) is False  # marker: skipped
    # an interrupted extraction (no marker, one file missing, one half-written) resumes
    (out / dl.STATE_DIR / "x.zip.extracted").unlink()
    (out / "d/a.txt").unlink()
    (out / "d/sub/b.txt").write_bytes(b"be")
    assert extract_archive(archive, out, progress=False) is True
    assert (out / "d/a.txt").read_bytes() == b"alpha" and (out / "d/sub/b.txt").read_bytes() == b"beta" * 100


def test_extract_tar(tmp_path):
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in {"x/1.txt": b"one", "x/2.txt": b"two"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    extract_archive(archive, tmp_path / "o", progress=False)
    assert (tmp_path / "o/x/2.txt").read_bytes() == b"two"


def test_corrupt_archive_detected(tmp_path):
    good = make_zip({"a.txt": blob(50_000, seed=7)})
    bad = bytearray(good)
    bad[len(good) // 3] ^= 0xFF  # inside the compressed data
    (tmp_path / "bad.zip").write_bytes(bytes(bad))
    with pytest.raises(SeesayError, match="corrupt"):
        extract_archive(tmp_path / "bad.zip", tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / dl.STATE_DIR / "bad.zip.extracted").exists()
    (tmp_path / "trunc.zip").write_bytes(good[: len(good) // 2])
    with pytest.raises(SeesayError, match="corrupt"):
        extract_archive(tmp_path / "trunc.zip", tmp_path / "o", progress=False)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tf:
        info = tarfile.TarInfo("a.bin")
        data = blob(100_000, seed=8)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "trunc.tar.gz").write_bytes(raw.getvalue()[: len(raw.getvalue()) // 2])
    with pytest.raises(SeesayError, match="corrupt"):
        extract_archive(tmp_path / "trunc.tar.gz", tmp_path / "o", progress=False)


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "/tmp/seesay_evil.txt", "..\\evil.txt"])
def test_path_traversal_refused_zip(tmp_path, name):
    archive = tmp_path / "trav.zip"
    archive.write_bytes(make_zip({"fine.txt": b"fine", name: b"evil"}))
    out = tmp_path / "a" / "out"
    with pytest.raises(SeesayError, match="refusing unsafe member"):
        extract_archive(archive, out, progress=False)
    assert not (out / "fine.txt").exists()  # nothing extracted at all
    assert not (tmp_path / "a" / "evil.txt").exists()
    assert not Path("/tmp/seesay_evil.txt").exists()


def test_links_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    (tmp_path / "l.zip").write_bytes(buf.getvalue())
    with pytest.raises(SeesayError, match="links"):
        extract_archive(tmp_path / "l.zip", tmp_path / "o", progress=False)
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        archive = tmp_path / f"l{kind!r}.tar"
        with tarfile.open(archive, "w") as tf:
            info = tarfile.TarInfo("link")
            info.type = kind
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        with pytest.raises(SeesayError, match="links"):
            extract_archive(archive, tmp_path / "o", progress=False)
    # a symlink already inside the output directory cannot be used to escape it
    out = tmp_path / "o2"
    out.mkdir()
    (out / "escape").symlink_to(tmp_path)
    (tmp_path / "s.zip").write_bytes(make_zip({"escape/evil.txt": b"x"}))
    with pytest.raises(SeesayError, match="outside"):
        extract_archive(tmp_path / "s.zip", out, progress=False)
    assert not (tmp_path / "evil.txt").exists()


# ----------------------------------------------------------------------------- datasets


def coco_archives() -> dict[str, bytes]:
    ann = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg"}], "annotations": []}
    return {
        "train2014.zip": make_zip({"train2014/COCO_train2014_000000000001.jpg": b"jpg1"}),
        "val2014.zip": make_zip({"val2014/COCO_val2014_000000000002.jpg": b"jpg2"}),
        "annotations_trainval2014.zip": make_zip(
            {
                "annotations/captions_train2014.json": json.dumps(ann).encode(),
                "annotations/captions_val2014.json": json.dumps(ann).encode(),
            }
        ),
        "caption_datasets.zip": make_zip(
            {"dataset_coco.json": b'{"images": []}', "dataset_flickr8k.json": b'{"images": []}'}
        ),
    }


def write_manifest(server: Server, tmp_path: Path, archives: dict[str, bytes], *, sizes=True) -> Path:
    entries = []
    for name, data in archives.items():
        url = server.add(name, data)
        entries.append(
            {"url": url, "size": len(data) if sizes else None, "md5": md5(data) if sizes else None}
        )
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(entries))
    return path


def test_coco_layout_via_manifest_and_rerun_skips(server, tmp_path):
    manifest = write_manifest(server, tmp_path, coco_archives())
    out = tmp_path / "coco"
    server.drop["/train2014.zip"] = 100  # one interruption on the way
    summary = download_dataset("coco", out, extract=True, manifest=manifest, **FAST)
    assert "ready: seesay prepare --format coco" in summary
    assert (out / "annotations/captions_train2014.json").is_file()
    assert (out / "annotations/captions_val2014.json").is_file()
    assert (out / "train2014/COCO_train2014_000000000001.jpg").read_bytes() == b"jpg1"
    assert (out / "val2014/COCO_val2014_000000000002.jpg").is_file()
    assert (out / "dataset_coco.json").is_file()
    assert not list(out.glob("*.zip"))  # archives removed without --keep-archives
    n = len(server.requests)
    summary = download_dataset("coco", out, extract=True, manifest=manifest, **FAST)
    assert len(server.requests) == n  # nothing fetched again
    assert summary.count("already extracted") == 4
    download_dataset("coco", out, manifest=manifest, **FAST)  # without --extract: still nothing fetched
    assert len(server.requests) == n


def test_keep_archives_and_download_only(server, tmp_path):
    manifest = write_manifest(server, tmp_path, coco_archives(), sizes=False)
    out = tmp_path / "coco"
    summary = download_dataset("coco", out, manifest=manifest, **FAST)
    assert "--extract" in summary and len(list(out.glob("*.zip"))) == 4
    assert not (out / "train2014").exists()
    n = len(server.requests)
    download_dataset("coco", out, extract=True, keep_archives=True, manifest=manifest, **FAST)
    assert len(server.requests) == n  # the downloaded archives are reused
    assert len(list(out.glob("*.zip"))) == 4 and (out / "val2014").is_dir()


def test_karpathy_json_in_subfolder_is_lifted(server, tmp_path):
    archives = {"caption_datasets.zip": make_zip({"caption_datasets/dataset_flickr8k.json": b"{}"})}
    manifest = write_manifest(server, tmp_path, archives)
    download_dataset("flickr8k", tmp_path / "f8", extract=True, manifest=manifest, **FAST)
    assert (tmp_path / "f8" / "dataset_flickr8k.json").is_file()


def test_mirror_replaces_base_url():
    files = dl.with_mirror(dl.coco_files(["train2014", "val2014", "test2014"]), "https://m.example.org/c/")
    assert [f.url for f in files] == [
        "https://m.example.org/c/train2014.zip",
        "https://m.example.org/c/val2014.zip",
        "https://m.example.org/c/test2014.zip",
        "https://m.example.org/c/annotations_trainval2014.zip",
        "https://m.example.org/c/caption_datasets.zip",
    ]
    assert files[0].size == 13510573713  # sizes and checksums travel with the name
    with pytest.raises(SeesayError, match="unknown COCO split"):
        dl.coco_files(["train2017"])


def test_mirror_download(server, tmp_path):
    data = blob(1000, seed=9)
    server.add("val2014.zip", data)
    (f,) = dl.with_mirror(
        [RemoteFile("http://images.cocodataset.org/zips/val2014.zip", len(data))], server.base
    )
    assert fetch(f, tmp_path, **FAST).read_bytes() == data


def test_manifest_errors(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('[{"url": "http://x/a.zip", "size": 3}')
    with pytest.raises(SeesayError, match=r"m\.json: malformed JSON at line 1"):
        load_manifest(p)
    p.write_text('[{"url": "http://x/a.zip", "size": "big"}]')
    with pytest.raises(SeesayError, match="size"):
        load_manifest(p)
    p.write_text('[{"url": "http://x/a.zip", "md5": "nope"}]')
    with pytest.raises(SeesayError, match="md5"):
        load_manifest(p)
    p.write_text('[{"url": "http://x/a.zip"}, {"url": "http://y/a.zip"}]')
    with pytest.raises(SeesayError, match="same name"):
        load_manifest(p)
    p.write_text('[{"url": "http://x/"}]')
    with pytest.raises(SeesayError, match="file name"):
        load_manifest(p)
    with pytest.raises(SeesayError, match="not found"):
        load_manifest(tmp_path / "none.json")


def test_cli(server, tmp_path, capsys):
    manifest = write_manifest(
        server, tmp_path, {"caption_datasets.zip": coco_archives()["caption_datasets.zip"]}
    )
    rc = main(
        ["download", "flickr30k", "--output-dir", str(tmp_path / "f30"), "--manifest", str(manifest),
         "--extract", "--no-progress", "--retry-delay", "0.001"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "caption_datasets.zip: downloaded and extracted" in out and "request form" in out
    rc = main(["download", "aichallenger", "--output-dir", str(tmp_path / "ai")])
    out = capsys.readouterr().out
    assert rc == 0 and "registration" in out and "caption_train_annotations_20170902.json" in out
    assert not (tmp_path / "ai").exists()  # nothing downloaded
    # failures are one line, no traceback
    server.fail["/caption_datasets.zip"] = 100
    rc = main(
        ["download", "coco", "--output-dir", str(tmp_path / "c2"), "--manifest", str(manifest),
         "--no-progress", "--retries", "1", "--retry-delay", "0.001"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "giving up after 2 failed attempts" in err and "Traceback" not in err


def test_downloaded_coco_layout_is_what_prepare_reads(server, tmp_path):
    prepare = pytest.importorskip("seesay.data.prepare")
    from PIL import Image

    def jpg(color) -> bytes:
        b = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(b, "JPEG")
        return b.getvalue()

    train = {f"train2014/COCO_train2014_{i:012d}.jpg": jpg((i * 20, 100, 50)) for i in range(1, 7)}
    val = {f"val2014/COCO_val2014_{i:012d}.jpg": jpg((50, i, 100)) for i in range(101, 105)}

    def captions(files) -> bytes:
        imgs = [
            {"id": int(n[-16:-4]), "file_name": n.split("/")[1], "width": 40, "height": 30} for n in files
        ]
        anns = [
            {"id": k * 10 + j, "image_id": im["id"], "caption": f"a photo number {j} of a thing"}
            for k, im in enumerate(imgs)
            for j in range(5)
        ]
        return json.dumps({"images": imgs, "annotations": anns}).encode()

    karpathy = {"images": []}
    for n in [*train, *val]:
        iid = int(n[-16:-4])
        sub, fn = n.split("/")
        split = {101: "test", 102: "val"}.get(iid, "train")
        sent = [{"raw": "a photo of a thing", "tokens": ["a", "photo", "of", "a", "thing"]}]
        karpathy["images"].append(
            {"filepath": sub, "filename": fn, "cocoid": iid, "split": split, "sentences": sent}
        )
    archives = {
        "train2014.zip": make_zip(train),
        "val2014.zip": make_zip(val),
        "annotations_trainval2014.zip": make_zip(
            {
                "annotations/captions_train2014.json": captions(train),
                "annotations/captions_val2014.json": captions(val),
            }
        ),
        "caption_datasets.zip": make_zip({"dataset_coco.json": json.dumps(karpathy).encode()}),
    }
    manifest = write_manifest(server, tmp_path, archives)
    download_dataset("coco", tmp_path / "coco", extract=True, manifest=manifest, **FAST)
    man = prepare.prepare_dataset(
        "coco", tmp_path / "prep", coco_dir=tmp_path / "coco", min_word_freq=1, image_size=32, workers=1,
        progress=False,
    )  # fmt: skip
    assert {k: v["images"] for k, v in man["splits"].items() if v["images"]} == {
        "train": 8,
        "val": 1,
        "test": 1,
    }
