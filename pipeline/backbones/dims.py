"""Penultimate feature dims without weights or arithmetic, and the table `transfer backbones` reads.

`python -m pipeline.backbones.dims` rewrites dims.json for the installed torchvision and timm: each
model is built under layers.empty_weights (parameters on the meta device) and run once on a meta
tensor, so its output shape is known without computing anything. That takes minutes for timm's
~1,400 architectures, hence the table; a listing for other versions computes only what it shows.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from . import layers, registry, timm_zoo, torchvision_zoo


def penultimate_dim(name: str) -> int:
    """The feature dim of backbone `name` at its default (penultimate) layer; 0 when its forward
    does not end in one vector per image (a feature-map encoder: use --layer)."""
    source, model_name = registry.parse(name)
    zoo = registry.SOURCES[source]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, crop, hints = layers.build_shapes_only(lambda: zoo.skeleton(model_name))
        cut_at = torchvision_zoo.default_layer(model_name) if source == "torchvision" else None
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


def main() -> None:
    doc = {"sources": {}}
    for source, names, key in (("torchvision", torchvision_zoo.names(), lambda n: n),
                               ("timm", timm_zoo.architectures(), lambda n: n)):
        dims = {}
        for i, name in enumerate(names):
            shown = name if source == "torchvision" else timm_zoo.PREFIX + name
            try:
                dims[key(name)] = penultimate_dim(shown)
            except Exception as e:  # noqa: BLE001 - left out of the table: computed when listed
                print(f"\n{shown}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            print(f"\r{source} {i + 1}/{len(names)}", end="", file=sys.stderr)
        print(file=sys.stderr)
        versions = torchvision_zoo.versions() if source == "torchvision" else timm_zoo.versions()
        versions.pop("torch")  # the architectures come from these libraries alone
        doc["sources"][source] = {"versions": versions, "dims": dims}
    with open(registry.DIMS_TABLE, "w") as f:
        json.dump(doc, f, indent=0, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
