"""`OnnxCaptioner`: an ONNX export (`seesay.export.onnx`) run with onnxruntime as a captioner.

# m - images (memory rows), r - decoder rows, v - vocabulary, a - attention columns
It implements the parts of the captioner contract (`seesay.captioner`) that captioning needs:
`tokenizer`, `preprocess`, `encode`, `generate(src, strategy, prompt=, max_len=, constraints=,
num_captions=)`, `spec()`, `preprocess_config()`; teacher forcing (`forward`) needs PyTorch.
Generation is seesay's own `seesay.decoding.decode` (greedy, beam, diverse beam, sampling,
constraints, several captions) over `OnnxStepDecoder`, which wraps the ONNX step graphs in the
decoder step contract: torch tensors in and out, numpy in between, on the CPU.

The state is the export's flattened leaves (`onnx.json` names them) plus the image of each row.
`reorder_state` follows decode()'s conventions as `seesay.decoders.common.reorder_rows` does:
per-row leaves are indexed; per-image memory keeps one row per image while beams reorder or
expand, keeps the rows of the images that stay when finished images leave, and becomes one copy
per row when rows of an image are dropped unevenly (then each row is its own image).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.decoding import Constraints, DecodeResult, Greedy, Strategy, decode
from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError, missing_extra


class OnnxState(NamedTuple):
    leaves: dict[str, Tensor]  # name -> (R, ...) per-row leaves and (M, ...) per-image leaves
    img: Tensor  # (R,) the image of each row, image-major, ascending
    phase: int  # steps taken (picks the first-step graph when the export has one)


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise SeesayError(f"{path}: cannot load ONNX graph ({str(e).splitlines()[0][:200]})") from None


def _np(x: Tensor) -> np.ndarray:
    return x.detach().contiguous().cpu().numpy()


class _Step(NamedTuple):
    session: Any
    inputs: list[str]  # state leaf names fed (in graph order, "state." prefix dropped)
    outputs: list[str]  # per-row leaf names returned after logprobs
    carried: list[str]  # per-image leaf names carried over unchanged


class OnnxStepDecoder:
    """The ONNX init/step graphs behind the decoder step contract (`seesay.decoders.base`)."""

    def __init__(self, folder: Path, layout: dict[str, Any], threads: int | None) -> None:
        self.vocab_size = int(layout["vocab_size"])
        self.has_sentinel = bool(layout.get("has_sentinel", False))
        self.has_attention = bool(layout["has_attention"])
        self.kinds: dict[str, str] = {}
        self.init = _session(folder / layout["init"]["file"], threads)
        self.init_names = [leaf["name"] for leaf in layout["init"]["outputs"]]
        self.init_inputs = [i.name for i in self.init.get_inputs()]
        self.steps = []
        for s in layout["steps"]:
            for leaf in s["inputs"]:
                self.kinds[leaf["name"]] = leaf["kind"]
            sess = _session(folder / s["file"], threads)
            fed = {i.name for i in sess.get_inputs()}
            self.steps.append(_Step(sess, [leaf["name"] for leaf in s["inputs"] if f"state.{leaf['name']}" in fed],
                                    list(s["outputs"]), list(s["carried"])))
        for leaf in layout["init"]["outputs"]:
            self.kinds.setdefault(leaf["name"], leaf["kind"])

    def init_state(self, enc: EncoderOutput) -> OnnxState:
        feed = {"grid": enc.grid, "pooled": enc.pooled}  # the exporter drops inputs a graph never reads
        outs = self.init.run(None, {n: _np(feed[n].float()) for n in self.init_inputs})
        leaves = {n: torch.from_numpy(o) for n, o in zip(self.init_names, outs)}
        return OnnxState(leaves, torch.arange(enc.grid.shape[0]), 0)

    def step(self, prev_tokens: Tensor, state: OnnxState) -> tuple[Tensor, OnnxState, Tensor | None]:
        g = self.steps[min(state.phase, len(self.steps) - 1)]
        feed = {"prev": _np(prev_tokens.long()), **{f"state.{n}": _np(state.leaves[n]) for n in g.inputs}}
        outs = g.session.run(None, feed)
        leaves = {n: torch.from_numpy(o) for n, o in zip(g.outputs, outs[1:])}
        leaves.update({n: state.leaves[n] for n in g.carried})
        att = torch.from_numpy(outs[-1]) if self.has_attention else None
        return torch.from_numpy(outs[0]), OnnxState(leaves, state.img, state.phase + 1), att

    def reorder_state(self, state: OnnxState, index: Tensor) -> OnnxState:
        index = index.cpu()
        img = state.img
        new_img = img.index_select(0, index)
        mem_rows: Tensor | None = None  # None: the per-image memory stays as it is
        if not torch.equal(new_img, img):
            old_images = torch.unique_consecutive(img)
            new_images, counts = torch.unique_consecutive(new_img, return_counts=True)
            grouped = bool((new_images[1:] > new_images[:-1]).all()) and bool((counts == counts[0]).all())
            if not grouped:  # every row its own image, with its own copy of the memory
                mem_rows = torch.searchsorted(old_images, new_img)
                new_img = torch.arange(new_img.numel())
            elif not torch.equal(new_images, old_images):  # finished images left
                mem_rows = torch.searchsorted(old_images, new_images)
        leaves = {}
        for n, v in state.leaves.items():
            if self.kinds.get(n, "row") == "image":
                leaves[n] = v if mem_rows is None else v.index_select(0, mem_rows)
            else:
                leaves[n] = v.index_select(0, index)
        return OnnxState(leaves, new_img, state.phase)


class OnnxCaptioner(nn.Module):
    """A captioner over an ONNX export directory (see the module doc); CPU only.

    `threads`: onnxruntime's intra-op threads (default: torch's thread count).
    """

    def __init__(self, directory: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise missing_extra("onnxruntime", "onnx") from None
        from seesay.data.images import ImageLoader
        from seesay.export.onnx import FORMAT, LAYOUT_FILE
        from seesay.tokenizers import load_tokenizer

        folder = Path(directory)
        path = folder / LAYOUT_FILE
        try:
            layout = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SeesayError(f"{folder}: not an ONNX export (no {LAYOUT_FILE}; make one with seesay export)") from None
        except (OSError, ValueError) as e:
            raise SeesayError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
        if not isinstance(layout, dict) or layout.get("format") != FORMAT:
            raise SeesayError(f"{path}: not a seesay ONNX export layout")
        self.directory = folder
        self.layout = layout
        self.tokenizer = load_tokenizer(folder / "tokenizer")
        self.image_size = int(layout["image_size"])
        self.grid_hw = tuple(int(v) for v in layout["grid_hw"])
        self.image_loader = ImageLoader(layout["preprocess"].get("image_size") or self.image_size)
        self.encoder_session = _session(folder / layout["encoder"]["file"], threads)
        self.decoder = OnnxStepDecoder(folder, layout, threads)

    def spec(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.layout["spec"]))

    def preprocess_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.layout["preprocess"]))

    def preprocess(self, image: Any) -> Tensor:
        """Path, bytes, PIL image or array -> uint8 [3, S, S], read as the checkpoint reads images."""
        return self.image_loader(image)

    def encode(self, images: Tensor) -> EncoderOutput:
        """uint8 [B,3,H,W] (0..255) or float (0..1) images -> EncoderOutput, through encoder.onnx."""
        if images.dim() == 3:
            images = images.unsqueeze(0)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        S = self.image_size
        if tuple(x.shape[-2:]) != (S, S):  # the graph takes the exported size
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        grid, pooled = self.encoder_session.run(None, {"images": _np(x)})
        return EncoderOutput(torch.from_numpy(grid), torch.from_numpy(pooled), self.grid_hw)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise SeesayError("an ONNX export only generates captions; teacher forcing (training) needs the checkpoint")

    @torch.no_grad()
    def generate(self, src: Tensor | EncoderOutput, strategy: Strategy = Greedy(), *, prompt: Any = None,
                 max_len: int = 50, generator: torch.Generator | None = None, constraints: Constraints | None = None,
                 num_captions: int = 1) -> DecodeResult:
        """As `CaptionModel.generate`: seesay's decoding over the ONNX step."""
        from seesay.captioner import prompt_ids, resolve_constraints

        tok = self.tokenizer
        constraints = resolve_constraints(tok, constraints)
        enc = src if isinstance(src, EncoderOutput) else self.encode(src)
        enc = EncoderOutput(enc.grid.cpu(), enc.pooled.cpu(), enc.grid_hw)
        ids = prompt_ids(tok, prompt)
        prefix = torch.tensor(ids, dtype=torch.long) if ids else None
        return decode(self.decoder, enc, strategy, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, max_len=max_len,
                      prefix=prefix, generator=generator, constraints=constraints, num_captions=num_captions)


def load_onnx_captioner(directory: str | os.PathLike, *, threads: int | None = None) -> OnnxCaptioner:
    return OnnxCaptioner(directory, threads=threads)
