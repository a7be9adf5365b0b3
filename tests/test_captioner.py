"""The captioner contract is real: a family that is not encoder + decoder, with a tokenizer of its
own whose special ids are not 0..3, trains, validates, evaluates and captions through the same
library paths and CLI as CaptionModel. Plus: strategies as values, one evaluation-language rule,
and the library never importing the applications."""

from __future__ import annotations

import ast
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import prepared_shapes
from seesay import cli
from seesay.captioner import caption_images, decode_split, evaluation_lang, require_captioner
from seesay.decoders.base import DecoderOutput
from seesay.decoding import Beam, DecodeResult, Greedy, Sample, Strategy, decode, strategy_from_options
from seesay.encoders.base import EncoderOutput
from seesay.registry import build_captioner, list_captioners, register_captioner
from seesay.tokenizers import TOKENIZER_FILE, register_tokenizer

torch.set_num_threads(1)


# ---- a tokenizer of its own: words first, the special ids at the end (pad is the last id) -------------


class TailTokenizer:
    kind = "tail-words"

    def __init__(self, words: list[str]) -> None:
        self.words = list(words)
        n = len(self.words)
        self.eos_id, self.bos_id, self.unk_id, self.pad_id = n, n + 1, n + 2, n + 3
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words) + 4

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TailTokenizer) and other.words == self.words

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in re.findall(r"[^\W_]+", text.lower())]

    encode_prompt = encode

    def id_to_token(self, i: int) -> str:
        return self.words[i] if i < len(self.words) else ["<eos>", "<bos>", "<unk>", "<pad>"][i - len(self.words)]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id):
                continue
            out.append(self.id_to_token(i))
        return " ".join(out)

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps({"type": "test-tail", "words": self.words}))


@register_tokenizer("test-tail")
def _load_tail(directory: Path, data: dict) -> TailTokenizer:
    return TailTokenizer(data["words"])


# ---- a bag-of-features captioner: colour histogram of 2x2 cells, a bigram LM conditioned on it -------


class BagCaptioner(nn.Module):
    """Not an encoder + decoder: a fixed colour pooling (nothing to train there, so training caches
    it) and a conditioned bigram language model that runs the step contract itself."""

    features_trainable = False

    def __init__(self, tokenizer: TailTokenizer, dim: int = 32, image_size: int = 32) -> None:
        super().__init__()
        from seesay.data.images import ImageLoader

        self.tokenizer = tokenizer
        self.dim = dim
        self.image_loader = ImageLoader(image_size)
        self.image_proj = nn.Linear(12, dim)
        self.embed = nn.Embedding(len(tokenizer), dim)
        self.out = nn.Linear(dim, len(tokenizer))

    # contract
    def spec(self) -> dict:
        return {"captioner": "bag_of_words", "dim": self.dim}

    def preprocess(self, image):
        return self.image_loader(image)

    def preprocess_config(self) -> dict:
        return {"image_size": self.image_loader.image_size}

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        cells = F.adaptive_avg_pool2d(x.to(self.out.weight.device), 2).flatten(2).transpose(1, 2)  # (B, 4, 3)
        return EncoderOutput(cells, cells.reshape(cells.shape[0], -1), (2, 2))

    def _core(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.image_proj(pooled)[:, None] + self.embed(tokens)))

    def forward(self, src, tokens, lengths, image_rows=None) -> DecoderOutput:
        enc = src if isinstance(src, EncoderOutput) else self.encode(src)
        pooled = enc.pooled if image_rows is None else enc.pooled.index_select(0, image_rows)
        return DecoderOutput(self._core(pooled, tokens[:, :-1]), None, {})

    @torch.no_grad()
    def generate(self, src, strategy: Strategy = Greedy(), *, prompt=None, max_len: int = 50, constraints=None,
                 num_captions: int = 1) -> DecodeResult:
        from seesay.captioner import prompt_ids, resolve_constraints

        enc = src if isinstance(src, EncoderOutput) else self.encode(src)
        ids = prompt_ids(self.tokenizer, prompt)
        t = self.tokenizer
        return decode(self, enc, strategy, bos=t.bos_id, eos=t.eos_id, pad=t.pad_id, max_len=max_len,
                      prefix=torch.tensor(ids) if ids else None, constraints=resolve_constraints(t, constraints),
                      num_captions=num_captions)

    # step contract, used by seesay.decoding
    def init_state(self, enc: EncoderOutput) -> torch.Tensor:
        return enc.pooled

    def step(self, prev, state):
        return F.log_softmax(self._core(state, prev[:, None])[:, 0].float(), dim=-1), state, None

    def reorder_state(self, state, index):
        return state.index_select(0, index)


@register_captioner("bag_of_words")
def _build_bag(spec: dict, tokenizer, preprocess, external_weights: bool) -> BagCaptioner:
    if not isinstance(tokenizer, TailTokenizer):  # training: its own tokenizer, from the data's words
        tokenizer = TailTokenizer([w for w in tokenizer.itos if not w.startswith("<")])
    return BagCaptioner(tokenizer, dim=int(spec.get("dim", 32)), image_size=(preprocess or {}).get("image_size") or 32)


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bag")
    prepared_shapes(root, num_images=60, seed=3, val_fraction=0.2, test_fraction=0.2)
    return root


@pytest.fixture(scope="module")
def trained(shapes):
    run = shapes / "run"
    rc = cli.main(["train", "--data", str(shapes / "data"), "--output", str(run), "--set", "captioner.family=bag_of_words",
                   "--set", "captioner.dim=24", "--epochs", "3", "--batch-size", "16", "--workers", "0",
                   "--lr", "0.02", "--device", "cpu", "--no-progress", "--set", "train.tensorboard=false",
                   "--set", "train.val_max_len=12"])
    assert rc == 0
    return run


# ---- the fake family through every path ------------------------------------------------------------------


def test_bag_captioner_trains_validates_and_saves_through_the_cli(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all("CIDEr" in r["val"] for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
    assert (trained / "features").is_dir()  # frozen image features were cached and trained from
    tok = json.loads((trained / "best" / "tokenizer" / TOKENIZER_FILE).read_text())
    assert tok["type"] == "test-tail"  # the family's own tokenizer went into the checkpoint
    cfg = json.loads((trained / "best" / "config.json").read_text())
    assert cfg["model"] == {"captioner": "bag_of_words", "dim": 24}


def test_bag_captioner_evaluates_and_captions_through_the_cli(trained, shapes, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = cli.main(["evaluate", "--checkpoint", str(trained / "best"), "--data", str(shapes / "data"),
                   "--split", "test", "--beam-size", "2", "--max-length", "12", "--output", str(out),
                   "--results", str(tmp_path / "caps.json"), "--device", "cpu"])
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["CIDEr"] is not None and metrics["Bleu_1"] > 0.2  # shape and colour words come out
    caps = json.loads((tmp_path / "caps.json").read_text())
    assert len(caps) == 12 and all("<pad>" not in c["caption"] and c["caption"] for c in caps)

    image = sorted((shapes / "raw" / "images").glob("*.png"))[0]
    capsys.readouterr()
    rc = cli.main(["caption", "--checkpoint", str(trained / "best"), str(image), "--beam-size", "3", "--device", "cpu"])
    caption = capsys.readouterr().out.strip()
    assert rc == 0 and caption and "<" not in caption


def test_bag_captioner_library_paths_agree(trained, shapes):
    from seesay.checkpoint import load_checkpoint
    from seesay.data.store import open_prepared

    ck = load_checkpoint(trained / "best")
    model = ck.model
    require_captioner(model)
    assert isinstance(model, BagCaptioner) and isinstance(ck.tokenizer, TailTokenizer)
    assert model.tokenizer.pad_id == len(model.tokenizer) - 1  # nothing assumed pad = 0
    image = sorted((shapes / "raw" / "images").glob("*.png"))[0]
    data = image.read_bytes()
    from_path, from_bytes, from_pil = caption_images(
        model, [image, data, Image.open(io.BytesIO(data))], Beam(2), max_len=12)
    assert from_path.caption == from_bytes.caption == from_pil.caption
    assert from_path.tokens == from_bytes.tokens and from_path.score == pytest.approx(from_bytes.score)
    # generate pads finished rows with the tokenizer's pad id, never 0
    res = model.generate(torch.stack([model.preprocess(image)] * 2), Sample(temperature=2.0, seed=1), max_len=12)
    for row, n in zip(res.tokens.tolist(), res.lengths.tolist()):
        assert all(t == model.tokenizer.pad_id for t in row[n:])
    # decode_split == caption_images on the stored images
    store = open_prepared(shapes / "data").split("test")
    split = decode_split(model, store, Greedy(), limit=3, max_len=12)
    stored = torch.from_numpy(np.ascontiguousarray(np.asarray(store.images[:3]).transpose(0, 3, 1, 2)))
    direct = caption_images(model, stored, Greedy(), max_len=12)
    assert list(split.values()) == [c.caption for c in direct]


def test_registered_families_build_and_fulfil_the_contract():
    from seesay.data.tokenize import SPECIALS, Vocab

    assert {"encoder_decoder", "bag_of_words"} <= set(list_captioners())
    vocab = Vocab([*SPECIALS, "a", "red", "circle"])
    spec = {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 2, "image_size": 32},
            "decoder": {"name": "show_tell", "vocab_size": len(vocab), "embed_dim": 8, "decoder_dim": 8}}
    model = build_captioner(spec, vocab, {"image_size": 32})
    require_captioner(model)
    assert model.spec()["captioner"] == "encoder_decoder"
    from seesay.errors import SeesayError

    with pytest.raises(SeesayError, match="unknown captioner family 'nope'"):
        build_captioner({"captioner": "nope"}, vocab)
    with pytest.raises(SeesayError, match="has no option 'alpha_c'"):
        build_captioner({**spec, "decoder": {**spec["decoder"], "alpha_c": 1.0}}, vocab)


# ---- strategies are values ------------------------------------------------------------------------


def test_strategies_are_values_and_temperature_zero_is_greedy():
    assert strategy_from_options(beam_size=1) == Greedy()
    assert strategy_from_options(beam_size=4, length_penalty=0.5) == Beam(4, 0.5)
    assert strategy_from_options(temperature=0.7, seed=3) == Sample(0.7, 0, 1.0, 3)
    assert strategy_from_options(top_k=5) == Sample(1.0, 5, 1.0, None)
    for bad in (lambda: Beam(0), lambda: Beam(2, -1.0), lambda: Sample(-1.0), lambda: Sample(top_p=0.0),
                lambda: Sample(top_k=-2)):
        with pytest.raises(ValueError):
            bad()
    from seesay.registry import build_decoder

    torch.manual_seed(0)
    dec = build_decoder("soft_attention", vocab_size=9, enc_dim=6, embed_dim=8, attention_dim=8, decoder_dim=8,
                        dropout=0.0).eval()
    enc = EncoderOutput(torch.randn(3, 4, 6), torch.randn(3, 6), (2, 2))
    greedy = decode(dec, enc, Greedy(), bos=1, eos=2, max_len=6)
    cold = decode(dec, enc, Sample(temperature=0), bos=1, eos=2, max_len=6)
    assert torch.equal(greedy.tokens, cold.tokens)
    a = decode(dec, enc, Sample(1.5, seed=7), bos=1, eos=2, max_len=6)
    b = decode(dec, enc, Sample(1.5, seed=7), bos=1, eos=2, max_len=6)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(TypeError, match="not a decoding strategy"):
        decode(dec, enc, "sample", bos=1, eos=2)  # type: ignore[arg-type]


# ---- one rule for the evaluation language ---------------------------------------------------------------


def _aichallenger(tmp_path: Path, tokenizer: str) -> Path:
    from seesay.data.prepare import prepare_dataset

    sents = ["一个穿着红色衣服的女人在草地上行走", "草地上有一个穿着红色衣服的女人", "一个女人在草地上"]
    data = []
    for i in range(10):
        Image.new("RGB", (16, 12), (i * 20, 100, 200 - i * 10)).save(tmp_path / f"{i:x}.jpg")
        data.append({"image_id": f"{i:x}.jpg", "url": "u", "caption": sents})
    (tmp_path / "ai.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    prepare_dataset("aichallenger", tmp_path / "data", annotations=tmp_path / "ai.json", images=tmp_path,
                    image_size=16, workers=1, progress=False, tokenizer=tokenizer, min_word_freq=1)
    return tmp_path / "data"


def test_char_tokenized_chinese_is_validated_and_evaluated_as_chinese(tmp_path, monkeypatch):
    """AI Challenger prepared with --tokenizer char: validation (picking best/) and `seesay evaluate`
    both score in Chinese (before, validation used English PTB tokenisation)."""
    from seesay import metrics
    from seesay.data.store import open_prepared

    data = _aichallenger(tmp_path, "char")
    prepared = open_prepared(data)
    assert prepared.vocab.tokenizer == "char"
    assert evaluation_lang(prepared.vocab, prepared.manifest) == "zh"
    langs: list[str] = []
    real = metrics.compute_scores

    def spy(*args, **kwargs):
        langs.append(kwargs.get("lang"))
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "compute_scores", spy)
    run = tmp_path / "run"
    rc = cli.main(["train", "--data", str(data), "--output", str(run), "--epochs", "1", "--batch-size", "6",
                   "--workers", "0", "--device", "cpu", "--no-progress", "--set", "train.tensorboard=false",
                   "--set", "encoder.width=8", "--set", "encoder.encoded_size=2", "--set", "encoder.image_size=16",
                   "--fine-tune-encoder", "--set", "decoder.embed_dim=8", "--set", "decoder.attention_dim=8",
                   "--set", "decoder.decoder_dim=8", "--set", "train.val_max_len=6"])
    assert rc == 0
    assert langs == ["zh"]  # the validation of the one epoch
    rc = cli.main(["evaluate", "--checkpoint", str(run / "best"), "--data", str(data), "--split", "val",
                   "--max-length", "6", "--output", str(tmp_path / "m.json"), "--device", "cpu"])
    assert rc == 0 and langs[-1] == "zh"


def test_evaluation_language_rule():
    from seesay.data.tokenize import SPECIALS, Vocab

    word = Vocab([*SPECIALS, "a"])
    assert evaluation_lang(word, {}) == "en"
    assert evaluation_lang(word, {"lang": "zh"}) == "zh"
    assert evaluation_lang(word, {"source": {"format": "aichallenger"}}) == "zh"
    assert evaluation_lang(Vocab([*SPECIALS, "女人"], tokenizer="jieba"), {}) == "zh"
    assert evaluation_lang(Vocab([*SPECIALS, "女"], tokenizer="char"), {"source": {"format": "pairs"}},
                           [["一个女人在草地上"], ["草地上"]]) == "zh"
    assert evaluation_lang(word, {"source": {"format": "pairs"}}, [["a man on a horse"], ["un homme"]]) == "en"


# ---- the library never imports the applications ------------------------------------------------------------

APPLICATIONS = ("seesay.train", "seesay.evaluate", "seesay.caption", "seesay.viz", "seesay.commands",
                "seesay.cli", "seesay.demo")
LIBRARY = ("model.py", "captioner.py", "decoding.py", "checkpoint.py", "registry.py", "tokenizers.py", "config.py",
           "multimodal.py", "errors.py", "files.py", "progress.py", "encoders", "decoders", "layers", "data", "metrics")


def test_library_never_imports_applications():
    root = Path(__file__).resolve().parents[1] / "src" / "seesay"
    files = [p for name in LIBRARY for p in ([root / name] if name.endswith(".py") else sorted((root / name).rglob("*.py")))]
    assert len(files) > 30
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if any(n == app or n.startswith(app + ".") for app in APPLICATIONS):
                    offenders.append(f"{path.relative_to(root)} imports {n}")
    assert not offenders, offenders


# ---- objectives are objects ------------------------------------------------------------------------------


def test_cross_entropy_objective_with_label_smoothing():
    from seesay.train.objectives import CrossEntropy

    torch.manual_seed(0)
    V = 7
    logits = torch.randn(2, 3, V)

    class Fixed(nn.Module):
        def forward(self, src, tokens, lengths, image_rows=None):
            return DecoderOutput(logits, None, {"aux_loss": torch.tensor(0.25)})

    tokens = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])
    lengths = torch.tensor([4, 3])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    for eps in (0.0, 0.1):
        out = CrossEntropy(label_smoothing=eps)(Fixed(), None, tokens, lengths)
        ref = F.cross_entropy(logits[mask], tokens[:, 1:][mask], label_smoothing=eps)
        assert out["loss_ce"].item() == pytest.approx(ref.item(), rel=1e-6)
        assert out["loss_regulariser"].item() == 0.25 and out["n"] == 2 and 0 <= float(out["top5"]) <= 1
    assert CrossEntropy(0.1)(Fixed(), None, tokens, lengths)["loss_ce"] != CrossEntropy(0.0)(Fixed(), None, tokens,
                                                                                              lengths)["loss_ce"]
    from seesay.errors import SeesayError

    with pytest.raises(SeesayError, match="label-smoothing"):
        CrossEntropy(1.0)
