"""timm's models as `timm:<model>[.<pretrained tag>]` (`timm:convnext_tiny.fb_in22k_ft_in1k`).

Weights: the tag's pretrained weights (default), a state_dict file (.safetensors, .pth, ...), or
`random`. The pretrained file is looked up in the Hugging Face hub cache timm itself uses (or
torch's hub cache for the few hosted elsewhere), downloaded there when missing, and loaded by
timm's own `create_model(pretrained=True)` path (its checkpoint filters and classifier handling).
Preprocessing: `timm.data.resolve_data_config` of the tag's pretrained_cfg. Features: timm's
penultimate convention, `num_classes=0` (= `forward_head(x, pre_logits=True)`).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import threading

import torch
from torch import nn

from ..errors import TransferError
from . import weights as wfile
from .base import LayerHints, Loaded, Preprocessing

SOURCE = "timm"
PREFIX = "timm:"
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # the names timm tries, safetensors first
HUB_TIMEOUT = 3.0  # s for the hub to answer one metadata request (~0.3 s when online) before we call it unreachable


def library():
    """timm itself, imported on first use: listing or loading a torchvision model never pays for it."""
    import timm  # here, not at the top: see the docstring

    return timm


@functools.lru_cache(maxsize=1)
def architectures() -> tuple[str, ...]:
    timm = library()

    return tuple(timm.list_models())


@functools.lru_cache(maxsize=1)
def pretrained_names() -> tuple[str, ...]:
    timm = library()

    return tuple(timm.list_pretrained())


def listing() -> list[tuple[str, str]]:
    """Every pretrained tag, then every architecture that has none (random weights only)."""
    pretrained = pretrained_names()
    with_weights = {n.partition(".")[0] for n in pretrained}
    candidates = list(pretrained) + [a for a in architectures() if a not in with_weights]
    return [(PREFIX + n, n) for n in sorted(candidates)]


def default_layer(model_name: str) -> None:
    return None  # timm's num_classes=0 ends every model in pooled features


def versions() -> dict:
    timm = library()

    return {"torch": torch.__version__, "timm": timm.__version__}


def resolve(model_name: str):
    """`arch[.tag]` -> (`arch.tag` with the default tag filled in, its pretrained_cfg or None)."""
    timm = library()

    arch, _, tag = model_name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, architectures(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(PREFIX + c for c in close)}; " if close else ""
        raise TransferError(f"unknown timm model {arch!r}; {hint}`transfer backbones --source timm` lists all "
                            f"{len(architectures())}")
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise TransferError(f"timm model {arch} has no pretrained tag {tag!r}; its tags: "
                            f"{', '.join(tags) or 'none (use --weights random or a file)'}") from None
    return (f"{arch}.{cfg.tag}" if cfg is not None and cfg.tag else arch), cfg


def preprocessing(config: dict, name: str) -> Preprocessing:
    """timm's eval transform (timm.data.transforms_imagenet_eval) for a resolved data config, as a
    Preprocessing; refuses what model.pt cannot reproduce bit for bit."""

    channels, height, width = config["input_size"]
    mode = config.get("crop_mode") or "center"
    if channels != 3 or height != width:
        raise TransferError(f"{name} expects {channels}x{height}x{width} inputs; transfer supports square RGB crops only")
    if mode not in ("center", "squash"):
        raise TransferError(f"{name} uses timm's crop_mode {mode!r}, which model.pt cannot reproduce exactly; "
                            "supported: center, squash")
    if config["interpolation"] not in ("bilinear", "bicubic"):
        raise TransferError(f"{name} resizes with {config['interpolation']!r} interpolation, which model.pt cannot "
                            "reproduce exactly; supported: bilinear, bicubic")
    crop_pct = config.get("crop_pct") or library().data.DEFAULT_CROP_PCT
    return Preprocessing(
        resize=int(math.floor(height / crop_pct)),  # timm: scale_size = floor(img_size / crop_pct)
        crop=int(height),
        interpolation=config["interpolation"],
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        resize_mode="shorter" if mode == "center" else "squash",
    )


def hints(model: nn.Module) -> LayerHints:
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    fmt = getattr(model, "output_fmt", "NCHW")
    return LayerHints(class_token=getattr(model, "global_pool", None) == "token" and prefix > 0,
                      prefix_tokens=prefix, nhwc=getattr(fmt, "value", fmt) == "NHWC", tracer="timm")


def _hf_cached(repo: str, filenames) -> str | None:
    from huggingface_hub import try_to_load_from_cache  # timm's hub client: loaded with timm, on first use

    for filename in filenames:
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def _hf_candidates(cfg) -> tuple[str, ...]:
    return (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILES


def pretrained_file(tagged: str, cfg) -> tuple[str, str]:
    """(local path, description) of the pretrained weights of timm:`tagged`, downloaded once."""
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise TransferError(f"timm:{tagged} has no pretrained weights; pass --weights random or --weights FILE")
    if not cfg.hf_hub_id:
        return wfile.fetch_url(cfg.url), os.path.basename(cfg.url)
    # timm's hub client: loaded with timm, on first use
    from huggingface_hub import constants, hf_hub_download

    candidates = _hf_candidates(cfg)
    path = _hf_cached(cfg.hf_hub_id, candidates)  # no network round trip when the file is already here
    reason = "not in the local cache"
    for filename in candidates if path is None else ():
        # One bounded request first: unreachable, the hub client alone retries for ~25 s before failing.
        asked = _ask_hub(cfg.hf_hub_id, filename)
        if asked == "missing":
            continue  # this repository has the other file name
        if asked is not None:
            reason = asked
            break
        try:
            path = hf_hub_download(cfg.hf_hub_id, filename)
            break
        except Exception as e:  # noqa: BLE001 - a connection lost mid-download, a full disk: the client raises many types
            reason = _reason(e)
            break
    if path is None:
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{candidates[0]}"
        raise TransferError(
            f"cannot get the pretrained weights of timm:{tagged} ({reason}); on a machine with network, fetch {url} "
            f"and pass --weights /path/to/{candidates[0]} (or fill the Hugging Face cache {constants.HF_HUB_CACHE})")
    return path, f"{cfg.hf_hub_id}/{os.path.basename(path)}"


def _ask_hub(repo: str, filename: str) -> str | None:
    """One metadata request for repo/filename, answered within HUB_TIMEOUT seconds (name lookup
    included): None when the hub has the file, "missing" when this repository has no such file,
    else why the hub cannot be used, in full."""
    # timm's hub client: loaded with timm, on first use
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError

    answer: list = []

    def ask() -> None:
        try:
            get_hf_file_metadata(hf_hub_url(repo, filename), timeout=HUB_TIMEOUT)
            answer.append(None)
        except RemoteEntryNotFoundError:
            answer.append("missing")
        except Exception as e:  # noqa: BLE001 - offline, DNS, proxy, HTTP, offline mode: many types
            answer.append(_reason(e))

    # A thread, because a name lookup that hangs is bounded by no timeout of the client's.
    asking = threading.Thread(target=ask, name="transfer-hub-check", daemon=True)
    asking.start()
    asking.join(HUB_TIMEOUT)
    return answer[0] if answer else f"the Hugging Face hub did not answer within {HUB_TIMEOUT:g} s"


def _reason(e: BaseException) -> str:
    """An exception as one whole line: its type and its full message."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _create(tagged: str, path: str, name: str) -> nn.Module:
    timm = library()

    try:
        return timm.create_model(tagged, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": path})
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise TransferError(f"weights do not fit {name}: {'; '.join(lines[:3])[:300]}") from None


def load(model_name: str, weights: str | None, seed: int) -> Loaded:
    timm = library()

    tagged, cfg = resolve(model_name)
    name = PREFIX + tagged
    prep = preprocessing(timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict()), name) if cfg is not None else None
    torch.manual_seed(seed)  # makes `random` weights reproducible; harmless otherwise
    if weights == "random":
        model = timm.create_model(tagged, pretrained=False, num_classes=0)
        weights_id, sha, source = "random", "", "random"
    elif weights is None or weights == "pretrained" or wfile.looks_like_path(weights):
        if weights is None or weights == "pretrained":
            path, weights_id = pretrained_file(tagged, cfg)
            source = "pretrained"
        else:
            path, weights_id, source = weights, os.path.basename(weights), os.path.abspath(weights)
        if not (cfg is not None and cfg.custom_load and path.endswith(".npz")):  # timm reads JAX .npz itself
            # Proves the file holds tensors only, whatever timm version then loads it.
            wfile.load_state_file(path)
        model = _create(tagged, path, name)
        sha = wfile.sha256(path)
    else:
        raise TransferError(f"unknown weights {weights!r} for {name}; expected 'pretrained' (the default), a "
                            "state_dict file or 'random' (a pretrained tag goes in the name: timm:<model>.<tag>)")
    rule = f"timm's pretrained_cfg of {tagged}"
    if prep is None:
        prep, rule = preprocessing(timm.data.resolve_data_config(model=model), name), f"timm's data config of {tagged}"
    return Loaded(name=name, source=SOURCE, model_name=tagged, model=model.eval(), preprocessing=prep,
                  weights=weights_id, weights_sha256=sha, pretrained=weights != "random", seed=seed,
                  weights_source=source, versions=versions(), hints=hints(model),
                  preprocessing_rule=rule)


def penultimate(name: str, model: nn.Module) -> tuple[nn.Module, None, int, str]:
    """Built with num_classes=0, the model already returns its pre-logits features."""
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model, None, dim, "penultimate: pre-logits features (timm num_classes=0)"


def skeleton(model_name: str, weights: str | None = None) -> tuple[nn.Module, int, LayerHints]:
    timm = library()

    tagged, _ = resolve(model_name)
    model = timm.create_model(tagged, pretrained=False, num_classes=0).eval()
    return model, int(timm.data.resolve_data_config(model=model)["input_size"][-1]), hints(model)


def weights_status(name: str) -> str:
    """'cached', 'download', or 'none' (no pretrained weights: random only)."""
    timm = library()

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return "none"
    if cfg.hf_hub_id:
        return "cached" if _hf_cached(cfg.hf_hub_id, _hf_candidates(cfg)) else "download"
    return "cached" if os.path.exists(wfile.hub_checkpoint_path(cfg.url)) else "download"


def cost_key(model_name: str) -> str:
    """The key of timm:`model_name`'s parameters and GFLOPs in dims.json: its architecture, or
    "arch@size" for a tag whose input size is not the architecture's default tag's."""
    arch = model_name.partition(".")[0]
    timm = library()
    try:
        tag, default = timm.models.get_pretrained_cfg(model_name), timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # an unknown tag: listed names always resolve
        return arch
    if tag is None or default is None or tag.input_size == default.input_size:
        return arch
    return f"{arch}@{tag.input_size[-1]}"


def unsupported(name: str) -> str:
    """Why timm:`name`'s preprocessing cannot be reproduced exactly, or '' when it can."""
    timm = library()

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return ""
    try:
        preprocessing(timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict()), name)
    except TransferError as e:
        return str(e).split(";")[0].split(", which")[0].removeprefix(f"{name} ")
    return ""
