"""Every backbone by name: torchvision's models (`resnet18`), timm's (`timm:vit_small_patch16_224`),
and the builtin `efficientnet_lite0`; loading one cut at its penultimate layer or any `--layer`,
flip-averaged on request; listing them with their feature dims, parameters, GFLOPs, ImageNet top-1
and offline availability, and each one's layers with the default marked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import SettingError, TransferError
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

class Layers(list):
    """list_layers' LayerInfo, in the order the modules run."""

    def lines(self, name: str) -> list[str]:
        """A header (for stderr), then one tab-separated line per usable layer: path, dim, pooling[, default]."""
        usable = [i for i in self if not i.problem]
        return [f"{name}: {len(usable)} layers (module path, feature dim, pooling); the one marked 'default' gives "
                "the features used without --layer (the penultimate layer)"] + [
            f"{i.path}\t{i.dim}\t{i.pooling}" + ("\tdefault" if i.default else "") for i in usable]


def list_layers(name: str, weights: str | None = None) -> Layers:
    """Every module of backbone `name` in the order it runs, with the feature dim it gives after
    pooling (or why it cannot be used), from one forward pass on the meta device. The one whose
    pooled output is the features used without --layer is marked `default`."""
    source, model_name = parse(name)
    zoo = SOURCES[source]
    model, crop, hints = layers.build_shapes_only(lambda: zoo.skeleton(model_name, weights))
    try:
        infos = layers.probe(model, crop, hints)
    except (RuntimeError, NotImplementedError, TypeError):
        # An operation without a meta kernel: the same probe on a real, randomly initialised copy.
        model, crop, hints = zoo.skeleton(model_name, weights)
        infos = layers.probe(model, crop, hints)
    default = _default_path(zoo, model_name, model, infos)
    return Layers(dataclasses.replace(i, default=True) if i.path == default else i for i in infos)


def _default_path(zoo, model_name: str, model: torch.nn.Module, infos: list[layers.LayerInfo]) -> str | None:
    """The module whose pooled output equals the default (penultimate) features: the source's
    default layer where it names one; else the last module to finish before the classifier that
    is cut off (torchvision's last Linear; timm's and the builtin's run with none) with the
    penultimate dim, passing over Identity and Dropout (their output is an earlier one's)."""
    named = zoo.default_layer(model_name)
    if named:
        return named
    # The sources whose penultimate cut drops a last Linear; timm's skeletons are built without one.
    classifier = torchvision_zoo.classifier_path(model) if zoo in (torchvision_zoo, builtin) else None
    modules = dict(model.named_modules())
    dim = modules[classifier].in_features if classifier else next((i.dim for i in reversed(infos) if i.dim), 0)
    found = None
    for info in infos:
        if classifier and (info.path == classifier or info.path.startswith(classifier + ".")):
            break
        if not info.problem and info.dim == dim and not isinstance(modules[info.path], PASS_THROUGH):
            found = info.path
    return found


PASS_THROUGH = (torch.nn.Identity, torch.nn.Dropout)


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
    exist ('none': random only). note: why it cannot be used, if it cannot. params and gflops:
    of the network `extract` runs (cut at its default layer: no ImageNet classifier), GFLOPs as
    multiply-adds per image at its input size; top1: ImageNet-1k top-1 (%) of its default
    weights where the library publishes it (torchvision's weights meta). None: unknown."""

    name: str
    source: str
    dim: int
    weights: str
    note: str = ""
    params: int | None = None
    gflops: float | None = None
    top1: float | None = None


class Listing(list):
    """list_backbones' BackboneEntry."""

    def lines(self) -> list[str]:
        """The table `transfer backbones` prints: a header, then one row per backbone (blank: unknown)."""
        width = max([len(e.name) for e in self] + [4])
        rows = [f"{'name':<{width}}  {'dim':>5}  {'params':>7}  {'GFLOPs':>7}  {'top-1':>6}  weights"]
        for e in self:
            params = f"{e.params / 1e6:.1f}M" if e.params is not None else ""
            gflops, top1 = (f"{v:.2f}" if v is not None else "" for v in (e.gflops, e.top1))
            note = f"  (refused: {e.note})" if e.note else ""
            rows.append(f"{e.name:<{width}}  {e.dim:>5}  {params:>7}  {gflops:>7}  {top1:>6}  {e.weights}{note}")
        return rows


SORTS = {"name": None, "top1": lambda e: (e.top1 is None, -(e.top1 or 0)),  # best first
         "params": lambda e: (e.params is None, e.params or 0), "gflops": lambda e: (e.gflops is None, e.gflops or 0)}


def list_backbones(source: str | None = None, text: str | None = None, progress="auto",
                   sort: str = "name") -> Listing:
    """Every backbone name (of one source, containing `text`), with its dim, parameters, GFLOPs,
    ImageNet top-1 and weights status; sort: name, top1 (highest first), params or gflops
    (smallest first), unknown values last.

    Dims, parameters and GFLOPs come from dims.json, written by `python -m pipeline.backbones.dims`
    for the installed torchvision and timm versions from a forward pass on the meta device (see
    `measure`); for other versions they are measured the same way for the listed models only.
    progress (see pipeline.progress): told about those measurements."""
    if source is not None and source not in SOURCES:
        raise TransferError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if sort not in SORTS:
        raise SettingError(f"unknown sort {sort!r}; expected one of {', '.join(SORTS)}")
    names = [(src, shown, model_name) for src in ([source] if source else list(SOURCES))
             for shown, model_name in SOURCES[src].listing()]
    if text:
        names = [entry for entry in names if text.lower() in entry[1].lower()]
    table = _dims_table()
    measured = {shown: _table_cost(table, src, model_name) for src, shown, model_name in names}
    missing = [shown for shown, cost in measured.items() if cost[0] is None]
    if missing:
        progress = resolve(progress)
        progress.phase("measuring on the meta device", len(missing), "model")
        for shown in missing:
            measured[shown] = measure(shown)
            progress.advance(1)
        progress.close()
    entries = [BackboneEntry(shown, src, int(measured[shown][0]), SOURCES[src].weights_status(model_name),
                             _note(src, model_name, int(measured[shown][0])), *measured[shown][1:],
                             top1=getattr(SOURCES[src], "imagenet_top1", lambda n: None)(model_name))
               for src, shown, model_name in names]
    return Listing(sorted(entries, key=SORTS[sort]) if SORTS[sort] else entries)


def penultimate_dim(name: str) -> int:
    """The feature dim of backbone `name` at its default (penultimate) layer (see `measure`)."""
    return measure(name)[0]


def measure(name: str, size: int | None = None) -> tuple[int, int | None, float | None]:
    """(dim, parameters, GFLOPs) of backbone `name` as `extract` runs it, cut at its default layer,
    on (1, 3, size, size) images (default: its input size): one forward pass on the meta device
    (no weights, no arithmetic) under torch.utils.flop_counter, whose count halved is multiply-adds
    (the convention of torchvision's weights meta and of papers). Parameters: those of the modules
    that run. dim 0: the forward does not end in one vector per image (use --layer); parameters
    and GFLOPs None where an operation has no meta kernel (then dim is the declared width)."""
    source, model_name = parse(name)
    zoo = SOURCES[source]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, crop, hints = layers.build_shapes_only(lambda: zoo.skeleton(model_name))
        crop = size or crop
        cut_at = zoo.default_layer(model_name)
        if cut_at:
            dim = next(i.dim for i in layers.probe(model, crop, hints) if i.path == cut_at)
            return (dim, *_count(model, crop, model.get_submodule(cut_at))[1:])
        network, _, declared, _ = zoo.penultimate(model_name, model)
        for counting in (True, False):  # the FLOP counter's module tracker fails on a few models (timm's CaiT)
            try:
                return _count(network, crop, counting=counting)  # dim 0: an encoder with no pooled output
            except (RuntimeError, NotImplementedError, TypeError):
                break
            except AssertionError:
                continue
        return declared, None, None  # an operation without a meta kernel: the model's own declared width


class _Stop(Exception):
    """Raised by the hook of the module a cut network ends at: nothing after it runs."""


def _count(network: torch.nn.Module, crop: int, stop_at: torch.nn.Module | None = None,
           counting: bool = True) -> tuple[int, int | None, float | None]:
    """One forward pass of (1, 3, crop, crop), up to `stop_at`'s output: (the output's width when it
    is one vector per image, else 0; parameters of the modules that ran; GFLOPs). A module that
    never runs but whose parent did counts too: the parent used its weights (MultiheadAttention's
    out_proj); one whose parent did not run was cut off."""
    ran: set[int] = set()

    def record(module, args):
        ran.add(id(module))

    def stop(module, args, out):
        raise _Stop

    hooks = [m.register_forward_pre_hook(record) for m in network.modules()]
    if stop_at is not None:
        hooks.append(stop_at.register_forward_hook(stop))
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    out, counter = None, FlopCounterMode(display=False) if counting else contextlib.nullcontext()
    try:
        with counter, torch.no_grad():
            try:
                out = network(torch.zeros(1, 3, crop, crop, device=device))
            except _Stop:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    used = {}
    for name, module in network.named_modules():
        parent = network.get_submodule(name.rpartition(".")[0]) if name else None
        if id(module) in ran or (parent is not None and id(parent) in ran):
            used.update((id(p), p.numel()) for p in module.parameters(recurse=False))
    width = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else 0
    return width, sum(used.values()), round(counter.get_total_flops() / 2e9, 4) if counting else None


def _table_dim(table: dict, source: str, model_name: str) -> int | None:
    return _table_cost(table, source, model_name)[0]


def _table_cost(table: dict, source: str, model_name: str) -> tuple:
    """(dim, params, GFLOPs) from the table, None where it has no entry. timm's tags of another
    input size than their architecture's default are under "arch@size"."""
    if source == "builtin":  # efficientnet_lite0 is timm's tf_efficientnet_lite0 with other weights
        source, model_name = "timm", builtin.TIMM_NAME
    part = table.get(source, {})
    key = timm_zoo.cost_key(model_name) if source == "timm" else model_name
    dim = part.get("dims", {}).get(model_name.partition(".")[0] if source == "timm" else model_name)
    return dim, part.get("params", {}).get(key), part.get("gflops", {}).get(key)


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
            usable[src] = part
    return usable



def _release(version: str) -> str:
    """'0.29.1+cu130' -> '0.29.1': CPU and CUDA builds of one release define the same models."""
    return version.split("+")[0]
