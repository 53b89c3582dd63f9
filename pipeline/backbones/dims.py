"""The table `transfer backbones` reads: `python -m pipeline.backbones.dims` rewrites dims.json.

For the installed torchvision and timm, each model's penultimate dim, parameters and GFLOPs
(`registry.measure`: built under layers.empty_weights, parameters on the meta device, run once on a
meta tensor under torch's FLOP counter, so nothing is computed); for timm also each pretrained tag
whose input size differs from its architecture's ("arch@size"). That takes minutes for timm's
~1,400 architectures, hence the table; a listing for other versions measures only what it shows.
"""

from __future__ import annotations

import json
import sys

from . import registry, timm_zoo, torchvision_zoo


def _timm_tag_sizes() -> dict[str, tuple[str, int]]:
    """"arch@size" -> (a tag of that size, size), for the tags not at their architecture's size."""
    found = {}
    for name in timm_zoo.pretrained_names():
        key = timm_zoo.cost_key(name)
        if "@" in key:
            found.setdefault(key, (name, int(key.rpartition("@")[2])))
    return found


def main() -> None:
    doc = {"sources": {}}
    for source in ("torchvision", "timm"):
        names = torchvision_zoo.names() if source == "torchvision" else timm_zoo.architectures()
        work = {name: (name if source == "torchvision" else timm_zoo.PREFIX + name, None) for name in names}
        if source == "timm":
            work.update({key: (timm_zoo.PREFIX + tag, size) for key, (tag, size) in _timm_tag_sizes().items()})
        table = {"dims": {}, "params": {}, "gflops": {}}
        for i, (key, (shown, size)) in enumerate(work.items()):
            try:
                dim, params, gflops = registry.measure(shown, size)
            except Exception as e:  # noqa: BLE001 - left out of the table: measured when listed
                print(f"\n{shown}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            finally:
                print(f"\r{source} {i + 1}/{len(work)}", end="", file=sys.stderr)
            if size is None:
                table["dims"][key] = dim
            if params is not None:
                table["params"][key], table["gflops"][key] = params, gflops
        print(file=sys.stderr)
        versions = torchvision_zoo.versions() if source == "torchvision" else timm_zoo.versions()
        versions.pop("torch")  # the architectures come from these libraries alone
        doc["sources"][source] = {"versions": versions, **table}
    with open(registry.DIMS_TABLE, "w") as f:
        json.dump(doc, f, indent=0, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
