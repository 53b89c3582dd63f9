"""Stage 1: images -> frozen backbone -> feature cache. One module per job:

- `plan`: the request checked and everything decided before the network runs (ExtractPlan);
- `run`: the loop that decodes, embeds and commits, and the summary;
- `decode`: image files -> batches of crops (Pillow, or decode_jpeg on the device);
- `update`: which rows of a changed folder reuse earlier results;
- `manifest`: a CSV/JSONL listing instead of a folder tree;
- `distributed`: each torchrun rank's slice, and rank 0's assembly;
- `webdataset`: tar shards instead of a folder tree: listed from their headers, read by offset;
- `embedder`: `Embedder`, the same decode, preprocessing and network for engines (Ray, Spark).
"""

from .plan import ExtractPlan, ExtractRequest
from .run import ExtractState, ExtractSummary, committed_so_far, extract, run_extract

__all__ = ["ExtractPlan", "ExtractRequest", "ExtractState", "ExtractSummary", "committed_so_far", "extract",
           "run_extract"]
