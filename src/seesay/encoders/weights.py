"""Reading local encoder weight files, shared by every encoder family.

Local files are read without unpickling arbitrary objects (safetensors, or torch.load with
weights_only=True), and every problem becomes one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from seesay.errors import SeesayError


def read_state_dict(path: str | Path, who: str) -> dict[str, Tensor]:
    """A state dict from a .safetensors file or a torch file (weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise SeesayError(f"{p}: {who} weights file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except SeesayError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one line
        raise SeesayError(f"{p}: cannot read {who} weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SeesayError(f"{p}: {who} weights file does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: dict[str, Tensor], source: str, *, optional_prefixes: tuple[str, ...] = (),
              expected: str | None = None) -> None:
    """Strict load with a clear one-line error; keys under `optional_prefixes` may be missing."""
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(optional_prefixes))
    unexpected = sorted(set(state) - set(own))
    shape_bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shape_bad:
            k = shape_bad[0]
            parts.append(f"{len(shape_bad)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        what = expected or f"weights do not fit {type(model).__name__}"
        raise SeesayError(f"{source}: {what}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
