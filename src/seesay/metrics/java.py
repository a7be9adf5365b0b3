"""The Java parts of COCO evaluation: PTB tokenizer, METEOR 1.5 and SPICE 1.0.

All three use the jars pycocoevalcap 1.2 ships. Each evaluation starts at most one Java
process per tool (never one per image), every process has a time limit, and nothing here
downloads anything: SPICE runs only when the Stanford CoreNLP 3.6.0 jars are already present.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from seesay.errors import SeesayError

log = logging.getLogger("seesay.metrics")

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_ENV = "SEESAY_SPICE_MODELS"


def java_path() -> str | None:
    """The ``java`` executable on the PATH, or None."""
    return shutil.which("java")


def pycocoevalcap_dir() -> Path | None:
    """Directory of the installed pycocoevalcap package (without importing it), or None."""
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _require_jar(*parts: str) -> Path:
    root = pycocoevalcap_dir()
    if root is None:
        raise SeesayError("pycocoevalcap is not installed; install it with: pip install 'seesay[metrics]'")
    path = root.joinpath(*parts)
    if not path.is_file():
        raise SeesayError(f"{path}: missing from the pycocoevalcap installation")
    return path


# Characters the Java lexer treats as line breaks although pycocoevalcap only replaces "\n".
_LINE_BREAKS = str.maketrans({c: " " for c in "\r\u0085\u2028\u2029\u000b\u000c"})


def java_ptb_tokenize(captions: Sequence[str], *, timeout: float | None = None) -> list[list[str]]:
    """Raw PTB tokens (lower-cased, punctuation not yet removed) of each caption, from
    CoreNLP 3.4.1's PTBTokenizer with pycocoevalcap's options, in one Java process."""
    java = java_path()
    if java is None:
        raise SeesayError("java is not on the PATH; the Java PTB tokenizer needs it (use tokenizer='python')")
    jar = _require_jar("tokenizer", "stanford-corenlp-3.4.1.jar")
    lines = [c.replace("\n", " ").translate(_LINE_BREAKS) for c in captions]
    if not lines:
        return []
    with tempfile.TemporaryDirectory(prefix="seesay-ptb-") as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_bytes("\n".join(lines).encode("utf-8"))
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               "-encoding", "utf-8", str(src)]  # fmt: skip
        if timeout is None:
            timeout = 60 + 0.002 * len(lines)
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise SeesayError(f"the Java PTB tokenizer did not finish within {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise SeesayError(f"the Java PTB tokenizer failed: {_java_error(proc.stderr, proc.returncode)}")
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines) or any(o.strip() for o in out[len(lines) :]):
        raise SeesayError(f"the Java PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    return [o.rstrip().split(" ") if o.strip() else [] for o in out[: len(lines)]]


def _java_error(stderr: bytes, returncode: int) -> str:
    """The informative line of a Java failure: the last "Caused by", else the first exception line."""
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    caused = [ln for ln in lines if ln.startswith("Caused by:")]
    if caused:
        return caused[-1][len("Caused by:") :].strip()
    for ln in lines:
        if "Exception" in ln or "Error" in ln:
            return ln
    top = [ln for ln in lines if not ln.startswith(("at ", "..."))]
    return top[-1] if top else f"exit status {returncode}"


class _Watchdog:
    def __init__(self, proc: subprocess.Popen, seconds: float):
        self.fired = False
        self._proc = proc
        self._timer = threading.Timer(seconds, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self.fired = True
        self._proc.kill()

    def cancel(self) -> None:
        self._timer.cancel()


def meteor_score(
    gts: Mapping[object, Sequence[str]],
    res: Mapping[object, Sequence[str] | str],
    *,
    timeout: float | None = None,
) -> tuple[float, list[float]]:
    """METEOR 1.5 exactly as pycocoevalcap's ``Meteor`` computes it (same jar, options and
    protocol), with one Java process for the whole corpus and a time limit.

    Raises SeesayError when java or the jar is missing, or the process fails or times out.
    """
    java = java_path()
    if java is None:
        raise SeesayError("java is not on the PATH")
    jar = _require_jar("meteor", "meteor-1.5.jar")
    keys = list(gts)
    score_lines = []
    for key in keys:
        hyp = res[key]
        if not isinstance(hyp, str):
            (hyp,) = hyp
        hyp = hyp.replace("|||", "").replace("  ", " ")
        score_lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[key]), hyp)))
    if timeout is None:
        timeout = 120 + 0.05 * len(keys)
    cmd = [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    proc = subprocess.Popen(cmd, cwd=str(jar.parent), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    dog = _Watchdog(proc, timeout)
    errors: list[BaseException] = []

    def write_scores() -> None:
        try:
            for line in score_lines:
                proc.stdin.write((line + "\n").encode("utf-8"))
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:  # the reader reports the failure
            errors.append(e)

    try:
        writer = threading.Thread(target=write_scores, daemon=True)
        writer.start()
        stats = []
        for _ in keys:
            line = proc.stdout.readline()
            if not line:
                raise SeesayError(
                    "METEOR stopped before scoring every caption" + (" (time limit)" if dog.fired else "")
                )
            stats.append(line.decode("utf-8").strip())
        writer.join()
        proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
        proc.stdin.flush()
        values = []
        for _ in range(len(keys) + 1):
            line = proc.stdout.readline()
            if not line:
                raise SeesayError(
                    "METEOR stopped before reporting its scores" + (" (time limit)" if dog.fired else "")
                )
            values.append(float(line.strip()))
    except (BrokenPipeError, OSError, ValueError) as e:
        raise SeesayError(f"METEOR failed: {e}") from e
    finally:
        dog.cancel()
        try:
            proc.stdin.close()
        except OSError:
            pass
        proc.kill()
        proc.wait()
    return values[-1], values[:-1]


def find_spice_models(spice_models: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """Where the CoreNLP 3.6.0 jars SPICE needs are: (directory, "") or (None, reason).

    Looked for in ``spice_models``, then $SEESAY_SPICE_MODELS, then pycocoevalcap's
    ``spice/lib`` (where its own downloader would put them). Nothing is downloaded.
    """
    candidates: list[tuple[str, Path]] = []
    if spice_models:
        candidates.append(("spice_models", Path(spice_models)))
    elif os.environ.get(SPICE_ENV):
        candidates.append((SPICE_ENV, Path(os.environ[SPICE_ENV])))
    root = pycocoevalcap_dir()
    if root is not None:
        candidates.append(("pycocoevalcap", root / "spice" / "lib"))
    for origin, path in candidates:
        if all((path / j).is_file() for j in CORENLP_JARS):
            return path, ""
        if origin != "pycocoevalcap":
            return None, f"{path} lacks {' and '.join(CORENLP_JARS)}"
    return None, (
        f"Stanford CoreNLP 3.6.0 models not found (set {SPICE_ENV} or --spice-models to a directory with "
        f"{CORENLP_JARS[0]} and {CORENLP_JARS[1]})"
    )


def spice_score(
    gts: Mapping[object, Sequence[str]],
    res: Mapping[object, Sequence[str] | str],
    models_dir: Path,
    *,
    timeout: float | None = None,
) -> tuple[float, dict[object, float]]:
    """SPICE 1.0 F-score as pycocoevalcap's ``Spice`` computes it (corpus = mean of per-image
    "All" F), one Java process, no cache directory, a time limit."""
    java = java_path()
    if java is None:
        raise SeesayError("java is not on the PATH")
    jar = _require_jar("spice", "spice-1.0.jar")
    keys = list(gts)
    by_str = {str(k): k for k in keys}
    data = []
    for key in sorted(keys, key=str):
        hyp = res[key]
        if not isinstance(hyp, str):
            (hyp,) = hyp
        data.append({"image_id": str(key), "test": hyp, "refs": list(gts[key])})
    if timeout is None:
        timeout = 600 + 1.0 * len(keys)
    with tempfile.TemporaryDirectory(prefix="seesay-spice-") as tmp:
        tmpd = Path(tmp)
        run_jar = jar
        if models_dir.resolve() != (jar.parent / "lib").resolve():
            # the jar's manifest finds its libraries in lib/ beside it: lay out a private copy of links
            (tmpd / "lib").mkdir()
            os.symlink(jar, tmpd / jar.name)
            for lib in (jar.parent / "lib").iterdir():
                os.symlink(lib, tmpd / "lib" / lib.name)
            for name in CORENLP_JARS:
                os.symlink((models_dir / name).resolve(), tmpd / "lib" / name)
            run_jar = tmpd / jar.name
        (tmpd / "in.json").write_text(json.dumps(data), encoding="utf-8")
        cmd = [java, "-jar", "-Xmx8G", str(run_jar), str(tmpd / "in.json"), "-out", str(tmpd / "out.json"),
               "-subset", "-silent"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=str(run_jar.parent), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise SeesayError(f"SPICE did not finish within {timeout:.0f} s") from e
        if proc.returncode != 0:
            raise SeesayError(f"SPICE failed: {_java_error(proc.stderr, proc.returncode)}")
        results = json.loads((tmpd / "out.json").read_text(encoding="utf-8"))

    def as_float(v: object) -> float:
        try:
            return float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return math.nan

    per = {by_str[str(item["image_id"])]: as_float(item["scores"]["All"]["f"]) for item in results}
    vals = [per[k] for k in keys]
    mean = sum(vals) / len(vals) if vals else math.nan
    return mean, per
