"""A trained encoder + step-decoder captioner as ONNX graphs (`seesay export --format onnx`).

# m - images (memory rows), r - decoder rows (beams, image-major), t - time, v - vocabulary
An export directory holds:

    encoder.onnx             images float32 [m,3,S,S] in 0..1 -> grid [m,N,D], pooled [m,D]; the
                             encoder's own preprocessing (resize + mean/std) is inside the graph
    decoder_init.onnx        grid, pooled -> the decoder's initial state (`init_state`), flattened
    decoder_first_step.onnx  only when the state's structure changes after the first step (the
                             Transformer's KV cache appears then): prev [r] + state -> the same as below
    decoder_step.onnx        prev [r] int64 + state -> logprobs [r,v], the new per-row state,
                             attention [r,A] (when the decoder has attention)
    onnx.json                what the runtime needs: the spec, image size, grid (h, w) and the
                             state layout: every leaf of the state pytree by name,
                             whether it holds one row per decoder row ("row") or per image
                             ("image", the per-image memory that beams share), dtype and axes
    preprocess.json          the checkpoint's preprocess.json (image reading rules)
    tokenizer/               the tokenizer (`save_pretrained`)

The state is flattened generically (`torch.utils._pytree`), so nothing here knows a decoder's
state: which leaves are per-image memory is learnt by asking the decoder itself to expand a
2-image state to 3 rows per image (`reorder_state`), which leaves grow with time by running two
steps. Per-image leaves go into a step and do not come out (a step never changes them); the
runtime reorders them as `seesay.decoders.common.reorder_rows` does (decode()'s conventions).

The encoder graph comes from the TorchScript-based exporter, or from the dynamo exporter
(opset 18) when it has no TorchScript translation (the ViT's fused attention, an antialiased
resize); `onnx.json` says which. The decoder graphs come from the TorchScript-based exporter
(`torch.onnx.export(..., dynamo=False)`):
it traces the concrete Python path of one step, with every size traced symbolically, so the
decoders' shape arithmetic (G beams per image = rows // images) stays dynamic. The
dynamo exporter (torch.export) specialises on the decoders' size-dependent branches
(`if G > 1`, `if t > 0`) and, in torch 2.14, failed to translate the Transformer's first step.
Tracing happens with 3 beams per image after two steps, the general path; greedy decoding (1 row
per image) takes the same graph. One workaround: while tracing, sizes are tensors, and
`F.scaled_dot_product_attention` refuses a tensor `is_causal` (the Transformer's first step
computes it from a size), so it is made a bool for the duration of the export (`_traceable_sdpa`).

After writing, every graph passes `onnx.checker`, and the export decodes random images with
onnxruntime and PyTorch (greedy and beam 3): a family whose tokens differ, or whose step does
not trace (its state is not a tree of tensors: titans_mac; not an encoder + step decoder:
multimodal_mac), is refused with one line and nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError, missing_extra

log = logging.getLogger(__name__)

LAYOUT_FILE = "onnx.json"
FORMAT = "seesay-onnx"
VERSION = 1
OPSET = 17
_TRACE_IMAGES, _TRACE_BEAMS = 2, 3  # the example a step is traced with: 2 images x 3 beams


class Leaf(NamedTuple):
    name: str
    kind: str  # "row" (one row per decoder row) or "image" (per-image memory)
    dtype: str
    shape: tuple[int, ...]  # an example shape (traced at 2 images x 3 beams)
    time_axes: tuple[int, ...]  # axes that grow by one per step


def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / LAYOUT_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# The state pytree, flattened generically


def _flatten(state: Any, where: str) -> tuple[list[str], list[Tensor], Any]:
    from torch.utils import _pytree as pytree

    pairs, spec = pytree.tree_flatten_with_path(state)
    names, leaves = [], []
    for path, leaf in pairs:
        if not isinstance(leaf, Tensor) or leaf.dim() == 0:
            kind = type(leaf).__name__ if not isinstance(leaf, Tensor) else "a 0-d tensor"
            raise SeesayError(f"{where}: its decoder state ({type(state).__name__}) is not a tree of batched tensors "
                              f"(a leaf is {kind}), so its step cannot be exported to ONNX")
        name = re.sub(r"[^A-Za-z0-9_]+", "_", pytree.keystr(path)).strip("_") or "state"
        while name in names:
            name += "_"
        names.append(name)
        leaves.append(leaf)
    return names, leaves, spec


class _Probe(NamedTuple):
    """A decoder's state at 2 images x 3 beams: before any step, after one and after two."""

    names: list[list[str]]  # per phase 0, 1, 2
    leaves: list[list[Tensor]]
    specs: list[Any]
    prev: Tensor
    kinds: dict[str, str]
    has_attention: bool


def _probe(decoder: nn.Module, enc: EncoderOutput, vocab: int, where: str) -> _Probe:
    M, G = _TRACE_IMAGES, _TRACE_BEAMS
    state = decoder.init_state(enc)
    _flatten(state, where)  # a state that is not a tree of tensors is refused before any step
    expand = torch.arange(M).repeat_interleave(G)
    state = decoder.reorder_state(state, expand)
    prev = torch.arange(M * G) % max(vocab - 1, 1) + 1
    phases = [state]
    att = None
    for _ in range(2):
        _, state, att = decoder.step(prev, state)
        phases.append(state)
    flat = [_flatten(s, where) for s in phases]
    kinds: dict[str, str] = {}
    for names, leaves, _ in flat:
        for n, leaf in zip(names, leaves):
            rows = int(leaf.shape[0])
            kind = "row" if rows == M * G else "image" if rows == M else None
            if kind is None or kinds.setdefault(n, kind) != kind:
                raise SeesayError(f"{where}: decoder state leaf {n!r} has {rows} rows at {M} images x {G} beams "
                                  "(neither one per decoder row nor one per image), so it cannot be exported to ONNX")
    for phase in (1, 2):  # per-image memory must come out of a step unchanged
        before = dict(zip(flat[phase - 1][0], flat[phase - 1][1]))
        for n, leaf in zip(flat[phase][0], flat[phase][1]):
            if kinds[n] == "image" and (n not in before or not torch.equal(before[n], leaf)):
                raise SeesayError(f"{where}: decoder step changes the per-image state leaf {n!r}, "
                                  "so it cannot be exported to ONNX")
    return _Probe([f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat], prev, kinds, att is not None)


def _same_structure(a_names: list[str], a: list[Tensor], b_names: list[str], b: list[Tensor]) -> bool:
    return a_names == b_names and all(x.dim() == y.dim() and x.dtype == y.dtype for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# Graph wrappers (what gets traced)


class _EncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.encoder(self.encoder.preprocess(images))
        return out.grid, out.pooled


class _InitGraph(nn.Module):
    def __init__(self, decoder: nn.Module, grid_hw: tuple[int, int]) -> None:
        super().__init__()
        self.decoder, self.grid_hw = decoder, grid_hw

    def forward(self, grid: Tensor, pooled: Tensor) -> tuple[Tensor, ...]:
        from torch.utils import _pytree as pytree

        return tuple(pytree.tree_leaves(self.decoder.init_state(EncoderOutput(grid, pooled, self.grid_hw))))


class _StepGraph(nn.Module):
    def __init__(self, decoder: nn.Module, spec_in: Any, out_rows: list[int], has_attention: bool) -> None:
        super().__init__()
        self.decoder, self.spec_in, self.out_rows, self.has_attention = decoder, spec_in, out_rows, has_attention

    def forward(self, prev: Tensor, *leaves: Tensor) -> tuple[Tensor, ...]:
        from torch.utils import _pytree as pytree

        logprobs, state, att = self.decoder.step(prev, pytree.tree_unflatten(list(leaves), self.spec_in))
        out = pytree.tree_leaves(state)
        return (logprobs, *[out[i] for i in self.out_rows], *((att,) if self.has_attention else ()))


@contextlib.contextmanager
def _traceable_sdpa() -> Iterator[None]:
    """While tracing, sizes are tensors, so `is_causal=q.shape[2] > 1` (the Transformer's first step)
    is a tensor that `F.scaled_dot_product_attention` refuses; it is a constant for the traced
    shapes, so it is made a bool (the traced path is the one the step always takes)."""
    original = F.scaled_dot_product_attention

    def sdpa(*args: Any, is_causal: Any = False, **kwargs: Any) -> Tensor:
        return original(*args, is_causal=bool(is_causal), **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """The TorchScript exporter prints the whole traced graph (from C++, to file descriptor 1) when
    it fails; the one-line error is enough."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        for fd, copy_ in zip((1, 2), saved):
            os.dup2(copy_, fd)
            os.close(copy_)


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]], where: str, *, dynamo_fallback: bool = False) -> str:
    """Trace `module` to `path`; returns the exporter used. With `dynamo_fallback`, a graph the
    TorchScript exporter cannot translate (an antialiased resize, for one) goes through the dynamo
    exporter instead (opset 18)."""
    module.eval()  # a fresh wrapper is in training mode, and the exporter restores that mode afterwards
    try:
        with warnings.catch_warnings(), _traceable_sdpa(), _quiet_output():
            warnings.simplefilter("ignore")  # tracer warnings: the traced path is the general one (module doc)
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, verbose=False)
        return "torchscript"
    except Exception as e:  # noqa: BLE001 - any exporter failure means: this graph does not export this way
        error = e
    if dynamo_fallback:
        from torch.export import Dim

        shapes = tuple({a: Dim.AUTO for a in axes.get(n, {})} or None for n in inputs)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                                  dynamic_shapes=shapes, opset_version=18, verbose=False)
            return "dynamo"
        except Exception as e:  # noqa: BLE001
            error = e
    msg = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise SeesayError(f"{where}: {path.name} does not export to ONNX ({type(error).__name__}: {msg[:200]})") from None


def _leaf_axes(leaf: Leaf) -> dict[int, str]:
    axes = {0: "rows" if leaf.kind == "row" else "images"}
    axes.update({a: "time" for a in leaf.time_axes})
    return axes


# ---------------------------------------------------------------------------------------------


def check_exportable(model: Any, where: str) -> None:
    """One line when `model` is not an encoder + step-decoder captioner."""
    decoder, encoder = getattr(model, "decoder", None), getattr(model, "encoder", None)
    ok = all(callable(getattr(decoder, m, None)) for m in ("init_state", "step", "reorder_state"))
    if not ok or not isinstance(encoder, nn.Module) or not hasattr(encoder, "preprocess"):
        raise SeesayError(f"{where}: only encoder + step-decoder captioners (family encoder_decoder) export to ONNX; "
                          f"this is {type(model).__name__}")


def export_onnx(checkpoint: str | os.PathLike | Any, output: str | os.PathLike, *, verify: bool = True) -> Path:
    """Write `checkpoint`'s captioner to the folder `output` as ONNX graphs (see the module doc).

    `checkpoint` is a checkpoint directory or a loaded `seesay.checkpoint.Checkpoint`. The folder
    is written beside `output` and renamed into place (an existing export there is replaced).
    """
    try:
        import onnx
    except ImportError:
        raise missing_extra("onnx", "onnx") from None
    from seesay.checkpoint import load_checkpoint

    ckpt = checkpoint if hasattr(checkpoint, "model") else load_checkpoint(checkpoint, map_location="cpu")
    model = copy.deepcopy(ckpt.model).to("cpu").float().eval()  # the exporter toggles train/eval modes
    spec = model.spec()
    family = f"{spec.get('captioner', 'encoder_decoder')}/{(spec.get('decoder') or {}).get('name', '?')}"
    where = f"seesay export: {family}"
    check_exportable(model, where)
    out = Path(output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_export_dir(out))):
        raise SeesayError(f"--output {out}: exists and is not a seesay ONNX export (choose a new folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with torch.no_grad():
            _write_graphs(model, tmp, where)
        for f in sorted(tmp.glob("*.onnx")):
            try:
                onnx.checker.check_model(onnx.load(str(f)), full_check=True)
            except Exception as e:  # noqa: BLE001
                raise SeesayError(f"{where}: {f.name} fails onnx.checker ({str(e).splitlines()[0][:200]})") from None
        if verify:
            verify_export(model, tmp, where)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_graphs(model: Any, folder: Path, where: str) -> None:
    encoder, decoder, tok = model.encoder, model.decoder, model.tokenizer
    size = int(getattr(model.image_loader, "image_size", None) or encoder.preprocess.size)
    M = _TRACE_IMAGES
    images = torch.rand(M, 3, size, size, generator=torch.Generator().manual_seed(0))
    # the ViT's fused attention and an antialiased resize (images prepared at another size than the
    # encoder's) have no TorchScript translation: those encoders go through the dynamo exporter
    encoder_exporter = _export(_EncoderGraph(encoder), (images,), folder / "encoder.onnx", ["images"],
                               ["grid", "pooled"], {"images": {0: "images"}, "grid": {0: "images"},
                                                    "pooled": {0: "images"}}, where, dynamo_fallback=True)
    enc = encoder(encoder.preprocess(images))
    grid_hw = tuple(int(v) for v in enc.grid_hw)
    probe = _probe(decoder, enc, len(tok), where)

    after2 = dict(zip(probe.names[2], probe.leaves[2]))

    def leaves_of(phase: int) -> list[Leaf]:
        """The state's leaves initially (0) or after a step (1, with the axes that grew by step 2)."""
        out = []
        for n, x in zip(probe.names[phase], probe.leaves[phase]):
            y = after2.get(n) if phase == 1 else None
            grown = tuple(a for a in range(1, x.dim()) if y is not None and y.shape[a] != x.shape[a])
            out.append(Leaf(n, probe.kinds[n], str(x.dtype).replace("torch.", ""), tuple(x.shape), grown))
        return out

    init_leaves = leaves_of(0)
    with torch.enable_grad():  # no-autograd fast paths (chunked loops over images) must not be traced
        steps = _export_decoder(decoder, probe, grid_hw, enc, init_leaves, leaves_of(1), folder, where)
    tok.save_pretrained(folder / "tokenizer")
    preprocess = model.preprocess_config()
    (folder / "preprocess.json").write_text(json.dumps(preprocess, indent=1) + "\n")
    layout = {
        "format": FORMAT, "version": VERSION, "opset": OPSET,
        "exporter": {"torch": torch.__version__, "encoder": encoder_exporter, "decoder": "torchscript"},
        "spec": model.spec(), "preprocess": preprocess, "image_size": size, "grid_hw": list(grid_hw),
        "vocab_size": len(tok), "has_attention": probe.has_attention,
        "has_sentinel": bool(getattr(decoder, "has_sentinel", False)),
        "encoder": {"file": "encoder.onnx", "input": "images (float32 [images, 3, S, S], 0..1)",
                    "outputs": ["grid", "pooled"]},
        "init": {"file": "decoder_init.onnx", "outputs": [lf._asdict() for lf in init_leaves]},
        "steps": steps,
    }
    (folder / LAYOUT_FILE).write_text(json.dumps(layout, indent=1) + "\n")


def _export_decoder(decoder: nn.Module, probe: _Probe, grid_hw: tuple[int, int], enc: EncoderOutput,
                    init_leaves: list[Leaf], steady: list[Leaf], folder: Path, where: str) -> list[dict[str, Any]]:
    """decoder_init.onnx and the step graph(s); returns the steps' layout for onnx.json.

    `steady` is the state's structure after a step (time axes from steps 1 -> 2). One step graph
    when the initial state has that structure too, else a first-step graph before it."""
    _export(_InitGraph(decoder, grid_hw), (enc.grid, enc.pooled), folder / "decoder_init.onnx", ["grid", "pooled"],
            [f"new.{lf.name}" for lf in init_leaves],
            {"grid": {0: "images"}, "pooled": {0: "images"},
             **{f"new.{lf.name}": {0: "images"} for lf in init_leaves}}, where)
    if not _same_structure(probe.names[1], probe.leaves[1], probe.names[2], probe.leaves[2]):
        raise SeesayError(f"{where}: its decoder state changes structure after the second step, "
                          "so its step cannot be exported to ONNX")
    by_name = {lf.name: lf for lf in steady}
    plan = [("decoder_step.onnx", 2, steady)]
    if not _same_structure(probe.names[0], probe.leaves[0], probe.names[1], probe.leaves[1]):
        plan.insert(0, ("decoder_first_step.onnx", 0, [lf._replace(time_axes=()) for lf in init_leaves]))
    steps = []
    for file, phase, leaves_in in plan:
        out_leaves = [by_name[n] for n in probe.names[phase + 1 if phase == 0 else 2]]
        out_rows = [i for i, lf in enumerate(out_leaves) if lf.kind == "row"]
        module = _StepGraph(decoder, probe.specs[phase], out_rows, probe.has_attention)
        inputs = ["prev", *[f"state.{lf.name}" for lf in leaves_in]]
        outputs = ["logprobs", *[f"new.{out_leaves[i].name}" for i in out_rows],
                   *(["attention"] if probe.has_attention else [])]
        axes = {"prev": {0: "rows"}, "logprobs": {0: "rows"}, "attention": {0: "rows"}}
        axes.update({f"state.{lf.name}": _leaf_axes(lf) for lf in leaves_in})
        axes.update({f"new.{out_leaves[i].name}": _leaf_axes(out_leaves[i]) for i in out_rows})
        _export(module, (probe.prev, *probe.leaves[phase]), folder / file, inputs, outputs,
                {k: v for k, v in axes.items() if k in inputs or k in outputs}, where)
        steps.append({"file": file, "inputs": [lf._asdict() for lf in leaves_in],
                      "outputs": [out_leaves[i].name for i in out_rows],
                      "carried": [lf.name for lf in out_leaves if lf.kind == "image"]})
    return steps


def verify_export(model: Any, folder: Path, where: str, *, images: int = 3, max_len: int = 12) -> None:
    """Decode random images with PyTorch and with the export (greedy, beam 3): same tokens, close scores.

    3 images, not the 2 the graphs were traced with, so a size baked into a graph shows."""
    from seesay.decoding import Beam, Greedy
    from seesay.export.runtime import OnnxCaptioner

    size = int(json.loads((folder / LAYOUT_FILE).read_text())["image_size"])
    x = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    runtime = OnnxCaptioner(folder, threads=1)
    for strategy in (Greedy(), Beam(3)):
        a = model.generate(x, strategy, max_len=max_len)
        b = runtime.generate(x, strategy, max_len=max_len)
        same = torch.equal(a.lengths, b.lengths) and torch.equal(a.tokens, b.tokens)
        if not same or not torch.allclose(a.scores, b.scores, atol=1e-3, rtol=1e-4):
            raise SeesayError(f"{where}: the ONNX graphs do not reproduce PyTorch's captions "
                              f"({type(strategy).__name__}), so this family does not export cleanly")
