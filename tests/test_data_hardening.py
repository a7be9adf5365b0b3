"""Issue 18, data side: bad input to `seesay prepare` / `seesay download` and damaged prepared data.

Every case runs through `seesay.cli.main` and checks the exit code (2), that stderr is exactly one
`seesay <verb>: error: ...` line (no traceback), and that nothing already done is lost: a partial
build resumes without redoing finished chunks, a prepared dataset is left byte for byte as it was.
Image paths that lead outside `--images` are skipped without ever being opened (the image reader is
wrapped to record every path it is given), and `file://` manifests copy nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seesay import cli
from seesay.data import prepare as prep
from seesay.data.download import RemoteFile, fetch
from seesay.data.store import open_prepared
from seesay.errors import SeesayError

COLORS = ["red", "green", "blue", "yellow"]


# -- helpers -------------------------------------------------------------------------------------
def _img(path: Path, i: int, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(rc: int, err: str, verb: str, *needles: str) -> str:
    """Exit 2 and exactly one `seesay VERB: error:` line on stderr containing every needle."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"seesay {verb}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def opened(monkeypatch):
    """Every path `seesay prepare`'s image reader is given (workers=1: all in this process)."""
    paths: list[str] = []
    real = prep.read_image

    def read_image(path, *args, **kwargs):
        paths.append(os.path.realpath(str(path)))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prep, "read_image", read_image)
    return paths


PREP = ("--image-size", "8", "--min-word-freq", "1", "--workers", "1", "--no-progress")


def _karpathy(tmp_path: Path, n: int = 10, split=lambda i: "train" if i < 6 else ("val" if i < 8 else "test"),
              *, folder: str = "imgs", extra: list[dict] | None = None) -> tuple[Path, Path]:
    """dataset.json beside an image folder (n images, 2 captions each)."""
    root = tmp_path / folder
    images = []
    for i in range(n):
        _img(root / f"{i:03d}.png", i)
        images.append({"filename": f"{i:03d}.png", "split": split(i),
                       "sentences": [{"raw": f"a {COLORS[i % 4]} thing"}, {"raw": "a small thing"}]})
    ann = tmp_path / "dataset.json"
    ann.write_text(json.dumps({"images": images + (extra or [])}))
    return ann, root


# -- 1. image paths confined to --images ---------------------------------------------------------
ATTACKS = ("dotdot", "nested", "absolute", "symlink", "symlink_dir", "filepath")
FORMATS = ("pairs", "karpathy", "aichallenger", "coco")


def _attack_name(kind: str, root: Path, secret: Path) -> tuple[str, str]:
    """(filepath, name) an annotation file uses to reach `secret` from `root`."""
    rel = os.path.relpath(secret, root)
    if kind == "dotdot":
        return "", rel
    if kind == "nested":
        (root / "a").mkdir(exist_ok=True)
        return "", "a/../" + rel
    if kind == "absolute":
        return "", str(secret)
    if kind == "symlink":
        (root / "link.png").symlink_to(secret)
        return "", "link.png"
    if kind == "symlink_dir":
        (root / "ext").symlink_to(secret.parent, target_is_directory=True)
        return "", "ext/" + secret.name
    return os.path.relpath(secret.parent, root), secret.name  # karpathy's filepath leads out


def _dataset(tmp_path: Path, fmt: str, bad: tuple[str, str] | None, n: int = 8) -> tuple[list[str], Path]:
    """CLI arguments preparing `n` good images plus one at (filepath, name) = `bad`; and the image root."""
    if fmt == "coco":
        coco = tmp_path / "coco"
        root = coco / "train2014"
    else:
        root = tmp_path / "imgs"
    root.mkdir(parents=True, exist_ok=True)
    names = [("", f"g{i}.png") for i in range(n)]
    for i in range(n):
        _img(root / f"g{i}.png", i)
    if bad is not None:
        names.append(bad)
    if fmt == "coco":
        anns = coco / "annotations"
        anns.mkdir()
        images = [{"id": k + 1, "file_name": os.path.join(fp, name)} for k, (fp, name) in enumerate(names)]
        caps = [{"id": k, "image_id": k + 1, "caption": f"a {COLORS[k % 4]} thing"} for k in range(len(names))]
        (anns / "captions_train2014.json").write_text(json.dumps({"images": images, "annotations": caps}))
        return ["--format", "coco", "--coco-dir", coco], root
    ann = tmp_path / "ann.json"
    if fmt == "pairs":
        data = [{"image": os.path.join(fp, name), "text": f"a {COLORS[k % 4]} thing", "split": "train"}
                for k, (fp, name) in enumerate(names)]
    elif fmt == "aichallenger":
        data = [{"image_id": os.path.join(fp, name), "caption": ["一只猫", "一只狗"], "split": "train"}
                for k, (fp, name) in enumerate(names)]
    else:
        data = {"images": [{"filepath": fp, "filename": name, "split": "train",
                            "sentences": [{"raw": f"a {COLORS[k % 4]} thing"}]} for k, (fp, name) in enumerate(names)]}
    ann.write_text(json.dumps(data, ensure_ascii=False))
    return ["--format", fmt, "--annotations", ann, "--images", root], root


def _secret(tmp_path: Path) -> Path:
    return _img(tmp_path / "outside" / "secret.png", 99)


@pytest.mark.parametrize("fmt,kind", [(f, k) for f in FORMATS for k in ATTACKS
                                      if k != "filepath" or f == "karpathy"])  # only Karpathy has a filepath
def test_paths_outside_images_are_skipped_unopened(tmp_path, capsys, opened, fmt, kind):
    secret = _secret(tmp_path)
    root = (tmp_path / "coco" / "train2014") if fmt == "coco" else (tmp_path / "imgs")
    root.mkdir(parents=True)
    args, root = _dataset(tmp_path, fmt, _attack_name(kind, root, secret))
    out = tmp_path / "data"
    rc, stdout, err = _run(capsys, "prepare", *args, "--output", out, *PREP, "--max-skip-fraction", "0.5")
    assert rc == 0, err
    assert os.path.realpath(secret) not in opened and len(opened) == 8  # never opened
    flag = "--coco-dir" if fmt == "coco" else "--images"
    (line,) = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert line["reason"].startswith(f"path outside {flag} (resolves to ")
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped_reasons"] == {f"path outside {flag}": 1} and m["splits"]["train"]["images"] == 8
    assert stdout.strip().endswith(f"skipped 1: see {out / 'skipped.jsonl'}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_outside_path_counts_against_max_skip_fraction(tmp_path, capsys, opened, fmt):
    secret = _secret(tmp_path)
    root = (tmp_path / "coco" / "train2014") if fmt == "coco" else (tmp_path / "imgs")
    root.mkdir(parents=True)
    args, _ = _dataset(tmp_path, fmt, ("", os.path.relpath(secret, root)))
    rc, _, err = _run(capsys, "prepare", *args, "--output", tmp_path / "data", *PREP)
    _one_line(rc, err, "prepare", "1 of 9 images", "path outside --")
    assert os.path.realpath(secret) not in opened
    assert not (tmp_path / "data").exists() and (tmp_path / "data.partial" / "skipped.jsonl").is_file()


def test_etc_passwd_is_never_opened(tmp_path, capsys, opened, monkeypatch):
    import builtins

    real_open = builtins.open
    seen: list[str] = []

    def spy(file, *a, **k):
        seen.append(os.path.realpath(str(file)) if isinstance(file, (str, os.PathLike)) else "")
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    args, _ = _dataset(tmp_path, "pairs", ("", "../../../../../../../../../../etc/passwd"))
    rc, _, err = _run(capsys, "prepare", *args, "--output", tmp_path / "data", *PREP, "--max-skip-fraction", "0.5")
    assert rc == 0, err
    assert "/etc/passwd" not in opened and "/etc/passwd" not in seen
    assert "path outside --images" in (tmp_path / "data" / "skipped.jsonl").read_text()


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_allow_outside_images_lets_them_through(tmp_path, capsys, opened, kind):
    secret = _secret(tmp_path)
    root = tmp_path / "imgs"
    root.mkdir()
    args, _ = _dataset(tmp_path, "pairs", _attack_name(kind, root, secret))
    rc, stdout, err = _run(capsys, "prepare", *args, "--output", tmp_path / "data", *PREP, "--allow-outside-images")
    assert rc == 0, err
    assert os.path.realpath(secret) in opened and stdout.strip().endswith("skipped 0")
    m = open_prepared(tmp_path / "data").manifest
    assert m["splits"]["train"]["images"] == 9 and m["allow_outside_images"] is True


def test_inside_paths_with_dots_and_links_are_fine(tmp_path, opened):
    root = tmp_path / "imgs"
    _img(root / "sub" / "x.png", 1)
    (root / "ln.png").symlink_to(root / "sub" / "x.png")  # a link that stays inside
    data = [{"image": "sub/../sub/x.png", "text": "a red thing", "split": "train"},
            {"image": "ln.png", "text": "a red thing", "split": "train"},
            {"image": str(root / "sub" / "x.png"), "text": "a thing", "split": "train"}]  # absolute, but inside
    (tmp_path / "a.json").write_text(json.dumps(data))
    m = prep.prepare_dataset("pairs", tmp_path / "d", annotations=tmp_path / "a.json", images=root, image_size=4,
                             min_word_freq=1, workers=1, progress=False)
    assert m["skipped"] == 0 and m["splits"]["train"]["images"] == 3


# -- 2. download: http(s) only -------------------------------------------------------------------
@pytest.mark.parametrize("url", ["file:///etc/passwd", "FILE:///etc/passwd", "file://localhost/etc/passwd",
                                 "ftp://127.0.0.1/x.zip", "data:text/plain,hello", "gopher://127.0.0.1/x",
                                 "/etc/passwd", "jar:file:///etc/passwd!/x"])
def test_manifest_urls_other_than_http_are_refused(tmp_path, capsys, url):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"url": "http://127.0.0.1:9/a.zip"}, {"url": url}]))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "download", "coco", "--manifest", manifest, "-o", out, "--no-progress")
    _one_line(rc, err, "download", f"{manifest}: entry 1", "only http:// and https://")
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))  # nothing fetched or copied


def test_mirror_other_than_http_is_refused(tmp_path, capsys):
    rc, _, err = _run(capsys, "download", "coco", "--mirror", "file:///etc", "-o", tmp_path / "o", "--no-progress")
    _one_line(rc, err, "download", "--mirror", "file://", "--allow-file-urls")
    assert not (tmp_path / "o").exists()


def test_fetch_refuses_file_urls_directly(tmp_path):
    with pytest.raises(SeesayError, match="only http:// and https://"):
        fetch(RemoteFile("file:///etc/passwd"), tmp_path, retries=0, progress=False)
    assert not (tmp_path / "passwd").exists()


def test_allow_file_urls_copies_a_local_archive_but_not_ftp(tmp_path, capsys, caplog):
    archive = tmp_path / "src" / "caption_datasets.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("dataset_flickr8k.json", '{"images": []}')
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"url": archive.as_uri(), "size": archive.stat().st_size}]))
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    rc, stdout, err = _run(capsys, "download", "flickr8k", "--manifest", manifest, "-o", out, "--extract",
                           "--allow-file-urls")
    assert rc == 0, err
    assert (out / "dataset_flickr8k.json").is_file() and "downloaded and extracted" in stdout
    # progress: no terminal here, so plain lines through logging, not \r updates
    lines = [r.getMessage() for r in caplog.records if r.name == "seesay.progress"]
    assert any(x.startswith("caption_datasets.zip: ") for x in lines) and "\r" not in err
    manifest.write_text(json.dumps([{"url": "ftp://127.0.0.1/caption_datasets.zip"}]))
    rc, _, err = _run(capsys, "download", "flickr8k", "--manifest", manifest, "-o", tmp_path / "o2",
                      "--allow-file-urls", "--no-progress")
    _one_line(rc, err, "download", "entry 0", "ftp://")


def test_download_no_progress_is_silent(tmp_path, capsys, caplog):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "x")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"url": archive.as_uri()}]))
    caplog.set_level(logging.INFO)
    rc, _, err = _run(capsys, "download", "coco", "--manifest", manifest, "-o", tmp_path / "o", "--extract",
                      "--allow-file-urls", "--no-progress")
    assert rc == 0 and err == ""
    assert not [r for r in caplog.records if r.name == "seesay.progress"]


# -- 3a. a damaged prepared dataset: one line naming the file, nothing unpickled ------------------
class _Evil:
    """Unpickling this would create the file `path` (it must never happen)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("prepared")
    ann, root = _karpathy(tmp, n=8)
    prep.prepare_dataset("karpathy", tmp / "data", annotations=ann, images=root, image_size=8, min_word_freq=1,
                         workers=1, progress=False)
    return tmp / "data"


def _damage_manifest(text: str):
    def damage(d: Path) -> str:
        (d / "manifest.json").write_text(text)
        return "manifest.json"
    return damage


def _damage_npy(name: str, how: str):
    def damage(d: Path) -> str:
        path = d / "train" / name
        if how == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif how == "header":
            path.write_bytes(path.read_bytes()[:20])
        elif how == "object":
            np.save(path, np.array([_Evil(str(d.parent / "PWNED"))], dtype=object), allow_pickle=True)
        elif how == "float":
            np.save(path, np.load(path).astype(np.float64))
        elif how == "ndim":
            np.save(path, np.load(path).reshape(-1))
        elif how == "rows":
            np.save(path, np.load(path)[:-1])
        elif how == "dir":
            path.unlink()
            path.mkdir()
        elif how == "not npy":
            path.write_text("hello")
        return f"train/{name}"
    return damage


STORE_DAMAGE = {
    "manifest list": (_damage_manifest("[]"), "expected a JSON object, got list"),
    "manifest string": (_damage_manifest('"hello"'), "expected a JSON object, got str"),
    "manifest number": (_damage_manifest("3"), "expected a JSON object, got int"),
    "manifest null": (_damage_manifest("null"), "expected a JSON object, got NoneType"),
    "manifest malformed": (_damage_manifest('{"format_version": 1,'), "malformed JSON"),
    "manifest no splits": (_damage_manifest('{"format_version": 1}'), "'splits'"),
    "manifest splits list": (_damage_manifest('{"format_version": 1, "splits": []}'), "'splits'"),
    "manifest bad count": (_damage_manifest('{"format_version": 1, "splits": {"train": {"images": "x"}}, '
                                            '"image_size": 8, "captions_per_image": 5}'), "splits.train"),
    "manifest no size": (_damage_manifest('{"format_version": 1, "splits": {"train": {"images": 6}}}'),
                         "'image_size'"),
    "images truncated": (_damage_npy("images.npy", "truncated"), "truncated"),
    "images header cut": (_damage_npy("images.npy", "header"), "not a valid prepared array"),
    "images not npy": (_damage_npy("images.npy", "not npy"), "not a valid prepared array"),
    "images directory": (_damage_npy("images.npy", "dir"), "is a directory"),
    "captions object dtype": (_damage_npy("captions.npy", "object"), "Python objects, which seesay never unpickles"),
    "lengths object dtype": (_damage_npy("lengths.npy", "object"), "never unpickles"),
    "lengths float": (_damage_npy("lengths.npy", "float"), "expected a int32 array"),
    "captions ndim": (_damage_npy("captions.npy", "ndim"), "with 3 dimensions"),
    "images rows": (_damage_npy("images.npy", "rows"), "rows, but manifest.json says"),
}


@pytest.mark.parametrize("case", list(STORE_DAMAGE))
def test_damaged_prepared_dataset_is_one_line(tmp_path, capsys, prepared_dir, case):
    import shutil

    import torch

    torch.set_num_threads(1)
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    damage, needle = STORE_DAMAGE[case]
    name = damage(data)
    before = _files(data)
    with pytest.raises(SeesayError) as e:
        open_prepared(data).split("train")
    assert str(data / name) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)
    rc, _, err = _run(capsys, "train", "--data", data, "--output", tmp_path / "run", "--device", "cpu",
                      "--workers", "0", "--epochs", "1", "--no-progress")
    _one_line(rc, err, "train", str(data / name), needle)
    assert _files(data) == before  # nothing rewritten
    assert not (tmp_path / "PWNED").exists()  # nothing unpickled


# -- 3b. a full disk while preparing: one line, resumable ------------------------------------------
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_when(pred, real):
    def f(*a, **k):
        if pred(*a, **k):
            _enospc()
        return real(*a, **k)
    return f


def _inject(monkeypatch, where: str) -> None:
    if where == "preallocate":
        monkeypatch.setattr(np.lib.format, "open_memmap",
                            _fail_when(lambda *a, **k: Path(a[0]).parent.name == "val", np.lib.format.open_memmap))
    elif where == "rows":
        calls = []

        def pwrite(fd, data, pos, _real=os.pwrite):
            calls.append(len(data) == 8 * 8 * 3)  # image rows only (the lock file is written with pwrite too)
            if sum(calls) > 6:  # the 6 train rows are written, the val rows are not
                _enospc()
            return _real(fd, data, pos)
        monkeypatch.setattr(os, "pwrite", pwrite)
    elif where == "chunk marker":
        monkeypatch.setattr(prep, "write_text_atomic",
                            _fail_when(lambda p, t: Path(p).parent.name == "chunks" and Path(p).name.startswith("test-"),
                                       prep.write_text_atomic))
    elif where == "captions":
        monkeypatch.setattr(np, "save", _fail_when(lambda p, *a, **k: str(p).endswith("captions.npy"), np.save))
    elif where == "references":
        monkeypatch.setattr(prep, "write_text_atomic",
                            _fail_when(lambda p, t: str(p).endswith("references.jsonl"), prep.write_text_atomic))
    elif where == "vocab":
        from seesay.data import tokenize

        monkeypatch.setattr(tokenize.Vocab, "save", _enospc)
    elif where == "manifest":
        monkeypatch.setattr(prep, "write_text_atomic",
                            _fail_when(lambda p, t: str(p).endswith("manifest.json"), prep.write_text_atomic))


# where -> images that must be read again on the rerun (the rest was done and is kept)
DISK_FULL = {"preallocate": 10, "rows": 4, "chunk marker": 2, "captions": 0, "references": 0, "vocab": 0,
             "manifest": 0}


@pytest.mark.parametrize("where", list(DISK_FULL))
def test_disk_full_is_one_line_and_resumable(tmp_path, capsys, monkeypatch, where):
    ann, root = _karpathy(tmp_path)
    args = ["prepare", "--format", "karpathy", "--annotations", ann, "--images", root, *PREP]
    rc, _, err = _run(capsys, *args, "--output", tmp_path / "clean")
    assert rc == 0, err
    out = tmp_path / "data"
    with monkeypatch.context() as m:
        _inject(m, where)
        rc, _, err = _run(capsys, *args, "--output", out)
    _one_line(rc, err, "prepare", "no space left on device", str(tmp_path / "data.partial"), "run the same command")
    assert not out.exists() and (tmp_path / "data.partial").is_dir()
    assert not (tmp_path / "data.lock").exists()
    reread: list[str] = []
    real = prep.read_image
    monkeypatch.setattr(prep, "read_image", lambda p, *a, **k: reread.append(p) or real(p, *a, **k))
    rc, stdout, err = _run(capsys, *args, "--output", out)
    assert rc == 0, err
    assert len(reread) == DISK_FULL[where]  # what was done before the failure is not redone
    assert _files(out) == _files(tmp_path / "clean")


# -- 3c. a Karpathy image without a split ------------------------------------------------------------
@pytest.mark.parametrize("split", ["<missing>", None, "", 3, ["train"]])
def test_karpathy_image_without_split_is_refused(tmp_path, capsys, split):
    ann, root = _karpathy(tmp_path)
    data = json.loads(ann.read_text())
    if split == "<missing>":
        del data["images"][7]["split"]
    else:
        data["images"][7]["split"] = split
    ann.write_text(json.dumps(data))
    rc, _, err = _run(capsys, "prepare", "--format", "karpathy", "--annotations", ann, "--images", root,
                      "--output", tmp_path / "d", *PREP)
    _one_line(rc, err, "prepare", str(ann), "images[7] (007.png) has no 'split' (1 of 10 images")
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()


def test_coco_karpathy_split_file_without_split_is_refused(tmp_path, capsys):
    args, _ = _dataset(tmp_path, "coco", None)
    kimgs = [{"cocoid": k + 1, "filepath": "train2014", "filename": f"g{k}.png", "split": "train"} for k in range(8)]
    del kimgs[2]["split"]
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"images": kimgs}))
    rc, _, err = _run(capsys, "prepare", *args, "--output", tmp_path / "d", *PREP)
    _one_line(rc, err, "prepare", "dataset_coco.json", "images[2] (g2.png) has no 'split'")


# -- 3d. every image missing: point at --images ------------------------------------------------------
def test_flickr_without_images_flag_points_at_images(tmp_path, capsys):
    # Flickr8k's Karpathy file has no filepath; its images sit in a folder of their own
    ann, _ = _karpathy(tmp_path, n=20, folder="Flicker8k_Dataset")
    rc, _, err = _run(capsys, "prepare", "--format", "karpathy", "--annotations", ann, "--output", tmp_path / "d",
                      *PREP)
    _one_line(rc, err, "prepare", "20 of 20 images", "file not found: 20",
              f"20 of 20 images were not found under {tmp_path} (the folder of --annotations",
              "--images DIR")


@pytest.mark.parametrize("present,hint", [(0, True), (1, True), (2, True), (3, False)])
def test_nearly_every_image_missing_names_the_folder(tmp_path, capsys, present, hint):
    ann, root = _karpathy(tmp_path, n=20)
    for p in sorted(root.glob("*.png"))[present:]:
        p.unlink()
    empty = root
    rc, _, err = _run(capsys, "prepare", "--format", "karpathy", "--annotations", ann, "--images", empty,
                      "--output", tmp_path / "d", *PREP)
    line = _one_line(rc, err, "prepare", f"{20 - present} of 20 images")
    assert (f"were not found under {empty} (--images): check --images" in line) == hint


def test_all_missing_with_max_skip_one_still_points_at_images(tmp_path, capsys):
    ann, root = _karpathy(tmp_path, n=10)
    for p in root.glob("*.png"):
        p.unlink()
    rc, _, err = _run(capsys, "prepare", "--format", "karpathy", "--annotations", ann, "--images", root,
                      "--output", tmp_path / "d", *PREP, "--max-skip-fraction", "1")
    _one_line(rc, err, "prepare", "no usable training images", "were not found under", "check --images")


def test_coco_with_images_elsewhere_points_at_coco_dir(tmp_path, capsys):
    args, root = _dataset(tmp_path, "coco", None)
    root.rename(tmp_path / "elsewhere")
    rc, _, err = _run(capsys, "prepare", *args, "--output", tmp_path / "d", *PREP)
    _one_line(rc, err, "prepare", "8 of 8 images were not found under", "check --coco-dir")


# -- 3e. the summary line --------------------------------------------------------------------------
@pytest.mark.parametrize("bad,no_caption,expect", [
    (0, 0, "prepared 8 images (train 8), skipped 0"),
    (2, 0, "prepared 8 images (train 8), skipped 2: see D/skipped.jsonl"),
    (0, 1, "prepared 8 images (train 8), skipped 1 images without a caption of 1 to 50 tokens: see D/skipped.jsonl"),
    (2, 1, "prepared 8 images (train 8), skipped 2 bad images and 1 without a caption of 1 to 50 tokens: "
           "see D/skipped.jsonl"),
])
def test_summary_line_never_says_skipped_0_see(bad, no_caption, expect):
    m = {"splits": {"train": {"images": 8}}, "skipped": bad, "no_caption_images": no_caption, "max_len": 50}
    line = prep.summary_line(m, "D")
    assert line == expect and "skipped 0:" not in line


def test_image_without_caption_summary_from_a_run(tmp_path, capsys):
    args, root = _dataset(tmp_path, "pairs", None)
    data = json.loads((tmp_path / "ann.json").read_text())
    data[0]["text"] = "?!"  # no token left
    (tmp_path / "ann.json").write_text(json.dumps(data))
    rc, stdout, err = _run(capsys, "prepare", *args, "--output", tmp_path / "d", *PREP)
    assert rc == 0, err
    assert stdout.strip() == (f"prepared 7 images (train 7), skipped 1 images without a caption of 1 to 50 tokens: "
                              f"see {tmp_path / 'd' / 'skipped.jsonl'}; dropped captions: 1 empty")


# -- 4. stale locks --------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("owner", ["dead pid", "garbage", "empty", "other host"]
                         + (["reused pid"] if Path("/proc/self/stat").exists() else []))  # start times: Linux
def test_stale_lock_is_taken_over_with_a_log_line(tmp_path, capsys, caplog, owner):
    args, _ = _dataset(tmp_path, "pairs", None)
    lock = tmp_path / "d.lock"
    text = {"dead pid": json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "1"}),
            "reused pid": json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "-1"}),
            "garbage": "\x00\x01 not json", "empty": "",
            "other host": json.dumps({"pid": 1, "host": "elsewhere.invalid"})}[owner]
    lock.write_text(text)
    caplog.set_level(logging.INFO)
    rc, _, err = _run(capsys, "prepare", *args, "--output", tmp_path / "d", *PREP)
    assert rc == 0, err
    stale = [r.getMessage() for r in caplog.records if "removing stale lock" in r.getMessage()]
    assert bool(stale) == (owner in ("dead pid", "reused pid", "other host"))
    assert not lock.exists()


def test_live_lock_refuses_and_is_kept(tmp_path, capsys, caplog):
    args, _ = _dataset(tmp_path, "pairs", None)
    lock = tmp_path / "d.lock"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": child.pid, "host": socket.gethostname(), "started": prep._start_time(child.pid)}
        lock.write_text(json.dumps(owner))
        rc, _, err = _run(capsys, "prepare", *args, "--output", tmp_path / "d", *PREP)
        _one_line(rc, err, "prepare", "another seesay prepare is writing it", f"pid {child.pid} on ", str(lock))
        assert json.loads(lock.read_text()) == owner and not (tmp_path / "d").exists()
    finally:
        child.kill()
        child.wait()
    caplog.set_level(logging.INFO)
    rc, _, err = _run(capsys, "prepare", *args, "--output", tmp_path / "d", *PREP)
    assert rc == 0, err
    assert any(f"pid {child.pid}" in r.getMessage() and "stale" in r.getMessage() for r in caplog.records)


def test_held_lock_refuses_naming_its_owner(tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    args, _ = _dataset(tmp_path, "pairs", None)
    lock = tmp_path / "d.lock"
    lock.write_text(json.dumps({"pid": 4242, "host": "somewhere"}))
    with open(lock, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        rc, _, err = _run(capsys, "prepare", *args, "--output", tmp_path / "d", *PREP)
    _one_line(rc, err, "prepare", "another seesay prepare is writing it (pid 4242 on somewhere")
    rc, _, err = _run(capsys, "prepare", *args, "--output", tmp_path / "d", *PREP)
    assert rc == 0, err
    assert not lock.exists()


# -- 5. progress -----------------------------------------------------------------------------------
def test_prepare_progress_false_prints_nothing(tmp_path, capsys, caplog):
    ann, root = _karpathy(tmp_path)
    caplog.set_level(logging.DEBUG)
    prep.prepare_dataset("karpathy", tmp_path / "d", annotations=ann, images=root, image_size=8, min_word_freq=1,
                         workers=1, progress=False)
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    assert not [r for r in caplog.records if r.name == "seesay.progress"]


def test_prepare_progress_off_a_terminal_is_plain_lines(tmp_path, capsys, caplog):
    ann, root = _karpathy(tmp_path)
    caplog.set_level(logging.INFO)
    rc, _, err = _run(capsys, "prepare", "--format", "karpathy", "--annotations", ann, "--images", root,
                      "--output", tmp_path / "d", "--image-size", "8", "--workers", "1")
    assert rc == 0 and "\r" not in err
    lines = [r.getMessage() for r in caplog.records if r.name == "seesay.progress"]
    assert lines and lines[-1].startswith("prepare: 10/10 img (100%)")


def test_prepare_progress_on_a_terminal_is_a_bar(tmp_path, capsys, monkeypatch):
    import seesay.progress

    monkeypatch.setattr(seesay.progress, "is_terminal", lambda stream=None: True)
    ann, root = _karpathy(tmp_path)
    prep.prepare_dataset("karpathy", tmp_path / "d", annotations=ann, images=root, image_size=8, min_word_freq=1,
                         workers=1, progress=True)
    err = capsys.readouterr().err
    assert "prepare" in err and "/10" in err
