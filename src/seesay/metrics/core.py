"""``compute_scores``: COCO caption metrics for a dict of results against references."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from seesay.errors import SeesayError

log = logging.getLogger("seesay.metrics")

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
FAST_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


class ScoreReport(NamedTuple):
    """Corpus scores (every key of METRIC_KEYS; None when not computed), per-image scores
    (image id -> metric -> float, only the computed metrics) and one-line notes on what was
    not computed and why."""

    corpus: dict[str, float | None]
    per_image: dict[str, dict[str, float]]
    notes: tuple[str, ...] = ()


def _check(results: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    if not results:
        raise SeesayError("no results to score")
    for key, cand in results.items():
        if not isinstance(cand, str):
            raise SeesayError(f"result for image {key!r} is not a string: {cand!r}")
        refs = references.get(key)
        if refs is None:
            raise SeesayError(f"image {key!r} has a result but no references")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise SeesayError(f"references of image {key!r} must be a non-empty list of strings")


def tokenize_corpus(
    captions: Mapping[Any, Sequence[str]], *, lang: str = "en", tokenizer: str = "python"
) -> dict[Any, list[str]]:
    """Tokenise every caption: image id -> list of token strings (tokens joined by spaces).

    English: PTB tokenisation + punctuation removal as one call of pycocoevalcap's
    ``PTBTokenizer.tokenize`` does ("python" or "java", the latter one process for all captions):
    the captions are the lines of one file, in this order, and PTBLexer looks across lines
    ("white f." before "The dog ..." becomes "white f"), so tokenise references and candidates
    in separate calls, as pycocoevalcap does. Chinese: jieba segmentation, no PTB step.
    """
    flat = [c for caps in captions.values() for c in caps]
    if lang == "zh":
        toks = [_jieba(c) for c in flat]
    elif lang == "en":
        if tokenizer == "java":
            from seesay.metrics.java import java_ptb_tokenize
            from seesay.metrics.tokenize import PUNCTUATIONS

            toks = [" ".join(t for t in line if t not in PUNCTUATIONS) for line in java_ptb_tokenize(flat)]
        elif tokenizer == "python":
            from seesay.metrics.tokenize import ptb_tokenize_lines

            toks = ptb_tokenize_lines(flat)
        else:
            raise SeesayError(f"unknown tokenizer {tokenizer!r} (python or java)")
    else:
        raise SeesayError(f"unknown language {lang!r} (en or zh)")
    out: dict[Any, list[str]] = {}
    i = 0
    for key, caps in captions.items():
        out[key] = toks[i : i + len(caps)]
        i += len(caps)
    return out


_jieba_mod = None


def _jieba(text: str) -> str:
    """Chinese caption -> jieba words joined by single spaces (whitespace tokens dropped)."""
    global _jieba_mod
    if _jieba_mod is None:
        try:
            import jieba
        except ImportError as e:
            from seesay.errors import missing_extra

            raise missing_extra("jieba", "zh") from e
        jieba.setLogLevel(logging.WARNING)
        _jieba_mod = jieba
    return " ".join(w for w in _jieba_mod.cut(text.replace("\n", " "), cut_all=False) if w.strip())


def score_tokenized(
    gts: Mapping[str, Sequence[str]], res: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The fast metrics (BLEU-1..4, ROUGE-L, CIDEr-D) on already tokenised captions."""
    from seesay.metrics.bleu import bleu_score
    from seesay.metrics.cider import cider_score
    from seesay.metrics.rouge import rouge_score

    corpus: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {k: {} for k in gts}
    bleu, bleu_per = bleu_score(gts, res)
    for n in range(4):
        corpus[f"Bleu_{n + 1}"] = float(bleu[n])
        for key, v in zip(gts, bleu_per[n]):
            per_image[key][f"Bleu_{n + 1}"] = float(v)
    rouge, rouge_per = rouge_score(gts, res)
    corpus["ROUGE_L"] = rouge
    for key, v in zip(gts, rouge_per):
        per_image[key]["ROUGE_L"] = float(v)
    cider, cider_per = cider_score(gts, res)
    corpus["CIDEr"] = cider
    for key, v in zip(gts, cider_per):
        per_image[key]["CIDEr"] = float(v)
    return corpus, per_image


def compute_scores(
    results: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    full: bool = False,
    lang: str = "en",
    spice_models: str | None = None,
    tokenizer: str = "auto",
) -> ScoreReport:
    """Score captions the way the COCO caption evaluation (pycocoevalcap 1.2) does.

    ``results``: image id -> generated caption; ``references``: image id -> reference
    captions. Every image of ``results`` is scored (it must have references; references of
    other images are ignored, and CIDEr-D's document frequencies come from the scored images'
    references, as in COCO evaluation).

    Fast path (``full=False``): BLEU-1..4, ROUGE-L and CIDEr-D in Python/numpy, no Java.
    ``full=True`` adds METEOR (one Java process) and SPICE (one Java process, only when the
    Stanford CoreNLP models are present, see ``find_spice_models``); what cannot run is None
    with a one-line note. ``tokenizer``: "python", "java" or "auto" (java for the full path
    when java is on the PATH, else python). ``lang="zh"``: jieba words, no PTB tokenisation.
    """
    _check(results, references)
    from seesay.metrics import java as jv

    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        log.warning(msg)

    have_java = jv.java_path() is not None
    auto = tokenizer == "auto"
    if auto:
        tokenizer = "java" if (full and have_java and lang == "en" and jv.pycocoevalcap_dir()) else "python"
    keys = list(results)
    # references and candidates are tokenised separately (two files, as pycocoevalcap does: the
    # lexer looks across lines), each in the order of ``results``
    refs = {k: list(references[k]) for k in keys}
    cands = {k: [results[k]] for k in keys}
    try:
        gts = tokenize_corpus(refs, lang=lang, tokenizer=tokenizer)
        res1 = tokenize_corpus(cands, lang=lang, tokenizer=tokenizer)
    except SeesayError as e:
        if not (auto and tokenizer == "java"):
            raise
        note(f"Java PTB tokenizer failed, used the Python one: {e}")
        gts = tokenize_corpus(refs, lang=lang, tokenizer="python")
        res1 = tokenize_corpus(cands, lang=lang, tokenizer="python")
    res = {k: v[0] for k, v in res1.items()}

    fast, per_image = score_tokenized(gts, res)
    corpus: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    corpus.update(fast)

    if full:
        if not have_java:
            note("METEOR and SPICE not computed: java is not on the PATH")
        else:
            try:
                meteor, meteor_per = jv.meteor_score(gts, res)
                corpus["METEOR"] = meteor
                for key, v in zip(keys, meteor_per):
                    per_image[key]["METEOR"] = v
            except SeesayError as e:
                note(f"METEOR not computed: {e}")
            models, reason = jv.find_spice_models(spice_models)
            if models is None:
                note(f"SPICE not computed: {reason}")
            else:
                try:
                    spice, spice_per = jv.spice_score(gts, res, models)
                    corpus["SPICE"] = None if math.isnan(spice) else spice
                    for key in keys:
                        per_image[key]["SPICE"] = spice_per[key]
                except SeesayError as e:
                    note(f"SPICE not computed: {e}")
    return ScoreReport(corpus, per_image, tuple(notes))
