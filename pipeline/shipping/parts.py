"""A model file's parts, cut from its own graph: preprocess (images -> crops), classify (crops ->
probabilities) and head (features -> probabilities). Nothing is traced again: the parts are the
file's own nodes and weights, so preprocess then classify computes exactly what the whole file does.

- model.pt2: the ExportedProgram's module (a torch.fx GraphModule) cut at the crops (the uint8
  (N, 3, S, S) tensor the normalization reads) and at the head's input (nodes of module
  `model.head`). `transfer predict` resizes each image with the file's preprocess part and runs
  crops of any sizes' images together through its classify part, as model.pt's own methods allow.
- model.onnx: the graph pruned to the head's nodes (their `namespace` metadata names `model.head`),
  for export's check of the head on cached features. Predict runs the whole file, images of one
  size per call: a second session holding the backbone would double the weights in memory.

Files exported before the head was a module of its own (or any graph where the cut is not found)
give None, and callers run the whole file.
"""

from __future__ import annotations

import torch
from torch import fx

HEAD_MODULE = "model.head"  # ExportableModel.model.head: model.Head


def _ancestors(nodes: list[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """Every node `nodes` read, transitively, not looking past `stop`."""
    seen: set[fx.Node] = set()
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in stop:
            todo.extend(n.all_input_nodes)
    return seen


def _cut(module: fx.GraphModule, start: fx.Node | None, end: fx.Node | None) -> fx.GraphModule:
    """A GraphModule (sharing `module`'s parameters) computing `end` (None: the graph's output) from
    `start` (None: the graph's own inputs). Returns one tensor."""
    nodes = list(module.graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    targets = [end] if end is not None else output.all_input_nodes
    needed = _ancestors(targets, {start} if start is not None else set())
    graph, env = fx.Graph(), {}
    if start is not None:
        env[start] = graph.placeholder("x")
    for n in nodes:
        if n in needed and n not in env and n.op != "output":
            if start is not None and n.op == "placeholder":
                raise ValueError(f"the part after {start.name} reads the input {n.name}")
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[targets[0]])
    return fx.GraphModule(module, graph)


def _crops(module: fx.GraphModule) -> fx.Node | None:
    """The uint8 (N, 3, S, S) tensor converted to float32 for normalization: the end of preprocessing."""
    for n in module.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default):
            source = n.args[0] if n.args else None
            value = getattr(source, "meta", {}).get("val")
            dtype = n.args[1] if len(n.args) > 1 else n.kwargs.get("dtype")
            if (dtype == torch.float32 and isinstance(value, torch.Tensor) and value.dtype == torch.uint8
                    and value.dim() == 4):
                return source
    return None


def _in_head(n: fx.Node) -> bool:
    return any(path == HEAD_MODULE for path, _ in (n.meta.get("nn_module_stack") or {}).values())


def _features(module: fx.GraphModule) -> fx.Node | None:
    """The backbone's features: the one value the head's nodes read from outside the head."""
    head = [n for n in module.graph.nodes if _in_head(n)]
    outside = {a for n in head for a in n.all_input_nodes
               if not _in_head(a) and a.op not in ("get_attr", "placeholder")}
    return next(iter(outside)) if len(outside) == 1 else None


def program_parts(module: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule] | None:
    """(preprocess: (N, 3, H, W) uint8 -> (N, 3, S, S) uint8, classify: crops -> (N, K) probabilities),
    from an ExportedProgram's `module()`; None when the crops cannot be found."""
    crops = _crops(module)
    if crops is None:
        return None
    try:
        return _cut(module, None, crops), _cut(module, crops, None)
    except ValueError:
        return None


def program_head(module: fx.GraphModule) -> fx.GraphModule | None:
    """The head alone: (N, D) float32 features -> (N, K) probabilities; None in files without `model.head`."""
    features = _features(module)
    if features is None:
        return None
    try:
        return _cut(module, features, None)
    except ValueError:
        return None


# --- ONNX ------------------------------------------------------------------------------------------------

def _reads(node) -> set[str]:
    """The values a node reads: its inputs and, for If/Loop/Scan, what its subgraphs read from outside."""
    names = set(node.input)
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
            inner |= {i.name for i in graph.initializer}
            names |= {name for n in graph.node for name in _reads(n)} - inner
    return names - {""}


def onnx_head(proto):
    """The head alone as an ONNX model: input "features" (N, D) float32 -> output "probabilities";
    None when the graph has no nodes of `model.head`."""
    from onnx import NodeProto, helper  # only model.onnx's export check needs it

    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    head = [n for n in graph.node if any(p.key == "namespace" and f"/{HEAD_MODULE}:" in p.value
                                         for p in n.metadata_props)]
    initializers = {i.name: i for i in graph.initializer}
    while True:  # constants the head reads (axes, bounds) may be emitted outside its namespace
        produced = {o for n in head for o in n.output}
        outside = {name for n in head for name in _reads(n)} - produced - set(initializers)
        constants = [producer[name] for name in outside if name in producer and not _reads(producer[name])]
        if not constants:
            break
        head = [n for n in graph.node if n in head or n in constants]
    outputs = [o for o in graph.output if o.name in produced]
    if len(outside) != 1 or len(outputs) != 1:
        return None
    features = outside.pop()
    nodes = []
    for n in head:
        copy = NodeProto()
        copy.CopyFrom(n)
        for i, name in enumerate(copy.input):
            if name == features:
                copy.input[i] = "features"
        nodes.append(copy)
    read = {name for n in head for name in _reads(n)}
    part = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("features", 1, ["batch", "dim"])], outputs,
        [initializers[name] for name in sorted(read & set(initializers))])
    model = helper.make_model(part, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    return model
