"""seesay.metrics against pycocoevalcap 1.2 (the oracle) on a generated corpus."""

from __future__ import annotations

import contextlib
import io
import math
import random
import shutil

import numpy as np
import pytest

from seesay.errors import SeesayError
from seesay.metrics import CiderD, compute_scores, score_tokenized, tokenize_corpus
from seesay.metrics.rouge import lcs_length
from seesay.metrics.synthetic import KINDS, make_corpus
from seesay.metrics.tokenize import ptb_tokenize, ptb_tokenize_lines

HAVE_JAVA = shutil.which("java") is not None

# hand-written hard cases for the Python PTB tokenizer (contractions, abbreviations, numbers,
# brackets, quotes, dashes, non-ASCII); compared with the Java tokenizer below
TRICKY = [  # fmt: skip
    "A man (riding) a horse's back, isn't it? \"Yes\" he said.",
    "Colour of the neighbour's car: 3.5 km/h & 1,000 items -- wow... ",
    "can't CAN'T Can't cannot CANNOT Won't ain't shan't y'all I'd've 'em 'cause",
    "word.... .... ..... .. !! ?? !? ?! ?. .? !. ,, ;; :: ,. a,b a;b a:b a.b a?b a!b dog.cat Dog.Cat",
    "dogs' cat's Cat'S DOG'S I'M YOU'RE THEY'LL HE'D WE'VE cats's 's 're n't",
    "x-ray t-shirt T-SHIRT 2-year-old 3d 3D 4k 1st 2nd A1 b2b mp3 covid-19",
    "#hashtag # 1 #1 a# @ @a a@ a@b.com www.x.com http://x.com ftp x+y x=y x*y x^y x~y x%y 50% %5",
    "(a (b) c) ((x)) [x [y]] -- --- ---- -a -5a a-5 5-a",
    "e-mail e.g., i.e., U.S., Mr.Smith st.louis",
    "a dog . a cat , on grass ; yes : no ! why ?",
    "'hello' \"hi\" 'tis 'twas '80s '05 ma'am rock'n'roll",
    "10:30 3-4 3,000,000 1.5.6 12th 5'6\" 6ft 1990s $3.50 -5 +5 .5 5. 5.0.",
    "ab-cd-ef a--b a---b -a- a- -a (a) [a] {a} <a> a/b a\\b a|b a_b a@b a#b a&b a'b a\"b",
    "ü ß ñ ø æ å é ç Ж привет Ελληνικά 中文，标点。 日本語「かぎ」 한국어 ÄÖÜ İstanbul ΣΟΦΟΣ",
    "don’t it’s “hi” ‘x’ – en — em ‒ fig ― bar − minus",
    "Mr. mr. Dr. St. etc. e.g. i.e. a.m. p.m. vs. Jr.",
    "emoji 😀 here ab😀cd",
    "the mr. is here",
    "the Mr. Smith is here",
    "this is the mr.",
    "the mrs. is here",
    "the Mrs. Smith is here",
    "this is the mrs.",
    "the ms. is here",
    "the Ms. Smith is here",
    "this is the ms.",
    "the dr. is here",
    "the Dr. Smith is here",
    "this is the dr.",
    "the st. is here",
    "the St. Smith is here",
    "this is the st.",
    "the etc. is here",
    "the Etc. Smith is here",
    "this is the etc.",
    "the vs. is here",
    "the Vs. Smith is here",
    "this is the vs.",
    "the inc. is here",
    "the Inc. Smith is here",
    "this is the inc.",
    "the co. is here",
    "the Co. Smith is here",
    "this is the co.",
    "the jr. is here",
    "the Jr. Smith is here",
    "this is the jr.",
    "the sr. is here",
    "the Sr. Smith is here",
    "this is the sr.",
    "the prof. is here",
    "the Prof. Smith is here",
    "this is the prof.",
    "the mt. is here",
    "the Mt. Smith is here",
    "this is the mt.",
    "the ft. is here",
    "the Ft. Smith is here",
    "this is the ft.",
    "the no. is here",
    "the No. Smith is here",
    "this is the no.",
    "the jan. is here",
    "the Jan. Smith is here",
    "this is the jan.",
    "the feb. is here",
    "the Feb. Smith is here",
    "this is the feb.",
    "the mar. is here",
    "the Mar. Smith is here",
    "this is the mar.",
    "the apr. is here",
    "the Apr. Smith is here",
    "this is the apr.",
    "the jun. is here",
    "the Jun. Smith is here",
    "this is the jun.",
    "the jul. is here",
    "the Jul. Smith is here",
    "this is the jul.",
    "the aug. is here",
    "the Aug. Smith is here",
    "this is the aug.",
    "the sep. is here",
    "the Sep. Smith is here",
    "this is the sep.",
    "the sept. is here",
    "the Sept. Smith is here",
    "this is the sept.",
    "the oct. is here",
    "the Oct. Smith is here",
    "this is the oct.",
    "the nov. is here",
    "the Nov. Smith is here",
    "this is the nov.",
    "the dec. is here",
    "the Dec. Smith is here",
    "this is the dec.",
    "the corp. is here",
    "the Corp. Smith is here",
    "this is the corp.",
    "the ltd. is here",
    "the Ltd. Smith is here",
    "this is the ltd.",
    "the bros. is here",
    "the Bros. Smith is here",
    "this is the bros.",
    "the gen. is here",
    "the Gen. Smith is here",
    "this is the gen.",
    "the gov. is here",
    "the Gov. Smith is here",
    "this is the gov.",
    "the sen. is here",
    "the Sen. Smith is here",
    "this is the sen.",
    "the rep. is here",
    "the Rep. Smith is here",
    "this is the rep.",
    "the rev. is here",
    "the Rev. Smith is here",
    "this is the rev.",
    "the capt. is here",
    "the Capt. Smith is here",
    "this is the capt.",
    "the col. is here",
    "the Col. Smith is here",
    "this is the col.",
    "the lt. is here",
    "the Lt. Smith is here",
    "this is the lt.",
    "the sgt. is here",
    "the Sgt. Smith is here",
    "this is the sgt.",
    "the messrs. is here",
    "the Messrs. Smith is here",
    "this is the messrs.",
    "the mme. is here",
    "the Mme. Smith is here",
    "this is the mme.",
    "the mlle. is here",
    "the Mlle. Smith is here",
    "this is the mlle.",
    "the ave. is here",
    "the Ave. Smith is here",
    "this is the ave.",
    "the blvd. is here",
    "the Blvd. Smith is here",
    "this is the blvd.",
    "the rd. is here",
    "the Rd. Smith is here",
    "this is the rd.",
    "a.k.a. w/ w/o &amp; 9:00am 2:30pm 24/7 50/50 4-way 3/4-inch #5 5'10 6' ph.d. 6:45. 3. it. etc.. p.m.. A. I. I'm Ok. OK. tv. t.v. dvd's 1950's 80's",
    "a a.k.a. b",
    "a w/ b",
    "a w/o b",
    "a &amp; b",
    "a 9:00am b",
    "a 2:30pm b",
    "a 24/7 b",
    "a 50/50 b",
    "a 4-way b",
    "a 3/4-inch b",
    "a #5 b",
    "a 5'10 b",
    "a 6' b",
    "a ph.d. b",
    "a 6:45. b",
    "a 3. b",
    "a it. b",
    "a etc.. b",
    "a p.m.. b",
    "a A. b",
    "a I. b",
    "a I'm b",
    "a Ok. b",
    "a OK. b",
    "a tv. b",
    "a t.v. b",
    "a dvd's b",
    "a 1950's b",
    "a 80's b",
    "a dog.cat. b www.x.com. ph.d. a.b. ab.cd. ab.c. a.bc. x.y z etc... mr... mr.. Dr... No. 5 no. 5 No.5 ",
    "a 9:00 am 9am 9pm 9:00a.m. 10:30pm. 7pm. 12:00PM 9:00AM",
    "the '70s a 2'x4' board it's 5'10 6'2",
]

TOL = 1e-6

# Captions whose tokens depend on the captions around them in pycocoevalcap's one-file Java call
# (PTBLexer looks across line breaks): sentence-final single letters and initials before "The"/"A",
# abbreviations before a capital or at the end of the file, "No." before a number; plus decimals,
# times, contractions, odd punctuation, upper case and non-ASCII letters.
HARD_ENDINGS = [
    "a circled white f.", "5, n and r.", "a sign with the letter b.", "J. R. R. Tolkien wrote it.",
    "a b.", "a flag of the U.S.", "the U.S.", "made in the u.s.a.", "he met J.R.R. Tolkien.",
    "cars, vans, trucks etc.", "a Ph.D. student", "at 10:30 a.m.", "a box from Acme Inc.",
    "it was Jan.", "a street in Calif.", "a shirt with a big X.", "the letter I.", "see fig. 3",
    "No. 5 on a jersey", "no.  7", "the word NO.", "an é.", "mr. and mrs. smith", "a man named Mr.",
]
HARD_STARTS = [
    "The dog is on the mat.", "A man rides a horse.", "THE BUS IS RED!", "Then a cat jumps.",
    "An old car.", "Their kite flies.", "However it rains.", "Mr. Smith waves.", "Bob is here.",
    "<b>bold</b> text", "the dog is on the mat", "It's a dog; it's not a cat.", "I. e. nothing",
    "3.5 kg of apples", "10:30 on the clock", "\"Quoted\" words (in brackets) [and more]...",
    "Don't stop -- can't stop!? won't stop...", "Émile's café — naïve ÜBER", "So what?",
]
OTHER = [
    "a man's hat, isn't it?", "price: $3.50 -- 1,000 items", "\"hi\" 'there' `x` (a) [b] {c}",
    "wait... what?! no!! yes?!", "A DOG ON A SKATEBOARD.", "don't it's can't won't I'd've",
    "Zürich's straße; ΣΟΦΟΣ and привет.", "a 2-year-old t-shirt at 9:00am", "", "...",
]


def make_hard_corpus(n: int = 90, seed: int = 11) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Images whose references and candidates end/start with HARD_ENDINGS/HARD_STARTS in every
    order, so that the lexer's look-ahead across captions (and images) is exercised."""
    rng = random.Random(seed)
    pool = HARD_ENDINGS + HARD_STARTS + OTHER
    results: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    for i in range(n):
        caps = []
        for _ in range(rng.randint(2, 5)):
            caps.append(rng.choice(HARD_ENDINGS) if rng.random() < 0.5 else rng.choice(pool))
        if rng.random() < 0.6:
            caps[rng.randrange(len(caps))] = rng.choice(HARD_STARTS)
        refs[f"h{i}"] = caps
        results[f"h{i}"] = rng.choice([rng.choice(caps), rng.choice(pool), rng.choice(HARD_ENDINGS)])
    # the end of each file (an initial keeps its period there; "etc." gets a second one) and, for a
    # tokenizer that would read references and candidates as one file, a capitalised "The" after it
    refs[f"h{n - 1}"][-1] = "a circled white f."
    results[f"h{n - 1}"] = "cars, vans, trucks etc."
    results["h0"] = "The dog is on the mat."
    return results, refs


@pytest.fixture(scope="module")
def corpus():
    results, refs = make_corpus(264, 5, seed=7)  # 24 of each candidate kind
    return results, refs


def _oracle_tokenize(captions):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()):
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


@pytest.fixture(scope="module")
def tokenized(corpus):
    """The corpus tokenised as pycocoevalcap does (its own Java tokenizer when java exists)."""
    results, refs = corpus
    if HAVE_JAVA:
        pytest.importorskip("pycocoevalcap")
        gts = _oracle_tokenize(refs)
        res = _oracle_tokenize({k: [v] for k, v in results.items()})
    else:
        gts = tokenize_corpus(refs)
        res = tokenize_corpus({k: [v] for k, v in results.items()})
    return gts, res


def test_corpus_is_varied(corpus):
    results, refs = corpus
    assert len(results) >= 200
    cands = list(results.values())
    assert "" in cands or any(not c.strip() for c in cands)
    assert any(len(c.split()) > 60 for c in cands)
    assert any(c.isupper() for c in cands)
    assert any(any(ch.isdigit() for ch in c) for c in cands)
    assert any(any(ord(ch) > 127 for ch in c) for c in cands)
    assert any(any(ch in ',.!?;:()"' for ch in c) for c in cands)
    assert len(KINDS) >= 10


def test_fast_metrics_equal_pycocoevalcap(tokenized):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = tokenized
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, bleu_per = Bleu(4).compute_score(gts, res)
        rouge, rouge_per = Rouge().compute_score(gts, res)
        cider, cider_per = Cider().compute_score(gts, res)
    corpus, per = score_tokenized(gts, {k: v[0] for k, v in res.items()})
    for n in range(4):
        assert corpus[f"Bleu_{n + 1}"] == pytest.approx(bleu[n], abs=TOL)
        for i, key in enumerate(gts):
            assert per[key][f"Bleu_{n + 1}"] == pytest.approx(bleu_per[n][i], abs=TOL)
    assert corpus["ROUGE_L"] == pytest.approx(rouge, abs=TOL)
    assert corpus["CIDEr"] == pytest.approx(cider, abs=TOL)
    for i, key in enumerate(gts):
        assert per[key]["ROUGE_L"] == pytest.approx(rouge_per[i], abs=TOL)
        assert per[key]["CIDEr"] == pytest.approx(cider_per[i], abs=TOL)
    # the corpus really exercises the edge cases
    assert any(v == 0 for v in cider_per) and max(cider_per) > 1.0
    assert any(not v[0] for v in res.values())


@pytest.mark.skipif(not HAVE_JAVA, reason="java is not on the PATH")
def test_python_tokenizer_equals_java_tokenizer(corpus, tokenized):
    results, refs = corpus
    gts, res = tokenized
    ref_lines = ptb_tokenize_lines([c for caps in refs.values() for c in caps])
    assert ref_lines == [c for caps in gts.values() for c in caps]
    assert ptb_tokenize_lines(list(results.values())) == [v[0] for v in res.values()]


@pytest.mark.skipif(not HAVE_JAVA, reason="java is not on the PATH")
def test_python_tokenizer_equals_java_on_hard_cases():
    java = tokenize_corpus({"x": TRICKY}, tokenizer="java")["x"]
    for line, got, expected in zip(TRICKY, ptb_tokenize_lines(TRICKY), java):
        assert got == expected, line


@pytest.mark.skipif(not HAVE_JAVA, reason="java is not on the PATH")
def test_seesay_java_tokenizer_equals_pycocoevalcap(corpus, tokenized):
    results, refs = corpus
    gts, res = tokenized
    assert tokenize_corpus(refs, tokenizer="java") == gts
    assert tokenize_corpus({k: [v] for k, v in results.items()}, tokenizer="java") == res


@pytest.fixture(scope="module")
def hard_corpus():
    """The generated corpus interleaved with make_hard_corpus's images."""
    results, refs = make_corpus(66, 5, seed=5)
    hard_results, hard_refs = make_hard_corpus()
    keys = list(results)
    hard_keys = list(hard_results)
    order = [k for pair in zip(hard_keys, keys) for k in pair] + hard_keys[len(keys) :]
    order.remove(hard_keys[-1])
    order.append(hard_keys[-1])  # its captions end both files
    both_results = {**results, **hard_results}
    both_refs = {**refs, **hard_refs}
    return {k: both_results[k] for k in order}, {k: both_refs[k] for k in order}


@pytest.fixture(scope="module")
def hard_oracle(hard_corpus):
    """pycocoevalcap 1.2 on hard_corpus: its tokens, then BLEU-1..4, ROUGE-L and CIDEr-D."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    results, refs = hard_corpus
    gts = _oracle_tokenize(refs)
    res = _oracle_tokenize({k: [v] for k, v in results.items()})
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, bleu_per = Bleu(4).compute_score(gts, res)
        rouge, rouge_per = Rouge().compute_score(gts, res)
        cider, cider_per = Cider().compute_score(gts, res)
    corpus = {f"Bleu_{n + 1}": bleu[n] for n in range(4)} | {"ROUGE_L": rouge, "CIDEr": cider}
    per = {
        key: {f"Bleu_{n + 1}": bleu_per[n][i] for n in range(4)}
        | {"ROUGE_L": rouge_per[i], "CIDEr": cider_per[i]}
        for i, key in enumerate(gts)
    }
    return gts, res, corpus, per


@pytest.mark.skipif(not HAVE_JAVA, reason="java is not on the PATH")
def test_hard_corpus_needs_the_look_ahead(hard_corpus, hard_oracle):
    """The corpus has captions whose pycocoevalcap tokens differ from those of the caption alone."""
    results, refs = hard_corpus
    gts = hard_oracle[0]
    alone = [ptb_tokenize(c) for caps in refs.values() for c in caps]
    in_file = [c for caps in gts.values() for c in caps]
    changed = {b for a, b in zip(alone, in_file) if a != b}
    assert any(t.endswith("circled white f") for t in changed)  # "f." split off before "The ..."
    assert len(changed) >= 4
    assert gts[list(results)[-1]][-1] == "a circled white f."  # kept at the end of the file
    assert list(results)[0] == "h0" and results["h0"].startswith("The ")


@pytest.mark.skipif(not HAVE_JAVA, reason="java is not on the PATH")
@pytest.mark.parametrize("tokenizer", ["python", "java"])
def test_scores_equal_pycocoevalcap_on_hard_corpus(hard_corpus, hard_oracle, tokenizer):
    """Both tokenizers, through compute_scores, give pycocoevalcap's tokens and scores per image."""
    results, refs = hard_corpus
    gts, res, corpus, per = hard_oracle
    assert tokenize_corpus(refs, tokenizer=tokenizer) == gts
    assert tokenize_corpus({k: [v] for k, v in results.items()}, tokenizer=tokenizer) == res
    report = compute_scores(results, refs, tokenizer=tokenizer)
    for name, value in corpus.items():
        assert report.corpus[name] == pytest.approx(value, abs=TOL), name
    for key in results:
        for name, value in per[key].items():
            assert report.per_image[key][name] == pytest.approx(value, abs=TOL), (key, name)


@pytest.mark.parametrize(
    "caption,tokens",
    [
        ("A man (riding) a horse's back, isn't it?", "a man -lrb- riding -rrb- a horse 's back is n't it"),
        ("I can't SEE the U.S. flag...", "i ca n't see the u.s. flag"),
        ("Two dogs -- one brown; one white!", "two dogs one brown one white"),
        ("3.5 km/h at 10:30, 1,000 items", "3.5 km/h at 10:30 1,000 items"),
        ("“Café” — naïve 😀 東京", "café naïve 東京"),
        ("", ""),
        ("...", ""),
        ("a circled white f.", "a circled white f."),
        ("cars, vans etc.", "cars vans etc."),
        ("J. R. R. Tolkien. The end", "j. r. r. tolkien the end"),
        ("a b. The dog", "a b the dog"),
        ("the U.S. The flag", "the u.s. the flag"),
        ("No. 5 and no.  6", "no. 5 and no 6"),
    ],
)
def test_ptb_tokenize_examples(caption, tokens):
    assert ptb_tokenize(caption) == tokens


def test_compute_scores_fast_path(corpus):
    results, refs = corpus
    report = compute_scores(results, refs)
    assert set(report.corpus) == {
        "Bleu_1",
        "Bleu_2",
        "Bleu_3",
        "Bleu_4",
        "METEOR",
        "ROUGE_L",
        "CIDEr",
        "SPICE",
    }
    assert report.corpus["METEOR"] is None and report.corpus["SPICE"] is None
    assert 0 < report.corpus["Bleu_4"] < report.corpus["Bleu_1"] < 1
    assert set(report.per_image) == set(results)
    assert set(next(iter(report.per_image.values()))) == {
        "Bleu_1",
        "Bleu_2",
        "Bleu_3",
        "Bleu_4",
        "ROUGE_L",
        "CIDEr",
    }
    # perfect candidates score high; CIDEr-D of a copy of a reference is > 1
    perfect = compute_scores({k: v[0] for k, v in refs.items()}, refs)
    assert perfect.corpus["Bleu_1"] > report.corpus["Bleu_1"]
    assert perfect.corpus["CIDEr"] > 1.0


def test_compute_scores_edge_cases():
    refs = {"1": ["a dog on grass"], "2": ["a cat", "the cat"]}
    # a single image: log(N) = 0 so CIDEr-D is 0, as in pycocoevalcap
    one = compute_scores({"1": "a dog on grass"}, refs)
    assert one.corpus["CIDEr"] == 0.0 and one.corpus["Bleu_4"] == pytest.approx(1.0)
    empty = compute_scores({"1": "", "2": "..."}, refs)
    assert empty.corpus["Bleu_1"] == 0.0 and empty.corpus["CIDEr"] == 0.0
    with pytest.raises(SeesayError, match="no references"):
        compute_scores({"3": "a dog"}, refs)
    with pytest.raises(SeesayError, match="no results"):
        compute_scores({}, refs)
    with pytest.raises(SeesayError, match="non-empty list"):
        compute_scores({"1": "a"}, {"1": []})


def test_lcs_bit_parallel_equals_dynamic_programme():
    my_lcs = pytest.importorskip("pycocoevalcap.rouge.rouge").my_lcs

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        assert lcs_length(a, b) == my_lcs(a, b)


def test_cider_reward_interface(tokenized):
    gts, res = tokenized
    corpus, per = score_tokenized(gts, {k: v[0] for k, v in res.items()})
    scorer = CiderD(gts)
    keys = list(gts)[:50]
    many = scorer.score_many(keys + keys, [res[k][0] for k in keys] + [gts[k][0] for k in keys])
    assert np.allclose(many[:50], [per[k]["CIDEr"] for k in keys], atol=TOL)
    assert many[50:].mean() > many[:50].mean()


def test_chinese_uses_jieba_not_ptb():
    pytest.importorskip("jieba")
    refs = {
        "a": ["一个男人在街上骑自行车。", "男人骑着自行车"],
        "b": ["两只狗在草地上玩耍", "草地上有两只狗"],
    }
    results = {"a": "一个男人骑着自行车", "b": "两只猫在草地上"}
    report = compute_scores(results, refs, lang="zh")
    toks = tokenize_corpus(refs, lang="zh")
    assert " " in toks["a"][0] and "骑" in toks["a"][1]
    corpus, _ = score_tokenized(
        toks, {k: v[0] for k, v in tokenize_corpus({k: [v] for k, v in results.items()}, lang="zh").items()}
    )
    assert report.corpus["CIDEr"] == pytest.approx(corpus["CIDEr"])
    assert report.corpus["Bleu_1"] > 0


def test_full_path_without_java_notes_and_keeps_fast_metrics(monkeypatch, corpus):
    from seesay.metrics import java as jv

    monkeypatch.setattr(jv, "java_path", lambda: None)
    results, refs = corpus
    report = compute_scores(results, refs, full=True)
    assert report.corpus["METEOR"] is None and report.corpus["SPICE"] is None
    assert report.corpus["CIDEr"] is not None
    assert len(report.notes) == 1 and "java" in report.notes[0] and "\n" not in report.notes[0]


def test_spice_without_models_is_none_with_reason(monkeypatch, tmp_path):
    from seesay.metrics import java as jv

    monkeypatch.setenv("SEESAY_SPICE_MODELS", str(tmp_path))
    path, reason = jv.find_spice_models()
    assert path is None and str(tmp_path) in reason
    (tmp_path / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    (tmp_path / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert jv.find_spice_models()[0] == tmp_path


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_JAVA, reason="java is not on the PATH")
def test_full_path_meteor_equals_pycocoevalcap(monkeypatch, tmp_path, corpus):
    """compute_scores(full=True) = pycocoevalcap's Meteor on the same tokens; SPICE None + one note."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.meteor.meteor import Meteor

    results, refs = corpus
    keys = list(results)[:66]  # 6 of each candidate kind
    results = {k: results[k] for k in keys}
    refs = {k: refs[k] for k in keys}
    monkeypatch.setenv("SEESAY_SPICE_MODELS", str(tmp_path))
    report = compute_scores(results, refs, full=True, tokenizer="java")
    assert report.corpus["SPICE"] is None and len(report.notes) == 1 and "SPICE" in report.notes[0]
    gts = _oracle_tokenize(refs)
    res = _oracle_tokenize({k: [v] for k, v in results.items()})
    meteor = Meteor()
    try:
        score, scores = meteor.compute_score(gts, res)
    finally:
        del meteor
    assert report.corpus["METEOR"] == pytest.approx(score, abs=TOL)
    assert not math.isnan(report.corpus["METEOR"]) and 0 < score < 1
    for key, value in zip(keys, scores):
        assert report.per_image[key]["METEOR"] == pytest.approx(value, abs=TOL)


@pytest.mark.skipif(not HAVE_JAVA, reason="java is not on the PATH")
def test_spice_failure_is_a_note_not_a_crash(monkeypatch, tmp_path):
    """Broken CoreNLP jars: SPICE's Java process fails; SPICE is None with one line, the rest stays."""
    from seesay.metrics import java as jv

    for name in jv.CORENLP_JARS:
        (tmp_path / name).write_bytes(b"not a jar")
    monkeypatch.setattr(jv, "meteor_score", lambda gts, res: (0.5, [0.5] * len(gts)))
    refs = {"1": ["a dog on the grass"], "2": ["a cat on a mat"]}
    report = compute_scores({"1": "a dog", "2": "a cat"}, refs, full=True, spice_models=str(tmp_path))
    assert report.corpus["METEOR"] == 0.5 and report.corpus["SPICE"] is None
    assert len(report.notes) == 1 and report.notes[0].startswith("SPICE not computed")
    assert "\n" not in report.notes[0]
