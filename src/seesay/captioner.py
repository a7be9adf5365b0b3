"""The captioner contract: what code above the model (training, evaluation, captioning, the
report, the server) may use, and the library functions built only on it.

# b - images, r - caption rows, t - time, v - vocabulary, a - attention columns
Every model family implements it: `CaptionModel` (an encoder + a step decoder), the Titans
`MultimodalMAC`, and any future family (a Hugging Face model, a test's bag-of-features model).
A captioner is an `nn.Module` (weights via state_dict, `.to`, `.train/.eval`) with:

    tokenizer                 the `seesay.tokenizers` contract: encode / decode, special ids, its own
                              directory in a checkpoint. Nothing above the captioner assumes ids.
    preprocess(image)         a path, image bytes, a PIL image or an array -> one image tensor [3,H,W],
                              exactly as in training (the settings are saved with the checkpoint:
                              `preprocess_config()`). A batch is `torch.stack` of these.
    encode(images)            images [B,3,H,W] -> features (`EncoderOutput`): what a frozen image
                              model's feature cache stores.
    forward(src, tokens, lengths, image_rows=None, prompt=None) -> DecoderOutput
                              teacher forcing. `src` is images [B,3,H,W] or `encode`'s features;
                              `tokens` [R,T] are `bos w1 .. wn eos pad..` rows (`lengths` [R] count
                              bos and eos), `image_rows` [R] names each row's image (None: row i is
                              image i). logits [R,T-1,V] (logits[:, t] predicts tokens[:, t+1]),
                              attention [R,T-1,A] where the family has it, extras["aux_loss"] a
                              family's own regulariser (already weighted). `prompt` [R,P]: each
                              row's input text ids (pad-padded), for captioners that read one.
    generate(src, strategy=Greedy(), *, prompt=None, max_len=50, constraints=None, num_captions=1)
                              -> DecodeResult
                              `src` as for forward; `strategy` a `seesay.decoding` value; `prompt`
                              text (or ids; or one per image) every caption starts with, or the
                              input text of a captioner that reads one (`reads_prompt`). `max_len` counts the tokens
                              generated after the prompt. `constraints` a `seesay.decoding.Constraints`
                              (bad endings may be words: `resolve_constraints` turns them into
                              ids); `num_captions` N gives B*N rows, image-major, best first. The
                              functions below pass these two only when set, so a captioner without
                              them still works for one unconstrained caption per image.
    spec()                    plain JSON that rebuilds the architecture offline
                              (`build_captioner(spec, tokenizer, preprocess)`); spec["captioner"]
                              names the family (absent: "encoder_decoder").
    preprocess_config()       plain JSON saved as the checkpoint's preprocess.json.

Optional, for training: `param_groups()` -> {"encoder": [...], "decoder": [...]} (each gets its own
learning rate; default: every trainable parameter in "decoder"), `set_fine_tune(flag)`,
`features_trainable` (False lets training cache `encode` once per image), `image_model_pretrained`
(False: training's default trains the image model, since random frozen features carry little),
`ddp_find_unused_parameters` (True when some parameters get no gradient in some steps), and
`reads_prompt` (True: the prompt is the model's input text, e.g. T5's encoder side, so training
gives each row its dataset's prompt, `seesay.data.tasks`; False or absent: a forced caption prefix), and
`packs_logits` (True: `forward(..., packed=True)` gives the logits of real positions only, with their
`positions`, decoders/base.py; `packed_request` and `sequence_logprobs` below use it).

The functions below (`caption_images`, `decode_batches`, `decode_split`, `evaluation_lang`) are
how the applications use a captioner, so there is one copy of each.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from seesay.decoding import Constraints, DecodeResult, Greedy, Strategy
from seesay.errors import SeesayError
from seesay.layers import gemm

log = logging.getLogger(__name__)


@runtime_checkable
class Captioner(Protocol):
    tokenizer: Any

    def preprocess(self, image: Any) -> Tensor: ...

    def encode(self, images: Tensor) -> Any: ...

    def forward(self, src: Any, tokens: Tensor, lengths: Tensor, image_rows: Tensor | None = None,
                prompt: Tensor | None = None) -> Any: ...

    def generate(self, src: Any, strategy: Strategy = Greedy(), *, prompt: Any = None,
                 max_len: int = 50, constraints: Constraints | None = None, num_captions: int = 1) -> DecodeResult: ...

    def spec(self) -> dict[str, Any]: ...

    def preprocess_config(self) -> dict[str, Any]: ...


def prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """A prompt as token ids: text through `tokenizer.encode_prompt`, ids (list / tensor) as they are."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return list(tokenizer.encode_prompt(prompt))
    if isinstance(prompt, Tensor):
        return [int(i) for i in prompt.reshape(-1).tolist()]
    return [int(i) for i in prompt]


# Common English words a caption should not end on (ruotianluo's bad-endings list, plus a few).
DEFAULT_BAD_ENDINGS = ("a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon", "near",
                       "to", "is", "are", "am", "and", "or", "its", "their", "his", "her", "by", "from", "into",
                       "onto", "under", "over", "some", "this", "that", "these", "those")


def resolve_constraints(tokenizer: Any, constraints: Constraints | None) -> Constraints | None:
    """`constraints` with its bad-ending words turned into ids by `tokenizer.encode`.

    A word must encode to one token to be a bad ending: words the vocabulary lacks (unknown) or
    splits into several tokens (bytes, subwords) are left out, with a log message; if none of
    the words is left, that is an error (the user asked for something this model cannot do).
    """
    if constraints is None or not constraints.bad_endings:
        return constraints
    ids: list[int] = list(constraints.bad_ending_ids)
    skipped = []
    unk = getattr(tokenizer, "unk_id", None)
    for word in constraints.bad_endings:
        enc = list(tokenizer.encode(word))
        if len(enc) == 1 and enc[0] != unk:
            ids.append(int(enc[0]))
        else:
            skipped.append(word)
    if skipped:
        log.info("bad endings not single words of this vocabulary, left out: %s", ", ".join(skipped))
    if len(ids) == len(constraints.bad_ending_ids):
        raise SeesayError(f"bad endings: none of {', '.join(constraints.bad_endings)} is a single word of this model's "
                          "vocabulary")
    return dataclasses.replace(constraints, bad_ending_ids=tuple(ids), bad_endings=())


def device_of(module: Any) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Teacher forcing's outputs, read the same way by training and evaluation.


def packed_request(model: Any) -> dict[str, bool]:
    """`{"packed": True}` for a model whose teacher forcing can give the logits of real positions only
    (`packs_logits`, decoders/base.py; the model may be inside DDP), else nothing: training's objectives
    and evaluation's label scores pass it to the forward, so that no padded (R, T-1, V) logits (nor,
    in training, their gradient) are made."""
    from seesay.checkpoint import unwrap

    return {"packed": True} if getattr(unwrap(model), "packs_logits", False) else {}


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
    """[R] sum of log p(token) over each row's real positions (every token after bos, eos included).
    With `positions` [K] (packed logits, decoders/base.py) `logits` is (K, V), the real positions only."""
    if positions is not None:
        positions = positions.to(logits.device)
        tgt = tokens[:, 1:].reshape(-1).to(logits.device).index_select(0, positions)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt[:, None]).squeeze(-1)  # (K,)
        return logp.new_zeros(tokens.shape[0]).index_add(0, positions // max(tokens.shape[1] - 1, 1), logp)
    steps = logits.size(1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1: steps + 1, None]).squeeze(-1)  # (R, T-1)
    mask = torch.arange(steps, device=logits.device)[None, :] < (lengths.to(logits.device) - 1)[:, None]
    return torch.where(mask, logp, torch.zeros_like(logp)).sum(1)  # (a -inf logit at padding must not leak)


# ---------------------------------------------------------------------------------------------
# Images in, captions out (the server and `seesay caption` call this; no files involved).


class Caption(NamedTuple):
    caption: str
    tokens: list[int]  # prompt tokens first, no bos, eos included when emitted
    score: float  # sum of log-probabilities (length-normalised with a beam length penalty)
    attention: Tensor | None  # (L, A) on the CPU, or None
    grid_hw: tuple[int, int] | None


def results_from(captioner: Any, res: DecodeResult, grid_hw: tuple[int, int] | None) -> list[Caption]:
    """One `Caption` per row of a DecodeResult."""
    out = []
    tokens = res.tokens.cpu().tolist()
    lengths = res.lengths.cpu().tolist()
    scores = res.scores.float().cpu().tolist()
    for i, (row, n) in enumerate(zip(tokens, lengths)):
        att = None if res.attention is None else res.attention[i, :n].float().cpu()
        out.append(Caption(captioner.tokenizer.decode(row[:n]), row[:n], float(scores[i]), att, grid_hw))
    return out


def _check_num_captions(num_captions: Any) -> int:
    if isinstance(num_captions, bool) or not isinstance(num_captions, int) or num_captions < 1:
        raise SeesayError(f"num_captions must be an integer >= 1, not {num_captions!r}")
    return num_captions


@torch.no_grad()
def caption_images(captioner: Any, images: Sequence[Any] | Tensor, strategy: Strategy = Greedy(), *,
                   prompt: Any = None, max_len: int = 50, batch_size: int = 16,
                   constraints: Constraints | None = None, num_captions: int = 1
                   ) -> list[Caption] | list[list[Caption]]:
    """Caption images given as paths, bytes, PIL images, arrays or preprocessed tensors.

    Each image goes through `captioner.preprocess`; images of one size are decoded together,
    `batch_size` at a time. A bad image raises a one-line `SeesayError` (callers that must go on
    past bad images preprocess first: see `seesay.caption.caption_files`). One `Caption` per
    image; with `num_captions` N > 1, a list of N per image, best score first. `constraints`
    (`seesay.decoding.Constraints`, bad endings as words or ids) hold for every caption.
    """
    n = _check_num_captions(num_captions)
    if isinstance(images, Tensor) and images.dim() == 4:
        tensors = list(images)
    else:
        tensors = [captioner.preprocess(im) for im in images]
    device = device_of(captioner)
    out: list[Any] = [None] * len(tensors)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        by_shape.setdefault(tuple(t.shape), []).append(i)
    with gemm.packing():  # one weight packing for all the batches of this call (CPU, seesay.layers.gemm)
        for rows in by_shape.values():
            for start in range(0, len(rows), max(batch_size, 1)):
                chunk = rows[start: start + batch_size]
                batch = torch.stack([tensors[i] for i in chunk]).to(device)
                feats = captioner.encode(batch)
                res = captioner.generate(feats, strategy, prompt=prompt, max_len=max_len, constraints=constraints,
                                         num_captions=n)
                caps = results_from(captioner, res, _grid_hw(feats))
                for j, i in enumerate(chunk):
                    out[i] = caps[j] if n == 1 else caps[j * n: (j + 1) * n]
    return out


def _grid_hw(feats: Any) -> tuple[int, int] | None:
    hw = getattr(feats, "grid_hw", None)
    return tuple(int(v) for v in hw) if hw is not None else None


# ---------------------------------------------------------------------------------------------
# A prepared split in, captions out (evaluation, validation during training, the report).


class DecodedBatch(NamedTuple):
    indices: list[int]  # positions in the split
    images: np.ndarray | None  # uint8 [b, H, W, 3] when read from the store (None with features)
    captions: list[Caption]  # the best caption of each image
    ranked: list[list[Caption]] | None = None  # with num_captions > 1: each image's N captions, best first


@torch.no_grad()
def decode_batches(captioner: Any, store: Any, strategy: Strategy = Greedy(), *,
                   indices: Sequence[int] | None = None, features: Any = None, max_len: int = 50,
                   batch_size: int = 32, prompt: Any = None, progress: bool = False,
                   constraints: Constraints | None = None, num_captions: int = 1) -> Iterator[DecodedBatch]:
    """Decode images of a prepared split (`seesay.data.store.SplitStore`) batch by batch.

    `features` (an object with `.get(index_tensor) -> features`, e.g. the training feature
    cache) replaces reading and encoding the images. The captioner is put in eval mode and
    restored afterwards. `progress`: a bar on a terminal, a plain line every 30 s in logs.
    `num_captions` N > 1 fills each batch's `ranked` (N captions per image, best first).
    """
    from seesay.progress import progress as progress_display

    n = _check_num_captions(num_captions)

    idx_all = list(range(len(store))) if indices is None else [int(i) for i in indices]
    bar = progress_display(len(idx_all), desc="captioning", unit="img", enabled=progress)
    device = device_of(captioner)
    was_training = captioner.training
    captioner.eval()
    try:
        for start in range(0, len(idx_all), max(batch_size, 1)):
            idx = idx_all[start: start + batch_size]
            imgs = None
            if features is not None:
                feats = features.get(torch.tensor(idx))
            else:
                if idx == list(range(idx[0], idx[0] + len(idx))):
                    imgs = np.asarray(store.images[idx[0]: idx[0] + len(idx)])
                else:
                    imgs = np.stack([np.asarray(store.images[i]) for i in idx])
                x = torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2))).to(device)
                feats = captioner.encode(x)
            res = captioner.generate(feats, strategy, prompt=prompt, max_len=max_len, constraints=constraints,
                                     num_captions=n)
            bar.update(len(idx))
            caps = results_from(captioner, res, _grid_hw(feats))
            if n == 1:
                yield DecodedBatch(idx, imgs, caps)
            else:
                ranked = [caps[j * n: (j + 1) * n] for j in range(len(idx))]
                yield DecodedBatch(idx, imgs, [r[0] for r in ranked], ranked)
    finally:
        bar.close()
        captioner.train(was_training)


def decode_split(captioner: Any, store: Any, strategy: Strategy = Greedy(), *, limit: int | None = None,
                 features: Any = None, max_len: int = 50, batch_size: int = 32, progress: bool = False
                 ) -> dict[str, str]:
    """{image id: caption} for the first `limit` (default: all) images of a prepared split."""
    n = len(store) if limit is None else min(int(limit), len(store))
    ids = store.image_ids
    out: dict[str, str] = {}
    for batch in decode_batches(captioner, store, strategy, indices=range(n), features=features,
                                max_len=max_len, batch_size=batch_size, progress=progress):
        for i, c in zip(batch.indices, batch.captions):
            out[str(ids[i])] = c.caption
        log.debug("captioned %d/%d images", batch.indices[-1] + 1, n)
    return out


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")


def evaluation_lang(tokenizer: Any = None, manifest: dict[str, Any] | None = None,
                    references: Sequence[Sequence[str]] | None = None) -> str:
    """The language captions are scored in ("zh" or "en"): the one rule for validation,
    `seesay evaluate` and the report.

    In order: the prepared data's manifest "lang" when it names one; "zh" for AI Challenger data
    or a jieba tokenizer; "zh" when most characters of the references (the first 200 images)
    are Chinese, Japanese or Korean; else "en".
    """
    manifest = manifest or {}
    lang = manifest.get("lang")
    if isinstance(lang, str) and lang in ("zh", "en"):
        return lang
    source = manifest.get("source")
    fmt = source.get("format") if isinstance(source, dict) else source
    if str(fmt or "").lower() == "aichallenger":
        return "zh"
    if getattr(tokenizer, "kind", getattr(tokenizer, "tokenizer", None)) == "jieba":
        return "zh"
    if references is not None:
        text = "".join(r for refs in list(references)[:200] for r in refs)
        letters = [c for c in text if not c.isspace() and c.isalnum()]
        if letters and sum(1 for c in letters if _CJK.match(c)) > len(letters) / 2:
            return "zh"
    return "en"


def require_captioner(obj: Any, where: str = "model") -> None:
    """One-line error when `obj` lacks part of the captioner contract."""
    missing = [a for a in ("tokenizer", "preprocess", "encode", "generate", "spec", "preprocess_config",
                           "state_dict") if not hasattr(obj, a)]
    if missing:
        raise SeesayError(f"{where}: {type(obj).__name__} is not a captioner (missing {', '.join(missing)})")
