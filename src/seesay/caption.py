"""Caption image files (or image tensors) with a trained checkpoint.

Images are read with `seesay.data.images.load_image_rgb` at the size the training data was
prepared at (preprocess.json "image_size"), so inference sees exactly what training saw; the
model then applies its encoder's own preprocessing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError
from seesay.model import pick_device

log = logging.getLogger(__name__)


class CaptionResult(NamedTuple):
    image: str
    caption: str | None  # None when the image could not be read
    score: float | None  # sum of log-probabilities (length-normalised with a beam length penalty)
    tokens: list[int]
    error: str | None = None  # one-line reason when the image failed
    attention: Any = None  # (L, A) tensor for decoders with attention, else None


def encode_prompt(vocab: Any, prompt: str | None) -> list[int]:
    """Token ids of a caption prompt in the checkpoint's vocabulary (no <start>/<end>).

    Byte and char vocabularies keep the prompt's trailing whitespace ("This is an image of "
    must be followed by a word, not by another space); leading whitespace is dropped and runs of
    whitespace become one space, as in the training captions. Word vocabularies tokenize as in
    training (lower case); words missing from the vocabulary become <unk> and are logged.
    """
    if not prompt:
        return []
    kind = getattr(vocab, "tokenizer", "word")
    if kind in ("byte", "char"):
        import re

        text = re.sub(r"\s+", " ", prompt).lstrip()
        tokens = [f"<0x{b:02X}>" for b in text.encode("utf-8")] if kind == "byte" else list(text)
    else:
        tokens = vocab.tokenize(prompt)
    ids = vocab.encode_tokens(tokens)
    unknown = [t for t, i in zip(tokens, ids) if i == vocab.unk_id]
    if unknown:
        log.warning("prompt tokens not in the vocabulary (fed as <unk>): %s", " ".join(unknown))
    return ids


def generate(model: Any, images: Tensor | EncoderOutput, *, bos: int, eos: int, prefix: Tensor | None = None,
             max_len: int = 50, beam_size: int = 1, length_penalty: float = 0.0, temperature: float | None = None,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Any:
    """`CaptionModel.generate` with a forced `prefix` (prompt tokens, [P] or [B, P]).

    Same dispatch as `CaptionModel.generate`: sampling when temperature/top_k/top_p is set,
    otherwise beam search (greedy for beam_size 1). `max_len` counts tokens after the prefix.
    """
    if prefix is None or len(prefix) == 0:
        return model.generate(images, bos=bos, eos=eos, max_len=max_len, beam_size=beam_size,
                              length_penalty=length_penalty, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
    from seesay.decoding import beam_search, greedy, sample

    enc = images if isinstance(images, EncoderOutput) else model.encode(images)
    prefix = torch.as_tensor(prefix, dtype=torch.long, device=enc.grid.device)
    if temperature is not None or top_k > 0 or top_p < 1.0:
        return sample(model.decoder, enc, bos=bos, eos=eos, max_len=max_len, temperature=temperature or 1.0,
                      top_k=top_k, top_p=top_p, generator=generator, prefix=prefix)
    if beam_size <= 1:
        return greedy(model.decoder, enc, bos=bos, eos=eos, max_len=max_len, prefix=prefix)
    return beam_search(model.decoder, enc, bos=bos, eos=eos, beam_size=beam_size, max_len=max_len,
                       length_penalty=length_penalty, prefix=prefix)


def caption_images(model: Any, vocab: Any, images: Tensor | EncoderOutput, *, prompt: str | None = None,
                   **decode_kwargs: Any) -> list[dict[str, Any]]:
    """Caption a batch: uint8 [B,3,H,W] / float [0,1] images or an EncoderOutput.

    `decode_kwargs` go to `generate` (beam_size, max_len, temperature, ...). With `prompt`,
    every caption is forced to start with the prompt's tokens and decoding continues from there.
    Returns one dict per image: caption (prompt included), tokens (prompt tokens first, without
    <start>, with <end> when emitted), score, attention (L, A) tensor or None.
    """
    prefix = encode_prompt(vocab, prompt)
    res = generate(model, images, bos=vocab.start_id, eos=vocab.end_id,
                   prefix=torch.tensor(prefix, dtype=torch.long) if prefix else None, **decode_kwargs)
    out = []
    for i in range(res.tokens.shape[0]):
        L = int(res.lengths[i])
        tokens = res.tokens[i, :L].tolist()
        out.append({
            "caption": vocab.decode(tokens),
            "tokens": tokens,
            "score": float(res.scores[i]),
            "attention": None if res.attention is None else res.attention[i, :L].cpu(),
        })
    return out


def caption_files(checkpoint: str | os.PathLike | Any, paths: Sequence[str | os.PathLike], *, beam_size: int = 5,
                  max_len: int = 50, length_penalty: float = 0.0, temperature: float | None = None, top_k: int = 0,
                  top_p: float = 1.0, batch_size: int = 16, device: str | torch.device | None = None,
                  seed: int | None = None, prompt: str | None = None) -> list[CaptionResult]:
    """Caption image files, `batch_size` at a time; unreadable images get `error` set, others go on.

    `prompt` forces every caption to start with that text (see `caption_images`).

    `checkpoint` is a checkpoint directory (e.g. RUN_DIR/best) or an already loaded
    `seesay.checkpoint.Checkpoint`. Sampling is used when temperature/top_k/top_p is set.
    """
    from seesay.checkpoint import load_checkpoint
    from seesay.data.images import load_image_rgb

    dev = pick_device(device)
    ckpt = checkpoint if hasattr(checkpoint, "model") else load_checkpoint(checkpoint, map_location=dev)
    model, vocab = ckpt.model.to(dev).eval(), ckpt.vocab
    size = (ckpt.preprocess or {}).get("image_size")
    generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    kwargs = {"max_len": max_len, "beam_size": beam_size, "length_penalty": length_penalty,
              "temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator, "prompt": prompt}
    results: list[CaptionResult] = []
    for start in range(0, len(paths), max(batch_size, 1)):
        chunk = [str(p) for p in paths[start : start + batch_size]]
        arrays: list[np.ndarray] = []
        ok: list[str] = []
        failed: dict[str, str] = {}
        for p in chunk:
            try:
                if not Path(p).is_file():
                    raise SeesayError(f"{p}: no such file")
                arrays.append(load_image_rgb(p, size))
                ok.append(p)
            except SeesayError as e:
                failed[p] = str(e)
            except Exception as e:  # noqa: BLE001 - any decoder failure is that image's problem only
                failed[p] = f"{p}: unreadable image ({type(e).__name__}: {e})"
        done: dict[str, dict[str, Any]] = {}
        if ok:
            if len({a.shape for a in arrays}) > 1:  # no fixed prepare size: caption one at a time
                for p, a in zip(ok, arrays):
                    done[p] = caption_images(model, vocab, _to_tensor([a], dev), **kwargs)[0]
            else:
                for p, r in zip(ok, caption_images(model, vocab, _to_tensor(arrays, dev), **kwargs)):
                    done[p] = r
        for p in chunk:
            if p in failed:
                log.debug("skipping %s", failed[p])
                results.append(CaptionResult(p, None, None, [], failed[p]))
            else:
                r = done[p]
                results.append(CaptionResult(p, r["caption"], r["score"], r["tokens"], None, r["attention"]))
    return results


def _to_tensor(arrays: list[np.ndarray], device: torch.device) -> Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(device)  # (B, 3, H, W) uint8
