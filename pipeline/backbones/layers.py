"""`--layer`: features from any module of a network, globally pooled; and shapes without arithmetic.

`cut` keeps only the part of the network up to the named module, with torch.fx feature extraction
(torchvision.models.feature_extraction; timm's wrapper of it knows timm's untraceable leaf
modules): later layers are neither run nor kept, and the result stays TorchScript-able for model.pt.
`probe` finds which modules can be cut at and the dim each gives from one forward pass on PyTorch's
meta device (shapes only, no arithmetic), so listing the layers of a large model is cheap.

Pooling, as the linear-probe literature does for intermediate layers: convolutional maps are
averaged over H and W; token sequences give the class token when the model's own head reads it
(torchvision's ViT, timm's global_pool="token") and otherwise the mean of the patch tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models import feature_extraction

from .base import LayerHints

POOLINGS = POOL_NONE, POOL_NCHW, POOL_NHWC, POOL_CLASS_TOKEN, POOL_TOKEN_MEAN = (
    "none", "mean over H, W", "mean over H, W (NHWC)", "class token", "mean of patch tokens")


@dataclass(frozen=True)
class LayerInfo:
    """One module of a network as a feature layer: its path (as in named_modules), the output
    shape at batch 1, the feature dim after pooling, and why it cannot be used ('' when it can).
    default: its pooled output is the features used without --layer (registry.list_layers)."""

    path: str
    shape: tuple
    dim: int
    pooling: str
    problem: str = ""
    default: bool = False


def pooling_for(shape: tuple, hints: LayerHints) -> tuple[str, int] | None:
    """(pooling, dim) for an activation of `shape` (batch first), or None when it has no rule.

    4-d maps: crops are square, so the two spatial sizes are equal: (N, C, S, S) is NCHW and
    (N, S, S, C) is NHWC; when both fit (C == S), the model's declared layout decides."""
    if len(shape) == 2:
        return POOL_NONE, int(shape[1])
    if len(shape) == 3:
        return (POOL_CLASS_TOKEN if hints.class_token else POOL_TOKEN_MEAN), int(shape[2])
    if len(shape) == 4:
        nchw, nhwc = shape[2] == shape[3], shape[1] == shape[2]
        if nhwc and (hints.nhwc or not nchw):
            return POOL_NHWC, int(shape[3])
        if nchw:
            return POOL_NCHW, int(shape[1])
    return None


class Pooled(nn.Module):
    """(N, 3, S, S) -> (N, D): a truncated network (a torch.fx feature extractor returning
    {"out": activation}) followed by its pooling."""

    def __init__(self, extractor: nn.Module, pooling: str, prefix_tokens: int):
        super().__init__()
        self.extractor = extractor
        self.rule = POOLINGS.index(pooling)  # an int: TorchScript cannot read the module's str constants
        self.prefix_tokens = prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.extractor(x)["out"]
        if self.rule == 1:  # POOL_NCHW
            return y.mean(dim=(2, 3))
        if self.rule == 2:  # POOL_NHWC
            return y.mean(dim=(1, 2))
        if self.rule == 3:  # POOL_CLASS_TOKEN
            return y[:, 0]
        if self.rule == 4:  # POOL_TOKEN_MEAN
            return y[:, self.prefix_tokens:].mean(dim=1)
        return y


def cut(model: nn.Module, info: LayerInfo, hints: LayerHints) -> nn.Module:
    """The network up to module `info.path`, pooled: (N, 3, S, S) -> (N, info.dim)."""
    if hints.tracer == "timm":  # timm's tracer knows its untraceable leaf modules (timm is loaded: a timm model)
        from timm.models import create_feature_extractor
    else:
        create_feature_extractor = feature_extraction.create_feature_extractor
    extractor = create_feature_extractor(model, {info.path: "out"})
    return Pooled(_without_later_layers(extractor), info.pooling,
                  hints.prefix_tokens if info.pooling == POOL_TOKEN_MEAN else 0)


def _without_later_layers(extractor: nn.Module) -> torch.fx.GraphModule:
    """The eval-mode graph of a feature extractor, without the shape assertions of later layers.

    torch.fx keeps side-effecting nodes when it drops unused ones, and a `torch._assert` on a later
    block's input (torchvision's ViT checks every encoder block's) would keep that block and every
    block before it running. Our crops have a fixed shape, so the checks can go; the graph then
    ends at the named module and the GraphModule keeps only the submodules it still calls."""
    graph = getattr(extractor, "eval_graph", extractor.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._assert and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return torch.fx.GraphModule(extractor, graph).eval()


def _traced_names(model: nn.Module, tracer: str) -> list[str]:
    if tracer == "timm":  # as in `cut`
        from timm.models import get_graph_node_names
    else:
        get_graph_node_names = feature_extraction.get_graph_node_names
    return get_graph_node_names(model)[1]  # the eval-mode graph


def probe(model: nn.Module, crop: int, hints: LayerHints) -> list[LayerInfo]:
    """Every module that runs in a forward pass of (1, 3, crop, crop), in the order it first runs.

    Usable modules run exactly once (a module called twice has no single output), return one
    poolable tensor and are nodes of the traced graph. The forward runs on the device of the
    model's parameters: the meta device for a model built under `empty_weights`."""
    calls: dict[str, list] = {}
    hooks = []
    for path, module in model.named_modules():
        if path:
            def record(mod, args, out, path=path):
                calls.setdefault(path, []).append(tuple(out.shape) if isinstance(out, torch.Tensor) else None)
            hooks.append(module.register_forward_hook(record))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, crop, crop, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    try:
        traced = _traced_names(model, hints.tracer)
        untraceable = ""
    except Exception as e:  # noqa: BLE001 - torch.fx raises whatever the model's Python does under tracing
        traced, untraceable = [], f"torch.fx cannot trace this network ({type(e).__name__}: {str(e)[:120]})"
    prefixes = {".".join(name.split(".")[:i]) for name in traced for i in range(1, name.count(".") + 2)}
    infos = []
    for path, outputs in calls.items():
        shape = outputs[-1]
        rule = pooling_for(shape, hints) if shape is not None else None
        if len(outputs) > 1:
            problem = f"runs {len(outputs)} times in one forward pass (name a module around it)"
        elif shape is None:
            problem = "its output is not one tensor"
        elif rule is None:
            problem = f"its output {shape} is not (N, C, H, W), (N, H, W, C), (N, L, C) or (N, D)"
        elif path not in prefixes:
            problem = untraceable or "torch.fx treats the module around it as one opaque step"
        else:
            problem = ""
        pooling, dim = rule if rule is not None else ("", 0)
        infos.append(LayerInfo(path, shape or (), dim, pooling, problem))
    return infos


class _SkipInPlaceOnMeta(TorchFunctionMode):
    """In-place initialisation (normal_, trunc_normal_, ...) of a meta tensor computes nothing but
    still costs Python time in torch's reference kernels; skip it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor)
                and args[0].is_meta):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def empty_weights():
    """Build modules whose parameters and buffers live on the meta device: no memory, no
    initialisation arithmetic, shapes only. The idea of accelerate's `init_empty_weights`
    (parameters moved to meta as they are registered), in a few lines rather than a dependency;
    unlike `with torch.device("meta")` it lets constructors compute with ordinary tensors (RegNet
    does)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer_on_meta(self, name, tensor, persistent=True):
        register_buffer(self, name, tensor.to("meta") if tensor is not None else None, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        with _SkipInPlaceOnMeta():
            yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


@contextlib.contextmanager
def meta_device():
    """Like empty_weights, for the models that compute with their own parameters while being built."""
    with torch.device("meta"), _SkipInPlaceOnMeta():
        yield


def build_shapes_only(build):
    """build() under empty_weights, else under meta_device, else as it is (real random weights)."""
    for context in (empty_weights, meta_device):
        try:
            with context():
                return build()
        except (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError):
            continue
    return build()
