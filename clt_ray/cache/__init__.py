"""Activation blocks and the on-disk cache (docs/design.md §4): one block encoding for the Ray object
store and for cache files; the cache is those files plus a JSON manifest on any pyarrow/fsspec
filesystem."""

from clt_ray.cache.block import Block, BlockError, decode_block, encode_block, read_block_table
from clt_ray.cache.store import (
    CacheBlocks,
    CacheError,
    CacheFile,
    CacheWriter,
    Manifest,
    filesystem,
    open_cache,
    read_file,
)

__all__ = [
    "Block", "BlockError", "CacheBlocks", "CacheError", "CacheFile", "CacheWriter", "Manifest",
    "decode_block", "encode_block", "filesystem", "open_cache", "read_block_table", "read_file",
]
