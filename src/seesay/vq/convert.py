"""`seesay convert vqgan`: a taming-transformers VQGAN checkpoint (a Lightning pickle) into
seesay's saved form (safetensors + JSON), once; seesay never loads the pickle again.

The checkpoint is read with `torch.load(weights_only=True)`, which rebuilds tensors and plain
containers only and refuses any other Python object. Checkpoints that hold such objects (an
old Lightning version stores callback classes; a malicious file stores code) are refused with
one line naming them, unless the user passes `trust_pickle=True` (`--trust-pickle`), which
unpickles the file fully, running whatever it asks to run. Even then, classes of packages that
are not installed (pytorch_lightning, taming) become inert placeholders instead of an import
error, so converting never needs the original training code.

The architecture comes from taming's model.yaml (`model.params.ddconfig`, `n_embed`,
`embed_dim`) when given, else the f16 / 16384-code defaults. The state dict is `state_dict`
of the checkpoint (or the checkpoint itself when it is a bare state dict) less the `loss.*`
keys (the discriminator and LPIPS, not needed to tokenize); it must then match exactly.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from seesay.errors import SeesayError
from seesay.vq.base import check_state_dict
from seesay.vq.vqgan import VQGAN, VQGANConfig

log = logging.getLogger(__name__)

DROPPED_PREFIXES = ("loss.",)
_DDCONFIG_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
                  "in_channels", "out_ch", "dropout")


def read_taming_config(path: str | Path) -> VQGANConfig:
    """The architecture in a taming model.yaml (model.params.ddconfig, n_embed, embed_dim)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SeesayError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SeesayError(f"--config {path}: unreadable YAML ({str(e).splitlines()[0]})") from None
    params = data.get("model", {}).get("params") if isinstance(data, dict) and isinstance(data.get("model"), dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
        raise SeesayError(f"--config {path}: no model.params.ddconfig (not a taming VQGAN model.yaml)")
    dd = params["ddconfig"]
    if dd.get("double_z"):
        raise SeesayError(f"--config {path}: double_z is true; a VQGAN encoder has double_z false")
    settings = {k: dd[k] for k in _DDCONFIG_KEYS if k in dd}
    for key in ("n_embed", "embed_dim"):
        if key not in params:
            raise SeesayError(f"--config {path}: model.params has no {key}")
        settings[key] = params[key]
    target = str(data["model"].get("target", ""))
    if "Gumbel" in target:
        raise SeesayError(f"--config {path}: {target} is not supported (only taming.models.vqgan.VQModel)")
    try:
        return VQGANConfig.from_dict(settings)
    except (TypeError, ValueError) as e:
        raise SeesayError(f"--config {path}: {e}") from None


class _Placeholder:
    """Stands in for a class of a package that is not installed (only with --trust-pickle)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _permissive_pickle_module() -> ModuleType:
    """`pickle`, except that globals whose module cannot be imported load as placeholders."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ModuleNotFoundError, AttributeError):
                log.debug("placeholder for %s.%s (not installed)", module, name)
                return type(name, (_Placeholder,), {"__module__": module})

    mod = ModuleType("seesay_pickle")
    mod.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    mod.Unpickler = Unpickler  # type: ignore[attr-defined]
    return mod


def load_lightning_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict of a Lightning / taming checkpoint, read without unpickling code unless
    `trust_pickle`."""
    path = Path(path)
    if not path.is_file():
        raise SeesayError(f"{path}: no such checkpoint file")
    try:
        if trust_pickle:
            warnings.warn(f"{path}: --trust-pickle: unpickling the checkpoint fully; this runs any code it holds",
                          stacklevel=2)
            log.warning("%s: unpickling with weights_only=False (--trust-pickle)", path)
            ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_permissive_pickle_module())
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise SeesayError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
        raise SeesayError(f"{path}: holds Python objects besides tensors ({_unsafe_globals(path)}), which a "
                          "weights-only load refuses; if you trust where the file comes from, run again with "
                          "--trust-pickle (this runs any code the file holds)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SeesayError(f"{path}: not a readable PyTorch checkpoint ({str(e).strip().splitlines()[0]})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SeesayError(f"{path}: no state dict of tensors (expected a Lightning checkpoint with 'state_dict')")
    return {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only for the message
        return "objects torch does not allow"
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return shown or "objects torch does not allow"


def convert_vqgan(checkpoint: str | Path, output: str | Path, *, config: str | Path | None = None,
                  trust_pickle: bool = False) -> VQGAN:
    """Convert a taming VQGAN checkpoint into `output` (config.json + model.safetensors); return the model."""
    from seesay.files import check_output_dir

    check_output_dir(output)
    cfg = read_taming_config(config) if config is not None else VQGANConfig()
    state = load_lightning_state_dict(checkpoint, trust_pickle=trust_pickle)
    model = VQGAN(cfg)
    hint = "" if config is not None else " (built with the f16-16384 defaults; pass --config model.yaml)"
    try:
        check_state_dict(model, state, checkpoint)
    except SeesayError as e:
        raise SeesayError(f"{e}{hint}") from None
    model.load_state_dict(state, strict=True)
    model.eval().save_pretrained(output)
    return model
