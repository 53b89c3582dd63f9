"""The feature cache: HDF5 files that hold embeddings, their images' paths and labels, and provenance.

Stage 1c of images -> backbone -> cache -> head -> model; docs/cache-format.md is the reference.
One module per job:

- `format`: constants, attributes, names, and the identity of an extraction;
- `partial`: `OUT.partial`, the resumable working file of one extraction (or one torchrun rank);
- `assemble`: the finished `OUT`, streamed from the partial file(s) and renamed into place;
- `reader`: `read_cache(path) -> Cache`, the only way the library reads a cache;
- `writer`: `write_cache(...)`, a complete cache from arrays or a stream of blocks;
- `lock`: the writer's lock, so that one extraction at a time writes a given cache;
- `entries`: what a cache or partial file already holds per file, for an incremental update;
- `merge`: several caches of one extraction as one: `merge_caches` writes it, `PartsCache` reads it.
"""

from .assemble import assemble, check_space_for_update
from .entries import Entries, Prefill, cache_entries, partial_entries
from ..files import display_path
from .format import (COPY_ROWS, DONE, FAILED, FORMAT, FORMAT_VERSION, HASH_BYTES, HEAD_PROVENANCE_KEYS, IDENTITY_KEYS,
                     PENDING, describe_difference, head_provenance, identity, listing_digest, partial_path)
from .lock import WriterLock
from .merge import PartsCache, merge_caches, open_caches
from .partial import PartialCache, Progress, existing_shards, remove_stale_temporaries, shard_path_of
from .reader import ArrayCache, Cache, check_cache, incomplete_message, read_cache
from .writer import write_cache

__all__ = ["ArrayCache", "COPY_ROWS", "Cache", "DONE", "Entries", "FAILED", "FORMAT", "FORMAT_VERSION", "HASH_BYTES",
           "HEAD_PROVENANCE_KEYS", "IDENTITY_KEYS", "PENDING", "PartialCache", "PartsCache", "Prefill", "Progress", "WriterLock", "assemble", "cache_entries",
           "check_cache", "check_space_for_update", "describe_difference", "display_path", "existing_shards",
           "head_provenance", "identity", "incomplete_message", "listing_digest", "merge_caches", "open_caches", "partial_entries", "partial_path", "read_cache",
           "remove_stale_temporaries", "shard_path_of", "write_cache"]
