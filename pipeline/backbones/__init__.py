"""Frozen pretrained backbones: any torchvision or timm model, cut at any layer, safely loaded.

Stage 1b of images -> backbone -> cache -> head -> model. A `Backbone` maps normalized images
(N, 3, S, S) to embeddings (N, D); `Embedder` runs it on a device at a precision.

    >>> b = load_backbone("timm:test_vit", weights="random", layer="blocks.1", tta="flip")
    >>> b.dim, b.preprocessing.crop, b.provenance()["model"]      # (64, 160, 'test_vit.r160_in1k')
    >>> [(i.path, i.dim) for i in list_layers("resnet18") if not i.problem][:2]
    >>> [e.name for e in list_backbones("torchvision", "resnet")]
"""

from .base import (TTA_MODES, Backbone, LayerHints, Preprocessing, Source, preprocessing_values,
                   recorded_preprocessing)
from .embedder import PRECISIONS, Embedder
from .layers import LayerInfo
from .registry import (SOURCES, BackboneEntry, check_backbone_name, list_backbones, list_layers,
                       load_arguments, load_backbone, parse)

__all__ = ["PRECISIONS", "SOURCES", "TTA_MODES", "Backbone", "BackboneEntry", "Embedder", "LayerHints", "LayerInfo",
           "Preprocessing", "Source", "check_backbone_name", "list_backbones", "list_layers", "load_arguments",
           "load_backbone", "parse", "preprocessing_values", "recorded_preprocessing"]
