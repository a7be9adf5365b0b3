"""Masked image modelling (MIM): the model writes an image's VQ codes as `<img_i>` tokens while
part of its Swin patches are hidden (docs/vlm.md).

# b - images, m - images with a MIM row, r - caption rows, p - Swin patches, c - codes (h*w)
With `vae_ckpt_path` (a `seesay.vq` directory: `seesay train-vq`, `seesay convert vqgan`) the
model's tokenizer gains `<img_0>` .. `<img_{K-1}>` (K = the VQ's codebook size, which
`image_vocab_size` must equal), and every training image of a pretrain dataset adds one MIM row
to its batch, mixed with its span-corruption rows:

    encoder input  the image with `image_mask_ratio` of its patches replaced by Swin's mask token
                   (`bool_masked_pos` [p], drawn from (seed, epoch, dataset, image): a resumed
                   run masks exactly as an uninterrupted one)
    prompt         the image's caption (its first stored caption; context, as in the recipe set)
    target         <bos> <img_c0> .. <img_c(h*w-1)> <eos>   (the VQ codes of the unmasked image)

The rows go through the same forward as the other rows of the batch: the batch's images are
stacked with the masked copies ([b + m] images, no patch masked in the first b), so one forward
and one loss hold both objectives (DDP sees one forward per step). Codes are computed once per
image and cached (RUN_DIR/vq-codes or train.feature_cache_dir, keyed by the VQ's weights, the
dataset and split; written aside and renamed). MIM needs images in the loop (no feature cache:
`--fine-tune-encoder` or `--no-cache-features`), an encoder that takes `bool_masked_pos`
(swinv2), and a SentencePiece tokenizer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seesay.errors import SeesayError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_MASK_RATIO = 0.75
DEFAULT_IMAGE_VOCAB_SIZE = 16384


# -- the tokenizer -----------------------------------------------------------------------------------
def with_image_tokens(tokenizer: Any, k: int) -> Any:
    """A copy of a SentencePiece tokenizer with `<img_0>` .. `<img_{k-1}>` added after its tokens
    (the ids of every token it had stay the same)."""
    from seesay.locations import img_tokens
    from seesay.spm import SentencePieceTokenizer

    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise SeesayError("masked image modelling (vae_ckpt_path) needs a SentencePiece tokenizer "
                          "(seesay prepare --tokenizer sentencepiece)")
    if tokenizer.token_to_id("<img_0>") is not None:
        return tokenizer
    return SentencePieceTokenizer(tokenizer.model_proto, [*tokenizer.added, *img_tokens(k)], source=tokenizer.source)


def extends(tokenizer: Any, base: Any) -> bool:
    """Whether `tokenizer` is `base` with tokens added after it (same ids for every base token)."""
    if tokenizer == base:
        return True
    same_model = getattr(tokenizer, "model_proto", None) is not None and \
        getattr(tokenizer, "model_proto", None) == getattr(base, "model_proto", None)
    added, base_added = getattr(tokenizer, "added", None), getattr(base, "added", None)
    return bool(same_model and added is not None and base_added is not None
                and list(added[: len(base_added)]) == list(base_added))


def first_image_id(tokenizer: Any, k: int) -> int:
    first = tokenizer.token_to_id("<img_0>")
    last = tokenizer.token_to_id(f"<img_{k - 1}>")
    if first is None or last != first + k - 1:
        raise SeesayError(f"the tokenizer has no consecutive <img_0> .. <img_{k - 1}> tokens")
    return int(first)


# -- the VQ and its codes ----------------------------------------------------------------------------
def load_checked_vq(path: str, image_vocab_size: int | None, device: Any = "cpu") -> Any:
    """`load_vq(path)`, its codebook checked against `image_vocab_size` (one line on a mismatch)."""
    from seesay.vq import load_vq

    vq = load_vq(path, map_location=device)
    if image_vocab_size is not None and int(image_vocab_size) != int(vq.codebook_size):
        raise SeesayError(f"image_vocab_size {image_vocab_size} does not match the VQ tokenizer {path} "
                          f"({vq.codebook_size} codes): set image_vocab_size: {vq.codebook_size}")
    return vq


def vq_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update((Path(path) / name).read_bytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def code_cache(vq: Any, vq_path: str | Path, store: Any, root: str | Path, *, data_dir: str | Path,
               batch_size: int = 64) -> np.ndarray:
    """int32 [N, h*w]: the VQ codes of every image of a prepared split, computed once and cached
    under `root` (keyed by the VQ's weights, the dataset and the split; written aside, renamed)."""
    from seesay.train.features import cache_key

    key = cache_key(vq=vq_fingerprint(vq_path), data=str(Path(data_dir).resolve()), split=store.split, n=len(store))
    path = Path(root) / f"{store.split}-{key}" / "codes.npy"
    if not path.is_file():
        device = next(vq.parameters()).device
        parts = []
        for start in range(0, len(store), batch_size):
            x = torch.from_numpy(np.array(store.images[start: start + batch_size])).permute(0, 3, 1, 2).to(device)
            parts.append(vq.encode(x).flatten(1).cpu().numpy().astype(np.int32))
        codes = np.concatenate(parts) if parts else np.zeros((0, vq.grid_size ** 2), dtype=np.int32)
        tmp = path.parent.parent / f".{path.parent.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            np.save(tmp / "codes.npy", codes)
            try:
                os.replace(tmp, path.parent)
            except OSError:  # another process finished it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("VQ codes of %d %s images cached in %s", len(store), store.split, path.parent)
    return np.load(path, allow_pickle=False)


# -- masks and rows ----------------------------------------------------------------------------------
def num_patches(encoder: Any) -> int:
    """Patches an encoder's `bool_masked_pos` covers (swinv2: (image_size / patch_size)^2); one
    line for an encoder that cannot mask patches."""
    if not getattr(encoder, "masks_patches", False):
        raise SeesayError(f"masked image modelling needs an encoder that masks patches (swinv2), not "
                          f"{type(encoder).__name__}")
    return int(encoder.num_patches)


def patch_mask(n: int, ratio: float, seed: int, epoch: int, dataset: int, image: int) -> np.ndarray:
    """bool [n]: round(ratio * n) patches masked, drawn from (seed, epoch, dataset, image)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(dataset), int(image), 0x4D494D])
    out = np.zeros(n, dtype=bool)
    out[rng.permutation(n)[: int(round(ratio * n))]] = True
    return out


def check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise SeesayError(f"image_mask_ratio (train.image_mask_ratio) must be in [0, 1], not {ratio!r}")
    return float(ratio)


class MaskedImageModelling:
    """Adds a MIM row per pretrain image to a training batch (see the module doc)."""

    def __init__(self, codes: dict[int, np.ndarray], offsets: list[int], *, tokenizer: Any, codebook_size: int,
                 patches: int, ratio: float, seed: int) -> None:
        self.codes, self.offsets = codes, offsets  # dataset index -> [N_k, c]; first global image index
        self.tok = tokenizer
        self.first = first_image_id(tokenizer, codebook_size)
        self.patches, self.ratio, self.seed = int(patches), check_ratio(ratio), int(seed)
        self.rows_seen = 0  # MIM rows trained by this process (logs, tests)

    def extend(self, batch: dict[str, Any], images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
               image_rows: torch.Tensor, prompt: torch.Tensor | None, epoch: int
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """(images [b + m], bool_masked_pos [b + m, p] or None, tokens, lengths, image_rows, prompt)
        with the MIM rows appended; the batch unchanged when none of its images is a pretrain one."""
        from seesay.data.tasks import pad_rows

        ds = batch.get("dataset")
        ds = [0] * images.shape[0] if ds is None else [int(k) for k in ds.tolist()]
        index = [int(i) for i in batch["image_index"].tolist()]
        picked = [j for j, k in enumerate(ds) if k in self.codes]
        if not picked:
            return images, None, tokens, lengths, image_rows, prompt
        caps, caps_len, caps_rows = batch["captions"], batch["lengths"], batch["image_rows"].tolist()
        first_row = {}
        for r, j in enumerate(caps_rows):
            first_row.setdefault(j, r)
        b, dev = images.shape[0], tokens.device
        mim_prompts, targets, masks = [], [], [np.zeros((b, self.patches), dtype=bool)]
        for j in picked:
            k, local = ds[j], index[j] - self.offsets[ds[j]]
            r = first_row[j]
            mim_prompts.append(caps[r, 1: max(int(caps_len[r]) - 1, 1)].tolist())  # the caption, no bos/eos
            targets.append([self.tok.bos_id, *(self.first + self.codes[k][local]).tolist(), self.tok.eos_id])
            masks.append(patch_mask(self.patches, self.ratio, self.seed, epoch, k, local)[None])
        self.rows_seen += len(picked)
        old = [[t for t in row if t != self.tok.pad_id] for row in prompt.tolist()] if prompt is not None \
            else [[] for _ in range(tokens.shape[0])]
        all_prompt = pad_rows([*old, *mim_prompts], self.tok.pad_id).to(dev)
        rows = [row[: int(n)] for row, n in zip(tokens.tolist(), lengths.tolist())] + targets
        new_tokens = pad_rows(rows, self.tok.pad_id, 2).to(dev)
        new_lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=dev)
        new_rows = torch.cat([image_rows, torch.arange(b, b + len(picked), device=image_rows.device)])
        new_images = torch.cat([images, images[torch.tensor(picked, device=images.device)]])
        mask = torch.from_numpy(np.concatenate(masks)).to(images.device)
        return new_images, mask, new_tokens, new_lengths, new_rows, all_prompt


def build_mim(task: Any) -> MaskedImageModelling | None:
    """The MIM of a CaptionTask whose recipe names a VQ (`data.vae_ckpt_path`), or None."""
    cfg = task.cfg
    path = getattr(cfg.data, "vae_ckpt_path", None)
    pretrain = [k for k, s in enumerate(task.sources) if s.task.task == "pretrain"]
    if not path or not pretrain:
        return None
    if task.cached or task.objective.by_image:
        raise SeesayError("masked image modelling (vae_ckpt_path) needs the images in the loop and --objective xe: "
                          "train the image model (image_model_train: true) or pass --no-cache-features")
    patches = num_patches(task.model.encoder)
    vq = load_checked_vq(path, None, "cpu")
    root = Path(cfg.train.feature_cache_dir or task.run_dir / "features") / "vq-codes"
    codes, offsets, offset = {}, [], 0
    from seesay.train.distributed import barrier

    for k, s in enumerate(task.sources):
        store = s.prepared.split(cfg.data.train_split)
        offsets.append(offset)
        offset += len(store)
        if k in pretrain:
            if task.dist.is_main:
                code_cache(vq, path, store, root, data_dir=s.root)
            barrier()
            codes[k] = code_cache(vq, path, store, root, data_dir=s.root)
    return MaskedImageModelling(codes, offsets, tokenizer=task.tokenizer, codebook_size=int(vq.codebook_size),
                                patches=patches, ratio=cfg.train.image_mask_ratio, seed=cfg.train.seed)


@torch.no_grad()
def predict_codes(model: Any, images: torch.Tensor, codebook_size: int, grid: int, *, ratio: float, seed: int = 0,
                  prompt: Any = None) -> torch.Tensor:
    """[B, grid, grid] codes a MIM model writes for images with `ratio` of their patches masked
    (masks drawn from `seed` and each image's position), greedy, only `<img_i>` allowed."""
    from seesay.data.region_tasks import allowed_ids
    from seesay.decoding import Constraints, Greedy

    tok = model.tokenizer
    first = first_image_id(tok, codebook_size)
    n = num_patches(model.encoder)
    mask = torch.from_numpy(np.stack([patch_mask(n, check_ratio(ratio), seed, 0, 0, i) for i in range(len(images))]))
    device = next(model.parameters()).device
    enc = model.encode(images.to(device), bool_masked_pos=mask.to(device))
    c = grid * grid
    res = model.generate(enc, Greedy(), prompt=prompt, max_len=c, constraints=Constraints(0, c, (), (), allowed_ids(tok, "img")))
    out = torch.zeros((len(images), c), dtype=torch.long)
    for i, (row, m) in enumerate(zip(res.tokens.tolist(), res.lengths.tolist())):
        codes = [t - first for t in row[:m] if first <= t < first + codebook_size][:c]
        out[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
    return out.view(len(images), grid, grid)
