"""The Titans multimodal extension's Python API (`MultimodalMAC`, `ImageProcessor`), working for real.

    from seesay import MultimodalMAC, ImageProcessor
    model = MultimodalMAC(image_size=224, patch_size=16, vision_dim=768, vision_depth=12, vision_heads=12,
                          vision_mlp_dim=3072, vision_dropout=0.1, num_tokens=256, text_dim=384, depth=8,
                          segment_len=32)
    image = model.image_processor.preprocess(pil_image).unsqueeze(0)          # [1, 3, 224, 224]
    prompt = torch.tensor([[ord(c) for c in "This is an image of "] + [model.image_token_id]])
    out = model.generate(prompt, images=image.unsqueeze(1),                    # [B, num_images, 3, H, W]
                         image_positions=torch.tensor([[prompt.shape[1] - 1]]), max_length=100, temperature=0.8)

# b - batch, i - images per sample, k - tokens per image, t - text positions, d - text width
Each image-token position (listed in `image_positions`, or every `image_token_id` when no
positions are given) is replaced by the K tokens of its image: the image is encoded (a
`VisionTransformerEncoder`, or any module given as `vision_encoder=`), projected to the text
width and compressed to K tokens, and the tokens enter titans-pytorch's
`MemoryAsContextTransformer` through its `token_emb` (seesay's `PrefixEmbedding`). Unlike the
public code this API comes from, `generate` conditions on the images (it keeps them in the
sequence and in the library's cache), stops at `eos_token_id`, and treats temperature 0 as
greedy. See docs/titans.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.decoders.titans_mac import (
    PrefixEmbedding,
    build_compressor,
    build_mac,
    mac_extend,
    mac_prefill,
    set_accelerated_scan,
)
from seesay.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderOutput
from seesay.errors import SeesayError


class ImageProcessor:
    """PIL image (or HxWx3 uint8 array, or [3,H,W] tensor) -> normalised float tensor [3, S, S].

    Converts to RGB, squashes to S x S with bicubic (antialiased) resampling, scales to [0, 1]
    and normalises with `mean` / `std` (ImageNet's by default, as the ViT encoder expects).
    """

    def __init__(self, image_size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def preprocess(self, image: Any) -> Tensor:
        s = self.image_size
        if isinstance(image, Tensor):
            x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            if x.dim() == 2:
                x = x.unsqueeze(0)
            if x.dim() != 3:
                raise SeesayError(f"ImageProcessor: expected a [3,H,W] tensor, got shape {tuple(image.shape)}")
            if x.shape[0] == 1:
                x = x.expand(3, -1, -1)
            if tuple(x.shape[-2:]) != (s, s):
                x = F.interpolate(x[None], size=(s, s), mode="bicubic", align_corners=False, antialias=True)[0]
        else:
            from PIL import Image

            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if not isinstance(image, Image.Image):
                raise SeesayError(f"ImageProcessor: cannot read an image from {type(image).__name__}")
            if image.mode == "I;16":
                image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
            image = image.convert("RGB")
            if image.size != (s, s):
                image = image.resize((s, s), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    __call__ = preprocess

    def preprocess_batch(self, images: list[Any]) -> Tensor:
        return torch.stack([self.preprocess(im) for im in images])


class MultimodalMAC(nn.Module):
    """Vision encoder + Titans MAC transformer over byte (or any) tokens with interleaved images.

    Vision: image_size, patch_size, in_channels (3), vision_dim, vision_depth, vision_heads,
    vision_mlp_dim, vision_dropout build a `VisionTransformerEncoder`; or pass any module as
    `vision_encoder=` (it maps [N,3,H,W] to an `EncoderOutput`, tokens [N,S,D] or vectors [N,D];
    its width is its `out_dim` attribute or `vision_dim`). `projection_dim` (optional) adds an
    MLP before the compressor; `fusion_dropout` drops image-token features in training.
    Fusion: `num_image_tokens` (K) tokens per image, `compressor` "pool" or "resampler".
    Text: the remaining keywords go to titans-pytorch's MemoryAsContextTransformer (num_tokens,
    text_dim -> dim, depth, segment_len, heads, dim_head, num_persist_mem_tokens,
    num_longterm_mem_tokens, neural_memory_layers, neural_memory_segment_len, ...), with the
    neural memory's `max_grad_norm` set (1.0) and the issue-#64 parameter fix applied.

    `image_token_id` = num_tokens: one id beyond the text vocabulary (all 256 bytes stay usable);
    the model never generates it.
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        vision_dim: int = 768,
        vision_depth: int = 12,
        vision_heads: int = 12,
        vision_mlp_dim: int = 3072,
        vision_dropout: float = 0.1,
        vision_encoder: nn.Module | None = None,
        num_tokens: int,
        text_dim: int,
        depth: int,
        segment_len: int,
        num_image_tokens: int = 16,
        compressor: str = "pool",
        projection_dim: int | None = None,
        fusion_dropout: float = 0.0,
        dim_head: int = 64,
        heads: int = 8,
        num_persist_mem_tokens: int = 0,
        num_longterm_mem_tokens: int = 0,
        neural_memory_layers: tuple[int, ...] | None = None,
        neural_mem_heads: int = 1,
        max_grad_norm: float | None = 1.0,
        neural_memory_segment_len: int | None = None,
        neural_memory_batch_size: int | None = None,
        neural_memory_kwargs: dict[str, Any] | None = None,
        use_accelerated_scan: bool | str = "auto",
        **mac_kwargs: Any,
    ) -> None:
        super().__init__()
        if vision_encoder is None:
            if in_channels != 3:
                raise SeesayError(f"MultimodalMAC: the ViT encoder takes 3-channel images, not {in_channels}")
            from seesay.encoders.vit import VisionTransformerEncoder

            vision_encoder = VisionTransformerEncoder(
                image_size=image_size, patch_size=patch_size, dim=vision_dim, depth=vision_depth,
                heads=vision_heads, mlp_dim=vision_mlp_dim, dropout=vision_dropout,
            )
        self.vision_encoder = vision_encoder
        enc_dim = int(getattr(vision_encoder, "out_dim", vision_dim))
        pre = getattr(vision_encoder, "preprocess", None)
        self.image_processor = ImageProcessor(
            image_size=getattr(pre, "size", image_size),
            mean=getattr(pre, "mean", IMAGENET_MEAN),
            std=getattr(pre, "std", IMAGENET_STD),
        )
        if projection_dim:
            self.image_projection: nn.Module = nn.Sequential(
                nn.Linear(enc_dim, projection_dim), nn.LayerNorm(projection_dim), nn.GELU()
            )
            enc_dim = projection_dim
        else:
            self.image_projection = nn.Identity()
        self.compress = build_compressor(compressor, enc_dim, text_dim, num_image_tokens, heads=min(heads, 8))
        self.fusion_dropout = nn.Dropout(fusion_dropout)
        self.num_tokens = int(num_tokens)
        self.num_image_tokens = int(num_image_tokens)
        self.image_token_id = self.num_tokens
        self.neural_mem_heads = int(neural_mem_heads)
        self.text_model = build_mac(
            num_tokens=self.num_tokens,
            dim=text_dim,
            depth=depth,
            segment_len=segment_len,
            token_emb=PrefixEmbedding(self.num_tokens + 1, text_dim, self.image_token_id),
            heads=heads,
            dim_head=dim_head,
            num_persist_mem_tokens=num_persist_mem_tokens,
            num_longterm_mem_tokens=num_longterm_mem_tokens,
            neural_memory_layers=neural_memory_layers,
            neural_mem_heads=neural_mem_heads,
            max_grad_norm=max_grad_norm,
            neural_memory_segment_len=neural_memory_segment_len,
            neural_memory_batch_size=neural_memory_batch_size,
            neural_memory_kwargs=neural_memory_kwargs,
            use_accelerated_scan=use_accelerated_scan,
            **mac_kwargs,
        )

    # ---- images ----
    def encode_images(self, images: Tensor) -> Tensor:
        """Normalised images [N,3,H,W] -> image tokens [N, K, text_dim]."""
        out = self.vision_encoder(images)
        if isinstance(out, EncoderOutput) or hasattr(out, "grid"):
            grid, hw = out.grid, tuple(out.grid_hw)
        elif isinstance(out, Tensor) and out.dim() == 3:
            grid, hw = out, None
        elif isinstance(out, Tensor) and out.dim() == 2:
            grid, hw = out.unsqueeze(1), None
        else:
            raise SeesayError("MultimodalMAC: the vision encoder must return an EncoderOutput, [N,S,D] or [N,D]")
        return self.fusion_dropout(self.compress(self.image_projection(grid), hw))

    def _layout(self, tokens: Tensor, images: Tensor | None, image_positions: Tensor | None):
        """Expand image markers to K placeholders. Returns (ids [B,T'], lengths [B], image tokens
        [B, M*K, D] | None, last [B,T] expanded index of each original position, is_marker [B,T])."""
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        b, t = tokens.shape
        k = self.num_image_tokens
        tokens = tokens.long()
        is_marker = torch.zeros_like(tokens, dtype=torch.bool)
        image_tokens = None
        if images is not None:
            if images.dim() == 4:  # [B,3,H,W]: one image per sample
                images = images.unsqueeze(1)
            if images.dim() != 5 or images.shape[0] != b:
                raise SeesayError(
                    f"MultimodalMAC: images must be [B, num_images, 3, H, W] with B={b}, got {tuple(images.shape)}"
                )
            n_img = images.shape[1]
            if image_positions is None:
                is_marker = tokens == self.image_token_id
                counts = is_marker.sum(1)
                if bool((counts != n_img).any()):
                    raise SeesayError(
                        f"MultimodalMAC: {counts.tolist()} image tokens per sample but {n_img} images each; "
                        "pass image_positions"
                    )
                order = torch.arange(n_img, device=tokens.device).expand(b, -1)
            else:
                pos = torch.as_tensor(image_positions, device=tokens.device).long()
                if pos.dim() == 1:
                    pos = pos.unsqueeze(1)
                if pos.shape != (b, n_img):
                    raise SeesayError(
                        f"MultimodalMAC: image_positions must be [B, num_images] = {(b, n_img)}, got {tuple(pos.shape)}"
                    )
                if bool((pos >= t).any()):
                    raise SeesayError(f"MultimodalMAC: image position {int(pos.max())} beyond the {t} tokens")
                valid = pos >= 0
                rows = torch.arange(b, device=tokens.device)[:, None].expand_as(pos)
                is_marker[rows[valid], pos[valid]] = True
                if int(is_marker.sum()) != int(valid.sum()):
                    raise SeesayError("MultimodalMAC: two images at the same position")
                stray = (tokens == self.image_token_id) & ~is_marker
                if bool(stray.any()):
                    raise SeesayError("MultimodalMAC: image_token_id at a position not listed in image_positions")
                # images of a row in the order of their positions; invalid (-1) ones last
                order = torch.where(valid, pos, t + torch.arange(n_img, device=pos.device)).argsort(dim=1)
            flat = self.encode_images(images.flatten(0, 1))  # (B*I, K, D)
            per = flat.view(b, n_img, k, -1)
            per = per.gather(1, order[:, :, None, None].expand(-1, -1, k, per.shape[-1]))
            image_tokens = per.flatten(1, 2)  # (B, I*K, D): rows' images in position order
        elif image_positions is not None or bool((tokens == self.image_token_id).any()):
            raise SeesayError("MultimodalMAC: image tokens or positions given without images")
        reps = torch.where(is_marker, k, 1)
        last = reps.cumsum(1) - 1  # expanded index of the last element of each original position
        lengths = reps.sum(1)
        width = int(lengths.max())
        ids = tokens.new_zeros(b, width)
        src = tokens.masked_fill(is_marker, self.image_token_id)
        for r in range(b):  # B rows, each one vectorised repeat_interleave
            ids[r, : int(lengths[r])] = src[r].repeat_interleave(reps[r])
        return ids, lengths, image_tokens, last, is_marker

    def _run(self, ids: Tensor, image_tokens: Tensor | None) -> Tensor:
        set_accelerated_scan(self.text_model, ids.device)
        with self.text_model.token_emb.images(image_tokens):
            return self.text_model(ids, disable_flex_attn=not ids.is_cuda)

    # ---- training / scoring ----
    def forward(self, tokens: Tensor, images: Tensor | None = None, image_positions: Tensor | None = None,
                return_loss: bool = True, lengths: Tensor | None = None) -> Tensor:
        """return_loss=True: mean cross-entropy of every text token predicted from what precedes
        it (image tokens and padding beyond `lengths` are never targets). Otherwise logits
        [B, T, num_tokens] aligned with `tokens` (logits[:, t] predicts tokens[:, t+1]; at an
        image position they come from the image's last token)."""
        ids, exp_len, image_tokens, last, is_marker = self._layout(tokens, images, image_positions)
        logits = self._run(ids, image_tokens)
        logits = logits.gather(1, last.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, T, V)
        if not return_loss:
            return logits
        tokens = tokens.long() if tokens.dim() == 2 else tokens.long().unsqueeze(0)
        target_ok = ~is_marker[:, 1:]
        if lengths is not None:
            pos = torch.arange(1, tokens.shape[1], device=tokens.device)
            target_ok = target_ok & (pos[None, :] < lengths.to(tokens.device)[:, None])
        targets = tokens[:, 1:].masked_fill(~target_ok, 0)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")
        return (ce * target_ok).sum() / target_ok.sum().clamp(min=1)

    # ---- generation ----
    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        images: Tensor | None = None,
        image_positions: Tensor | None = None,
        max_length: int = 100,
        temperature: float = 1.0,
        eos_token_id: int | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue `prompt` [B, T] up to `max_length` tokens in all (counting each image marker
        once, as the prompt is given) and return the new tokens [B, <= max_length - T].

        temperature 0 is greedy; otherwise the logits are divided by it and filtered by top_k /
        top_p before sampling. With `eos_token_id`, a row stops at it (later positions repeat
        it) and generation ends when every row has stopped.
        """
        from seesay.decoding import filter_logits

        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        b, t = prompt.shape
        steps = max(0, int(max_length) - t)
        if steps == 0:
            return prompt.new_zeros(b, 0)
        was_training = self.training
        self.eval()  # before encoding the images: no dropout in generation
        try:
            ids, lengths, image_tokens, _, _ = self._layout(prompt, images, image_positions)
        finally:
            self.train(was_training)
        if bool((lengths != lengths[0]).any()):  # rows of different expanded length: one at a time
            outs = [
                self.generate(
                    prompt[r : r + 1],
                    None if images is None else images[r : r + 1],
                    None if image_positions is None else torch.as_tensor(image_positions)[r : r + 1],
                    max_length, temperature, eos_token_id, top_k, top_p, use_cache, generator,
                )
                for r in range(b)
            ]
            width = max(o.shape[1] for o in outs)
            fill = 0 if eos_token_id is None else eos_token_id
            return torch.cat([F.pad(o, (0, width - o.shape[1]), value=fill) for o in outs])
        self.eval()
        mac = self.text_model
        set_accelerated_scan(mac, ids.device)
        out: list[Tensor] = []
        finished = torch.zeros(b, dtype=torch.bool, device=ids.device)
        try:
            with mac.token_emb.images(image_tokens):
                cache = None
                if use_cache:
                    logits, cache = mac_prefill(mac, ids)
                else:
                    logits = mac(ids, disable_flex_attn=True)[:, -1]
                for step in range(steps):
                    logits = logits.float()
                    if temperature == 0:
                        nxt = logits.argmax(-1)
                    else:
                        probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
                        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                    if eos_token_id is not None:
                        nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                        finished = finished | (nxt == eos_token_id)
                    out.append(nxt)
                    if (eos_token_id is not None and bool(finished.all())) or step == steps - 1:
                        break
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                    if use_cache:
                        logits, cache = mac_extend(mac, ids, cache)
                    else:
                        logits = mac(ids, disable_flex_attn=True)[:, -1]
        finally:
            self.train(was_training)
        return torch.stack(out, dim=1)
