"""Every backbone by name: torchvision's models (`resnet18`), timm's (`timm:vit_small_patch16_224`),
and the builtin `efficientnet_lite0`; loading one cut at its penultimate layer or any `--layer`,
flip-averaged on request; listing them with their feature dims and offline availability.
"""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TransferError
from ..progress import resolve
from . import builtin, layers, timm_zoo, torchvision_zoo
from .base import (TTA_MODES, Backbone, FlipAveraged, Loaded, Preprocessing, Source, freeze, override_preprocessing,
                   preprocessing_values, recorded_preprocessing)

SOURCES: dict[str, Source] = {"builtin": builtin, "torchvision": torchvision_zoo, "timm": timm_zoo}
DIMS_TABLE = Path(__file__).with_name("dims.json")  # written by `python -m pipeline.backbones.dims`


def parse(name: str) -> tuple[str, str]:
    """'resnet18' -> ('torchvision', 'resnet18'); 'timm:test_vit' -> ('timm', 'test_vit');
    'efficientnet_lite0' -> ('builtin', 'efficientnet_lite0'). Cheap: builds nothing."""
    if name in builtin.names():
        return "builtin", name
    if name.startswith(timm_zoo.PREFIX):
        timm_zoo.resolve(name[len(timm_zoo.PREFIX):])  # refuses unknown models and tags
        return "timm", name[len(timm_zoo.PREFIX):]
    if name in torchvision_zoo.names():
        return "torchvision", name
    known = list(builtin.names()) + list(torchvision_zoo.names())
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if not close and not name.startswith("timm"):
        close = [timm_zoo.PREFIX + c
                 for c in difflib.get_close_matches(name, timm_zoo.architectures(), n=3, cutoff=0.75)]
    hint = f"close matches: {', '.join(close)}; " if close else ""
    raise TransferError(f"unknown backbone {name!r}; {hint}torchvision models go by their own name, timm models as "
                        f"timm:<model>[.<tag>]; `transfer backbones` lists them all")


def check_backbone_name(name: str) -> None:
    parse(name)


def load_backbone(name: str, weights: str | None = None, seed: int = 0, layer: str | None = None,
                  tta: str = "none", preprocessing=None) -> Backbone:
    """Build backbone `name` with `weights` (a weights name of its source, a state_dict file, or
    "random"), frozen and in eval mode, cut at its penultimate layer or at module `layer`
    (globally pooled), its embedding averaged with the horizontal flip's when tta="flip".
    preprocessing: replaces (some of) the source's, see base.override_preprocessing."""
    source, model_name = parse(name)
    if tta not in TTA_MODES:
        raise TransferError(f"unknown --tta {tta!r}; expected one of {', '.join(TTA_MODES)}")
    zoo = SOURCES[source]
    if preprocessing is not None:
        preprocessing_values(preprocessing)  # refused before the network is built
    loaded: Loaded = zoo.load(model_name, weights, seed)
    prep, rule = loaded.preprocessing, loaded.preprocessing_rule
    if preprocessing is not None:
        prep = override_preprocessing(preprocessing, loaded.preprocessing)
        rule = f"--preprocessing {_spec_text(preprocessing)} over {rule}"
    if layer and any(k.rpartition(".")[0] == layer for k in loaded.dropped_head):
        raise TransferError(f"--layer {layer} is the classifier the cut drops, and {loaded.weights}'s has another "
                            f"shape than {loaded.name}'s ({json.dumps(loaded.dropped_head)}); choose an earlier layer")
    cut_at = layer or zoo.default_layer(loaded.model_name)
    if cut_at:
        info = _layer_info(loaded.name, weights, cut_at)
        network, last, dim, pooling = layers.cut(loaded.model, info, loaded.hints), None, info.dim, info.pooling
        description = layer or f"penultimate: {cut_at}, {pooling}"
    else:
        if _table_dim(_dims_table(), source, loaded.model_name) == 0:
            raise TransferError(f"{loaded.name} ends in a feature map, not one vector per image; choose a --layer "
                                f"(`transfer backbones --layers {loaded.name}` lists them)")
        network, last, dim, description = zoo.penultimate(loaded.model_name, loaded.model)
        pooling = ""
    if tta == "flip":
        network = FlipAveraged(network)
    freeze(network)
    if last is not None:
        freeze(last)
    return Backbone(name=loaded.name, network=network, last_layer=last, dim=dim, layer=description,
                    preprocessing=prep, weights=loaded.weights,
                    weights_sha256=loaded.weights_sha256, pretrained=loaded.pretrained, seed=seed,
                    weights_source=loaded.weights_source, source=loaded.source, model_name=loaded.model_name,
                    layer_module=layer or "", pooling=pooling, tta=tta, versions=loaded.versions,
                    preprocessing_rule=rule, weights_dropped_head=loaded.dropped_head)


def _spec_text(spec) -> str:
    if isinstance(spec, str):
        return spec
    return ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in (spec.to_dict() if isinstance(spec, Preprocessing) else dict(spec)).items())


def load_arguments(provenance: dict) -> dict:
    """The `load_backbone` arguments that rebuild the backbone a cache was extracted with."""
    return {"name": provenance["backbone"],
            "weights": provenance.get("weights_source") or provenance.get("weights"),
            "seed": int(provenance.get("seed") or 0),
            "layer": provenance.get("layer_module") or None,
            "tta": provenance.get("tta") or "none",
            # A --preprocessing given at extraction is given again: the rebuilt backbone then
            # preprocesses as the extraction did (export's fp32 reference of a bf16 cache uses it).
            "preprocessing": (recorded_preprocessing(provenance)
                              if str(provenance.get("preprocessing_rule", "")).startswith("--preprocessing")
                              else None)}


# --- layers -------------------------------------------------------------------------------------

def list_layers(name: str, weights: str | None = None) -> list[layers.LayerInfo]:
    """Every module of backbone `name` in the order it runs, with the feature dim it gives after
    pooling (or why it cannot be used), from one forward pass on the meta device."""
    source, model_name = parse(name)
    zoo = SOURCES[source]
    model, crop, hints = layers.build_shapes_only(lambda: zoo.skeleton(model_name, weights))
    try:
        return layers.probe(model, crop, hints)
    except (RuntimeError, NotImplementedError, TypeError):
        # An operation without a meta kernel: the same probe on a real, randomly initialised copy.
        model, crop, hints = zoo.skeleton(model_name, weights)
        return layers.probe(model, crop, hints)


def _layer_info(name: str, weights: str | None, path: str) -> layers.LayerInfo:
    infos = list_layers(name, weights)
    by_path = {i.path: i for i in infos}
    info = by_path.get(path)
    usable = [i.path for i in infos if not i.problem]
    if info is None:
        close = difflib.get_close_matches(path, usable, n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}; " if close else ""
        raise TransferError(f"unknown layer {path!r} for {name}; {hint}`transfer backbones --layers {name}` lists "
                            f"all {len(usable)} (module paths as in named_modules(), e.g. {usable[len(usable) // 2]})")
    if info.problem:
        raise TransferError(f"layer {path!r} of {name} cannot be used: {info.problem}; "
                            f"`transfer backbones --layers {name}` lists the {len(usable)} that can")
    return info


# --- listing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackboneEntry:
    """One name `--backbone` accepts: its source, penultimate feature dim, and whether its default
    weights are on this machine ('cached', 'packaged'), must be downloaded ('download'), or do not
    exist ('none': random only). note: why it cannot be used, if it cannot."""

    name: str
    source: str
    dim: int
    weights: str
    note: str = ""


def list_backbones(source: str | None = None, text: str | None = None, progress="auto") -> list[BackboneEntry]:
    """Every backbone name (of one source, containing `text`), with its dim and weights status.

    Dims come from dims.json, written by `python -m pipeline.backbones.dims` for the installed
    torchvision and timm versions from a forward pass on the meta device; for other versions they
    are computed the same way for the listed models only. progress (see pipeline.progress): told
    about those computations."""
    if source is not None and source not in SOURCES:
        raise TransferError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    names = [(src, shown, model_name) for src in ([source] if source else list(SOURCES))
             for shown, model_name in SOURCES[src].listing()]
    if text:
        names = [entry for entry in names if text.lower() in entry[1].lower()]
    table = _dims_table()
    dims = {shown: _table_dim(table, src, model_name) for src, shown, model_name in names}
    missing = [shown for shown, dim in dims.items() if dim is None]
    if missing:
        progress = resolve(progress)
        progress.phase("feature dims", len(missing), "model")
        for shown in missing:
            dims[shown] = penultimate_dim(shown)
            progress.advance(1)
        progress.close()
    return [BackboneEntry(shown, src, int(dims[shown]), SOURCES[src].weights_status(model_name),
                          _note(src, model_name, int(dims[shown])))
            for src, shown, model_name in names]


def penultimate_dim(name: str) -> int:
    """The feature dim of backbone `name` at its default (penultimate) layer, from one forward pass
    on the meta device (no weights, no arithmetic); 0 when its forward does not end in one vector
    per image (a feature-map encoder: use --layer)."""
    source, model_name = parse(name)
    zoo = SOURCES[source]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, crop, hints = layers.build_shapes_only(lambda: zoo.skeleton(model_name))
        cut_at = zoo.default_layer(model_name)
        if cut_at:
            return next(i.dim for i in layers.probe(model, crop, hints) if i.path == cut_at)
        network, _, declared, _ = zoo.penultimate(model_name, model)
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        try:
            with torch.no_grad():
                out = network(torch.zeros(1, 3, crop, crop, device=device))
            return int(out.shape[1]) if out.dim() == 2 else 0  # 0: an encoder with no pooled output
        except (RuntimeError, NotImplementedError, TypeError):
            return declared  # an operation without a meta kernel: the model's own declared width


def _table_dim(table: dict, source: str, model_name: str) -> int | None:
    if source == "builtin":  # efficientnet_lite0 is timm's tf_efficientnet_lite0 with other weights
        return table.get("timm", {}).get(builtin.TIMM_NAME)
    return table.get(source, {}).get(model_name.partition(".")[0] if source == "timm" else model_name)


def _note(source: str, model_name: str, dim: int) -> str:
    if dim == 0:
        return "its forward does not end in pooled features; use --layer"
    return timm_zoo.unsupported(model_name) if source == "timm" else ""


def _dims_table() -> dict:
    """{source: {model: dim}} for the sources whose installed version the table was made with."""
    if not DIMS_TABLE.exists():
        return {}
    with open(DIMS_TABLE) as f:
        doc = json.load(f)
    current = {lib: _release(v) for lib, v in {**torchvision_zoo.versions(), **timm_zoo.versions()}.items()}
    usable = {}
    for src, part in doc.get("sources", {}).items():
        if all(current.get(lib) == _release(version) for lib, version in part.get("versions", {}).items()):
            usable[src] = part["dims"]
    return usable



def _release(version: str) -> str:
    """'0.29.1+cu130' -> '0.29.1': CPU and CUDA builds of one release define the same models."""
    return version.split("+")[0]
