"""The table `transfer backbones` reads: `python -m pipeline.backbones.dims` rewrites dims.json.

For the installed torchvision and timm, each model's penultimate dim (`registry.penultimate_dim`:
built under layers.empty_weights, parameters on the meta device, run once on a meta tensor, so its
output shape is known without computing anything). That takes minutes for timm's ~1,400
architectures, hence the table; a listing for other versions computes only what it shows.
"""

from __future__ import annotations

import json
import sys

from . import registry, timm_zoo, torchvision_zoo


def main() -> None:
    doc = {"sources": {}}
    for source, names, key in (("torchvision", torchvision_zoo.names(), lambda n: n),
                               ("timm", timm_zoo.architectures(), lambda n: n)):
        dims = {}
        for i, name in enumerate(names):
            shown = name if source == "torchvision" else timm_zoo.PREFIX + name
            try:
                dims[key(name)] = registry.penultimate_dim(shown)
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
