"""Tokenisation as COCO caption evaluation does it.

pycocoevalcap 1.2 lowercases and tokenises every caption with Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase`` (a Java program), then drops the punctuation tokens
in ``PUNCTUATIONS``. Two implementations are offered:

* ``"python"`` (default for the fast path): a re-implementation of the PTBLexer rules that
  matter for captions: contractions (``can't`` -> ``ca n't``, ``dog's`` -> ``dog 's``),
  quotes, brackets (``(`` -> ``-lrb-``, which pycocoevalcap does *not* remove because it only
  lists upper-case ``-LRB-``), periods after abbreviations and initials, numbers
  (``3.5``, ``1,000``, ``10:30``), hyphenated words, dashes, ellipses, currency, fractions,
  non-ASCII letters and the characters the Java lexer deletes (emoji). PTBLexer looks past the
  whitespace, across line breaks, so a caption's tokens depend on the captions after it in the
  file pycocoevalcap writes (one caption a line): an initial or acronym before "The"/"A"/... loses
  or doubles its period ("white f." + "The dog" -> "white f ." / "U.S. . the"), an abbreviation
  such as "etc."/"Inc."/"Jan." gets a second period before a capital or at the end of the file,
  "No."/"fig." keep theirs only before a number. ``ptb_tokenize_lines`` reproduces this for a
  list of captions read as one file; ``ptb_tokenize`` reads one caption alone. It equals the Java
  output on the test corpora of tests/test_metrics.py; rare constructs (unusual Unicode symbols
  and scripts, emoticons, tokens glued to punctuation) may differ.
* ``"java"`` (``seesay.metrics.java.java_ptb_tokenize``): the very jar pycocoevalcap ships, one
  ``java`` process for all captions of an evaluation. Exotic Unicode line separators are replaced by spaces first (pycocoevalcap passes
  them through, and the Java lexer then splits the line, which misaligns every later caption).

Chinese (``lang="zh"``) is segmented with jieba and not PTB-tokenised, as the AI Challenger
evaluation did.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, verbatim
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

PTB_JAR_NAME = "stanford-corenlp-3.4.1.jar"

# --------------------------------------------------------------------------------------------
# Python re-implementation
# --------------------------------------------------------------------------------------------

_CHAR_MAP = {
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2039": "'", "\u203a": "'",
    "\u2013": " -- ", "\u2014": " -- ", "\u2015": " -- ",
    "\u2026": " ... ",
    "\u00a2": " cents ", "\u20ac": " $ ", "\u00a3": " # ",
    "\u00bc": " 1/4 ", "\u00bd": " 1/2 ", "\u00be": " 3/4 ",
}  # fmt: skip
_CHAR_RE = re.compile("|".join(map(re.escape, _CHAR_MAP)))

# Characters PTBLexer 3.4.1 deletes as untokenizable (a conservative list: the ones captions
# meet). Characters outside the Basic Multilingual Plane (emoji) are deleted too.
_DELETED = set("\u2012\u20b9\u300c\u300d\u300e\u300f\u3010\u3011")

# PTBLexer 3.4.1's abbreviations, in its notation: a letter in brackets has that case only, the
# others match either case. Both keep their period; ABBREV1 ones split it off again (``etc.`` ->
# ``etc. .``) before a sentence end (two spaces / a line break, or a space and a capital) and within
# one character of the end of the file. The lists were read off the jar by tokenising every
# 2-5-letter string and every case variant of each hit.
_ABBREV1 = (
    "al [A]z co ct ga jr ky [L]a md mo [P]a rd rt sq sr va vt ala apr [A]rk aug bhd cos dak dec [D]el esq "
    "est etc ext feb fla fri [I]ll inc ind jan jul jun kan ltd mar mon neb nev nov oct [O]re plc pt[e] pt[y] "
    "sep seq sys tel [T]ex thu tue wed wis wyo ariz assn bldg blvd bros colo conn corp intl kans [M]ass mich "
    "minn [M]iss mont okla penn ppt[e] ppt[y] pt[e]s pt[y]s sept tenn tues univ [W]ash wisc calif ppt[e]s "
    "ppt[y]s thurs bancorp"
)
_ABBREV2 = (
    "cf dr ft lt mr ms mt ph st vs wm adj adm adv ave cie col cpl det drs ens gen gov hon jos maj m[f]g mme "
    "mrs m[t]g pfc pvt rep rev sen sfc sgt spc ste alex asst atty brig capt cmdr dept elec govs insp invt "
    "mlle msgr natl pres prof reps sens supt assoc attys comdr lieut profs supts treas messrs"
)


def _abbrev_re(words: str) -> re.Pattern[str]:
    alts = (re.sub(r"\[(\w)\]", r"(?-i:\1)", w) for w in words.split())
    return re.compile("(?i:" + "|".join(alts) + ")")


_ABBREV1_RE = _abbrev_re(_ABBREV1)
_ABBREV2_RE = _abbrev_re(_ABBREV2)
# PTBLexer's whitespace and line breaks (SPACENL)
_SPNL = "[ \t\u00a0\u2000-\u200a\u3000\n\r\u0085\u2028\u2029\u000b\u000c]"
# An acronym ("u.s.", and a single letter "f.") is sentence-final when whitespace and one of these
# words (case-sensitive first letter, as in PTBLexer) or an SGML tag, then whitespace, follow:
# "f. The" -> "f . the", "U.S. The" -> "u.s. . the". The words were found by tokenising every
# capitalised 1-5-letter string after "a b." (the longer ones are PTBLexer's).
_NEXT_WORD = re.compile(
    _SPNL + "+(?:A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)"
    "|I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore|r\\.|s\\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)|S(?i:he|ince|o|ome|uch)"
    "|T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)|Y(?i:et|ou)|</?[A-Za-z!][^>]*>)" + _SPNL
)
# a sentence end after an ABBREV1 abbreviation (PTBLexer's SENTEND), less its "space + capital" case
_SENTEND = re.compile(_SPNL + "(?:" + _SPNL + "|</?[A-Za-z!][^>]*>)")
_SPNL_CHARS = frozenset(" \t\u00a0\u3000\n\r\u0085\u2028\u2029\u000b\u000c").union(map(chr, range(0x2000, 0x200B)))


def _sentence_end(text: str, pos: int) -> bool:
    """Whether PTBLexer splits the period off an ABBREV1 abbreviation ending at ``text[pos]``."""
    left = len(text) - pos
    if left < 2:  # its "{ABBREV1}" rule near the end of the file, unless ",;:" follows
        return not (left == 1 and text[pos] in ",;:")
    return bool(_SENTEND.match(text, pos)) or (text[pos] in _SPNL_CHARS and text[pos + 1].isupper())


_CLITIC = re.compile(r"(?i)(n't|'s|'re|'ll|'d|'ve|'m)$")
# a word: letters/digits/underscore joined by - . / @ ? !, by : or , between digits (10:30, 1,000),
# with apostrophe pieces (split later by _apostrophe_word)
_WORD = re.compile(r"\w+(?:(?:[-./@?!]|:(?=\d)|,(?=\d\d\d))\w+|'\w+|n't)*")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,:/-]\d+)*|\.\d+)")
_ACRONYM = re.compile(r"(?:[A-Za-z]\.){2,}")
_AMP = re.compile(r"[A-Z]+&[A-Z]+(?!\w)")
_DASHES = re.compile(r"-{2,}")
_DOTS = re.compile(r"\.{2,}")
_BANGS = re.compile(r"[!?]+")
_HASHTAG = re.compile(r"#\w+")
_AT = re.compile(r"@\w+")
_TAG = re.compile(r"</?\w+>")
_SPECIAL_APOS = re.compile(r"(?i)'(?:em|cause|[0-9]0s|\d\d|n'|s|re|ll|d|ve|m)(?![\w'])")
_URL = re.compile(r"(?i)(?:https?|ftp)://[\w./?=&%#~:+-]+")
_T_WAS = re.compile(r"(?i)'(t)(is|was)(?![\w'])")
_KEEP_APOS = re.compile(r"(?i)[a-hj-xz]'[a-z]{2,}|[a-z]+[aeiouy]'[aeiou][a-z]*")  # o'clock, d'ye, ma'am
_N_APOS = re.compile(r"(?i)(\w+?)'n'(\w+)")
_Y_APOS = re.compile(r"(?i)(y')(\w+)")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}
# abbreviations that keep their period only before a number ("No. 5", "fig.3")
_BEFORE_NUMBER = "(?i:ca|no|op|pp|art|figs?|nos|prop)"
_NUMBER_AFTER = re.compile(_SPNL + "?\\d")
_DOTTED_ABBREV = re.compile(_BEFORE_NUMBER + r"\.(?=\d)|(?i:ph\.d\.)")
_BEFORE_NUMBER_RE = re.compile(_BEFORE_NUMBER)
_TIME_AMPM = re.compile(r"(?i)(\d+:\d+)(am|pm|a\.m\.|p\.m\.)(?![\w])")
_APOS_YEAR = re.compile(r"(\w+)'(\d\d)")  # 5'10 -> 5 '10
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3}  # can not, gon na, got ta, wan na


def _apostrophe_word(text: str, out: list[str]) -> None:
    """Split a run like ``I'd've``, ``can't``, ``o'clock`` the way PTBLexer does."""
    if _CLITIC.fullmatch(text) or _KEEP_APOS.fullmatch(text):
        out.append(text)
        return
    m = _APOS_YEAR.fullmatch(text)
    if m:
        out.extend([m.group(1), "'" + m.group(2)])
        return
    m = _N_APOS.fullmatch(text) or _Y_APOS.fullmatch(text)
    if m:
        out.extend(g for g in (m.group(1), "'n'" if m.re is _N_APOS else None, m.group(2)) if g)
        return
    tail: list[str] = []
    m = _CLITIC.search(text)
    while m and m.start() > 0:
        tail.insert(0, m.group(1))
        text = text[: m.start()]
        m = _CLITIC.search(text)
    for i, part in enumerate(text.split("'")):
        if i:
            out.append("'")
        if part:
            out.append(part)
    out.extend(tail)


def _word(text: str, out: list[str]) -> None:
    cut = _SPLIT_WORDS.get(text.lower())
    if cut:
        out.extend([text[:cut], text[cut:]])
    elif "'" in text:
        _apostrophe_word(text, out)
    else:
        out.append(text)


def _scan(chunk: str, out: list[str], text: str = "", end: int = 0) -> None:
    """Tokens of one whitespace-free chunk, appended to ``out``. ``text[end:]`` is what follows
    the chunk in the file PTBLexer reads (the rest of the line, then the next captions): a few
    of its rules look past the whitespace, across line breaks."""
    i, n = 0, len(chunk)
    while i < n:
        c = chunk[i]
        rest = chunk[i:]
        m = _SPECIAL_APOS.match(rest) or _URL.match(rest)
        if m:
            out.append(m.group(0))
            i += m.end()
            continue
        m = _T_WAS.match(rest)
        if m:
            out.extend(["'" + m.group(1), m.group(2)])
            i += m.end()
            continue
        if c.isalnum() or c == "_":
            m = _ACRONYM.match(rest)
            if m and not (m.end() < len(rest) and rest[m.end()].isalnum()):
                out.append(m.group(0))  # u.s. e.g. a.m.; "u.s. ." before a sentence
                if _NEXT_WORD.match(text, end - n + i + m.end()):
                    out.append(".")
                i += m.end()
                continue
            m = _AMP.match(rest)  # AT&T, Q&A
            if m:
                out.append(m.group(0))
                i += m.end()
                continue
            m = _DOTTED_ABBREV.match(rest)  # No.5 -> no. 5; ph.d. (an ABBREV1)
            if m:
                out.append(m.group(0))
                i += m.end()
                if m.group(0).lower() == "ph.d." and _sentence_end(text, end - n + i):
                    out.append(".")
                continue
            m = _TIME_AMPM.match(rest)  # 9:00am -> 9:00 am
            if m:
                out.extend([m.group(1), m.group(2)])
                i += m.end()
                continue
            word = _WORD.match(rest).group(0)
            j = i + len(word)
            # abbreviations (Mr.) and initials (a.) keep their period; "No." only before a number;
            # before a sentence, an initial loses it and an ABBREV1 abbreviation gets a second one
            extra = False
            if j < n and chunk[j] == ".":
                pos = end - n + j + 1  # just after the period, in text
                if len(word) == 1 and word.isascii() and word.isalpha():
                    keep = not _NEXT_WORD.match(text, pos)
                elif _ABBREV1_RE.fullmatch(word):
                    keep, extra = True, _sentence_end(text, pos)
                else:
                    keep = bool(_ABBREV2_RE.fullmatch(word)) or bool(
                        _BEFORE_NUMBER_RE.fullmatch(word) and _NUMBER_AFTER.match(text, pos)
                    )
                if keep:
                    word += "."
                    j += 1
            _word(word, out)
            if extra:
                out.append(".")
            i = j
            continue
        if (
            c in "-+."
            and i + 1 < n
            and (
                chunk[i + 1].isdigit()
                or (c != "." and chunk[i + 1] == "." and i + 2 < n and chunk[i + 2].isdigit())
            )
        ):
            m = _NUMBER.match(rest)  # -5 +5 .5 -.5
            if m:
                out.append(m.group(0))
                i += m.end()
                continue
        m = (
            (c == "#" and _HASHTAG.match(rest))
            or (c == "@" and _AT.match(rest))
            or (c == "<" and _TAG.match(rest))
        )
        if m and (c != "#" or rest[1:2].isalpha()):
            out.append(m.group(0))
            i += m.end()
            continue
        if c == "-":
            m = _DASHES.match(rest)
            out.append("--" if m else "-")
            i += m.end() if m else 1
        elif c == ".":
            m = _DOTS.match(rest)
            k = m.end() if m else 1
            out.extend([".", "."] if k == 2 else ["..." if k > 2 else "."])
            i += k
        elif c in "!?":
            m = _BANGS.match(rest)
            out.append(m.group(0))
            i += m.end()
        else:
            out.append(_BRACKETS.get(c, c))
            i += 1


def _normalise(line: str) -> str:
    line = _CHAR_RE.sub(lambda m: _CHAR_MAP[m.group(0)], line).replace("&amp;", "&")
    if any(ord(ch) > 0xFFFF or ch in _DELETED for ch in line):
        line = "".join(" " if (ord(ch) > 0xFFFF or ch in _DELETED) else ch for ch in line)
    return line


_CHUNK = re.compile(r"\S+")
def ptb_tokenize_lines_raw(captions: Sequence[str]) -> list[list[str]]:
    """PTB tokens (lower-cased, punctuation kept) of captions that PTBLexer reads as the lines of
    one file, as pycocoevalcap does: a caption's tokens can depend on the captions after it
    ("... a white f." keeps "f." unless the next line starts with "The dog"; "etc." at the very end
    of the file becomes "etc. ."), so the order and grouping of captions matter."""
    lines = [_normalise(c.replace("\n", " ")) for c in captions]
    text = "\n".join(lines)
    result = []
    start = 0
    for line in lines:
        out: list[str] = []
        for m in _CHUNK.finditer(line):
            _scan(m.group(0), out, text, start + m.end())
        result.append([t.lower() for t in out])
        start += len(line) + 1
    return result


def ptb_tokenize_lines(captions: Sequence[str]) -> list[str]:
    """Captions tokenised together as pycocoevalcap's ``PTBTokenizer.tokenize`` does (one file, one
    caption a line, in this order), punctuation tokens dropped, tokens joined by single spaces."""
    return [" ".join(t for t in toks if t not in PUNCTUATIONS) for toks in ptb_tokenize_lines_raw(captions)]


def ptb_tokenize_raw(line: str) -> list[str]:
    """PTB tokens of one caption (lower-cased) read alone, before the punctuation tokens are dropped."""
    return ptb_tokenize_lines_raw([line])[0]


def ptb_tokenize(caption: str) -> str:
    """One caption as pycocoevalcap's tokenizer returns it when it is the only caption of the
    call: lower-cased PTB tokens without punctuation tokens, joined by single spaces. For many
    captions use ``ptb_tokenize_lines`` (PTBLexer looks across captions)."""
    return ptb_tokenize_lines([caption])[0]
