"""Weights files: loaded without unpickling code, checked key by key, hashed, fetched once."""

from __future__ import annotations

import hashlib
import os
import urllib.error

import torch
from torch import nn

from ..errors import TransferError
from ..files import display_path, not_a_file


def looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors")) or os.path.exists(weights)


def load_state_file(path: str) -> dict:
    """A state_dict from a .pth/.pt/.bin file (torch.load with weights_only=True) or a .safetensors file."""
    why = not_a_file(path)
    if why:  # a FIFO or a device is no weights file either (it was "does not exist")
        raise TransferError(f"weights file {display_path(path)} {why}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file  # optional: only .safetensors files need it

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a safe state_dict"
        raise TransferError(
            f"{path} is not a state_dict torch can load safely (weights_only=True): {type(e).__name__}"
        ) from None
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TransferError(f"{path} does not hold a state_dict (a dict of tensors)")
    return state


def load_strict(model: nn.Module, state: dict, name: str, path: str, drop: tuple[str, ...] = ()) -> dict:
    """model.load_state_dict(state), or one line saying which keys or shapes do not fit.

    drop: paths of the Linear layers the cut removes (the classifier): the file's may have any
    number of classes (a fine-tuned checkpoint); such a layer is rebuilt to the file's shape.
    Returns {parameter: file shape} of the dropped layers whose shape differed ({} if none)."""
    dropped = {}
    for module in drop:
        weight, bias = state.get(f"{module}.weight"), state.get(f"{module}.bias")
        own = model.state_dict().get(f"{module}.weight")
        if weight is None or own is None or weight.dim() != 2 or weight.shape == own.shape:
            continue
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            continue  # not a Linear's parameters: refused below like any other mismatch
        model.set_submodule(module, nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None))
        dropped.update({f"{module}.{p}": list(t.shape) for p, t in (("weight", weight), ("bias", bias))
                        if t is not None})
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: expected {tuple(expected[k].shape)}, "
                         f"found {tuple(state[k].shape)})")
        raise TransferError(f"weights file {path} does not fit {name}: {'; '.join(parts)}")
    model.load_state_dict(state)
    return dropped


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_checkpoint_path(url: str) -> str:
    """Where torch.hub (and so torchvision and timm) keeps the file of `url`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def fetch_url(url: str) -> str:
    """Download `url` once into torch's hub cache and return its local path."""
    path = hub_checkpoint_path(url)
    if not os.path.exists(path):
        filename = os.path.basename(path)
        try:
            match = torch.hub.HASH_REGEX.search(filename)  # torchvision names files <arch>-<sha256 prefix>.pth
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_prefix=match and match.group(1), progress=False)
        except (urllib.error.URLError, OSError, RuntimeError) as e:  # RuntimeError: hash mismatch
            raise TransferError(
                f"cannot download {url} ({getattr(e, 'reason', e)}); on a machine with network, "
                f"get that file and either put it at {path} or pass --weights /path/to/{filename}"
            ) from None
    return path
