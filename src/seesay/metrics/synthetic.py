"""A generated caption corpus for testing and benchmarking the metrics.

``make_corpus(n_images, n_refs, seed)`` returns (results, references) in the shape
``compute_scores`` takes. Candidates are deliberately varied: ordinary captions that share
words with their references, empty strings, repeated words, very long captions, heavy
punctuation, upper case, digits and numbers, contractions, non-ASCII letters, curly quotes,
dashes, emoji and odd whitespace, so that tokenisation and every edge case of the scorers
(zero matches, zero length, brevity penalty, CIDEr clipping) are exercised.
"""

from __future__ import annotations

import random

_DET = ["a", "the", "an", "two", "three", "some", "A", "The", "one", "several"]
_ADJ = [
    "small",
    "large",
    "red",
    "white",
    "black",
    "young",
    "old",
    "wooden",
    "busy",
    "empty",
    "green",
    "little",
    "tall",
    "brown",
    "blue",
    "yellow",
    "happy",
    "wet",
    "dark",
    "bright",
]
_NOUN = [
    "man",
    "woman",
    "dog",
    "cat",
    "horse",
    "train",
    "bus",
    "table",
    "street",
    "kitchen",
    "pizza",
    "boy",
    "girl",
    "bird",
    "car",
    "field",
    "beach",
    "surfboard",
    "plate",
    "giraffe",
    "elephant",
    "bench",
    "people",
    "motorcycle",
    "skateboard",
    "laptop",
    "umbrella",
    "clock",
    "tower",
    "sheep",
]
_VERB = [
    "sitting on",
    "standing next to",
    "riding",
    "holding",
    "eating",
    "walking down",
    "looking at",
    "playing with",
    "parked near",
    "flying over",
    "lying on",
    "jumping over",
    "carrying",
    "near",
]
_PLACE = [
    "in a field",
    "on the street",
    "at the beach",
    "in the kitchen",
    "next to a building",
    "under a tree",
    "on a table",
    "in the snow",
    "by the water",
    "in front of a house",
]
_NON_ASCII = [
    "café",
    "naïve",
    "über",
    "piñata",
    "façade",
    "crème brûlée",
    "Zürich",
    "São Paulo",
    "jalapeño",
    "résumé",
    "собака",
    "кошка",
    "東京",
    "北京",
    "ελέφαντας",
    "smörgåsbord",
    "straße",
    "Ærø",
    "Łódź",
    "İstanbul",
]
_PUNCT_BITS = [
    ",",
    ".",
    "!",
    "?",
    ";",
    ":",
    "...",
    "--",
    " - ",
    "(",
    ")",
    '"',
    "'",
    "!!",
    "?!",
    "…",
    "\u201c",
    "\u201d",
    "\u2019",
    "\u2014",
    "\u2013",
    "[",
    "]",
    "&",
    "/",
    "%",
]
_CONTRACTIONS = [
    "it's",
    "dog's",
    "don't",
    "can't",
    "isn't",
    "they're",
    "we'll",
    "I'm",
    "you've",
    "he'd",
    "won't",
    "cannot",
    "men's",
    "children's",
    "there's",
    "that's",
    "doesn't",
    "aren't",
    "o'clock",
    "boys'",
    "DON'T",
    "It's",
]
_NUMBERS = [
    "2",
    "3",
    "10",
    "100",
    "3.5",
    "1,000",
    "10:30",
    "1990s",
    "2nd",
    "21st",
    "4x4",
    "1/2",
    "50%",
    "$5",
    "$3.50",
    "-5",
    "+5",
    ".5",
    "3-4",
    "12th",
    "2-year-old",
    "covid-19",
    "A1",
    "mp3",
    "t-shirt",
    "x-ray",
    "e-mail",
    "U.S.",
    "e.g.",
    "a.m.",
    "p.m.",
    "Mr.",
    "Dr.",
    "St.",
]
_EMOJI = ["😀", "🐶", "🍕", "❤", "★", "✓", "→", "©", "°", "×", "−", "€", "£", "½"]


def _base(rng: random.Random) -> list[str]:
    words = [rng.choice(_DET)]
    if rng.random() < 0.6:
        words.append(rng.choice(_ADJ))
    words.append(rng.choice(_NOUN))
    words += rng.choice(_VERB).split()
    words.append(rng.choice(_DET[:3]))
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJ))
    words.append(rng.choice(_NOUN))
    if rng.random() < 0.5:
        words += rng.choice(_PLACE).split()
    return words


def _caption(rng: random.Random, kind: str) -> str:
    words = _base(rng)
    if kind == "plain":
        return " ".join(words) + rng.choice(["", ".", " .", "."])
    if kind == "empty":
        return rng.choice(["", " ", "\t", "...", ".", "!!", "—", "  .  "])
    if kind == "repeat":
        w = rng.choice(words)
        return " ".join([w] * rng.randint(2, 12) + words[: rng.randint(0, 4)])
    if kind == "long":
        out = []
        while len(out) < rng.randint(60, 140):
            out += _base(rng) + [rng.choice(["and", "with", ",", "while"])]
        return " ".join(out)
    if kind == "punct":
        out = []
        for w in words:
            if rng.random() < 0.3:
                out.append(rng.choice(_PUNCT_BITS))
            out.append(w)
        if rng.random() < 0.5:
            out.append(rng.choice([".", "!", "?", "...", "!!!"]))
        glue = rng.choice([" ", "", " "])
        return (
            " ".join(out) if glue == " " else "".join(x if x in _PUNCT_BITS else " " + x for x in out).strip()
        )
    if kind == "upper":
        s = " ".join(words)
        return rng.choice([s.upper(), s.title(), s.capitalize() + "."])
    if kind == "digits":
        pos = rng.randrange(len(words) + 1)
        return " ".join(words[:pos] + [rng.choice(_NUMBERS)] + words[pos:] + [rng.choice(_NUMBERS)])
    if kind == "contraction":
        pos = rng.randrange(len(words) + 1)
        return " ".join(words[:pos] + [rng.choice(_CONTRACTIONS)] + words[pos:])
    if kind == "nonascii":
        pos = rng.randrange(len(words) + 1)
        extra = [rng.choice(_NON_ASCII)]
        if rng.random() < 0.4:
            extra.append(rng.choice(_EMOJI))
        return " ".join(words[:pos] + extra + words[pos:])
    if kind == "whitespace":
        return rng.choice(["  ", "\t", "\n", " \u00a0"]).join(words) + rng.choice(["", "  ", "\n"])
    if kind == "copy":
        return ""  # replaced by a reference copy by the caller
    raise ValueError(kind)


KINDS = (
    "plain",
    "empty",
    "repeat",
    "long",
    "punct",
    "upper",
    "digits",
    "contraction",
    "nonascii",
    "whitespace",
    "copy",
)


def make_corpus(
    n_images: int = 250, n_refs: int = 5, seed: int = 0, *, varied: bool = True
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(results, references): image id -> candidate, image id -> list of ``n_refs`` captions.

    With ``varied`` the candidates cycle through every kind in ``KINDS`` and one reference in
    four is itself unusual; without it all captions are plain (the benchmark's setting).
    """
    rng = random.Random(seed)
    results: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    for i in range(n_images):
        key = str(100000 + i)
        ref_kinds = ["plain"] * n_refs
        if varied:
            ref_kinds = [rng.choice(KINDS[:-1]) if rng.random() < 0.25 else "plain" for _ in range(n_refs)]
        refs = [_caption(rng, k) for k in ref_kinds]
        kind = KINDS[i % len(KINDS)] if varied else "plain"
        cand = rng.choice(refs) if kind == "copy" else _caption(rng, kind)
        references[key] = refs
        results[key] = cand
    return results, references
