"""Batch norm folded into the convolution before it, in an exported program (model.pt2, model.onnx).

An eval-mode batch norm is a per-channel affine map, y = (x - mean) / sqrt(var + eps) * gamma + beta:
after a convolution it can be folded into the convolution's weight and bias, which saves one pass over
every activation it touched (torch.export's graph runs each op eagerly, so nothing else fuses them; on
EfficientNet-Lite0, 49 of 49 batch norms fold). TorchScript's `torch.jit.freeze` and onnxruntime do
the same themselves; a model.pt2 is run as saved, so the fold is done before saving.

Done on the ATen graph, not on modules, so that it holds for any backbone: timm's BatchNormAct2d and
torchvision's blocks reach the graph as the same `aten.batch_norm` node. The folded weights are computed
in float64 and stored in float32, so the features move by float32 rounding only (measured on pretrained
Lite0's features: at most 1.3e-6 of their largest value).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

_CONVOLUTIONS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default)
_BATCH_NORM = torch.ops.aten.batch_norm.default  # torch.export's IR: (x, weight, bias, mean, var, training, momentum, eps, cudnn)


def fold_batch_norms(program: ExportedProgram) -> int:
    """Fold, in place, every eval-mode batch norm whose input is a float32 convolution of a batched input,
    read by nothing else, into that convolution (not one that is the program's own output); the batch
    norm's nodes and now unread weights leave the program. The
    convolution's new bias is stored under the batch norm's bias (or the convolution's own, when it has
    one). Returns how many were folded; the rest are left as they are."""
    graph = program.graph_module.graph
    spec_of = {spec.arg.name: spec for spec in program.graph_signature.input_specs
               if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and hasattr(spec.arg, "name")}
    folded = 0
    for bn in [n for n in graph.nodes if n.op == "call_function" and n.target is _BATCH_NORM]:
        plan = _plan(bn, spec_of, program)
        if plan is None:
            continue
        conv, bias_node, weight_spec, bias_spec, new_weight, new_bias = plan
        _store(program, weight_spec, new_weight)
        _store(program, bias_spec, new_bias)
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        args[2] = bias_node
        conv.args = tuple(args)
        conv.kwargs = {k: v for k, v in conv.kwargs.items() if k != "bias"}
        bn.replace_all_uses_with(conv)
        read = [a for a in bn.args[1:5] if isinstance(a, fx.Node)]
        graph.erase_node(bn)
        for node in read:
            if not node.users:
                _drop_input(program, spec_of.pop(node.name), node)
        folded += 1
    if folded:
        graph.lint()
        program.graph_module.recompile()
    return folded


def _tensor(program: ExportedProgram, spec_of: dict, node) -> torch.Tensor | None:
    """The value behind a lifted parameter or buffer placeholder (None for anything else)."""
    spec = spec_of.get(node.name) if isinstance(node, fx.Node) and node.op == "placeholder" else None
    return None if spec is None else program.state_dict.get(spec.target, program.constants.get(spec.target))


def _plan(bn: fx.Node, spec_of: dict, program: ExportedProgram):
    """(conv, its new bias node, weight spec, bias spec, folded weight, folded bias), or None when this
    batch norm cannot be folded safely."""
    if len(bn.args) < 8:  # torch.export writes every argument out; anything else is left alone
        return None
    x, gamma, beta, mean, var, training, _momentum, eps = bn.args[:8]
    conv = x
    if training or not isinstance(conv, fx.Node) or conv.target not in _CONVOLUTIONS or len(conv.users) != 1:
        return None
    if any(user.op == "output" for user in bn.users):  # the program's output names it: left as it is
        return None
    weight_node = conv.args[1]
    bias_node = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
    weight, mean_t, var_t = (_tensor(program, spec_of, n) for n in (weight_node, mean, var))
    if weight is None or mean_t is None or var_t is None or weight.dtype != torch.float32:
        return None
    out = conv.meta.get("val")  # batched: (N, C_out, ...), so the batch norm's channels are the conv's outputs
    if getattr(out, "dim", lambda: -1)() != weight.dim() or weight.shape[0] != mean_t.numel():
        return None
    if len(weight_node.users) != 1:  # its weight is rewritten: only it may read it
        return None
    gamma_t = _tensor(program, spec_of, gamma) if gamma is not None else torch.ones_like(mean_t)
    beta_t = _tensor(program, spec_of, beta) if beta is not None else torch.zeros_like(mean_t)
    if gamma_t is None or beta_t is None:
        return None
    if bias_node is not None:  # the convolution's own bias takes the folded one
        bias_t = _tensor(program, spec_of, bias_node)
        if bias_t is None or len(bias_node.users) != 1:
            return None
        target = bias_node
    else:  # the batch norm's bias becomes the convolution's
        bias_t = torch.zeros_like(mean_t)
        if beta is None or len(beta.users) != 1:
            return None
        target = beta
    scale = gamma_t.double() / torch.sqrt(var_t.double() + float(eps))
    new_weight = (weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))).float()
    new_bias = ((bias_t.double() - mean_t.double()) * scale + beta_t.double()).float()
    return conv, target, spec_of[weight_node.name], spec_of[target.name], new_weight, new_bias


def _store(program: ExportedProgram, spec, value: torch.Tensor) -> None:
    if spec.target in program.state_dict:
        old = program.state_dict[spec.target]
        program.state_dict[spec.target] = (torch.nn.Parameter(value, requires_grad=False)
                                           if isinstance(old, torch.nn.Parameter) else value)
    else:
        program.constants[spec.target] = value


def _drop_input(program: ExportedProgram, spec, node: fx.Node) -> None:
    """Remove a placeholder nothing reads any more, with its signature entry and its value."""
    program.graph_signature.input_specs.remove(spec)
    program.graph_module.graph.erase_node(node)
    if not any(s.target == spec.target for s in program.graph_signature.input_specs):
        program.state_dict.pop(spec.target, None)
        program.constants.pop(spec.target, None)
