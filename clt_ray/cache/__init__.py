"""Activation blocks and the on-disk cache (DESIGN.md §4): one block encoding for the Ray object
store and for cache files."""

from clt_ray.cache.block import Block, BlockError, decode_block, encode_block, read_block_table

__all__ = ["Block", "BlockError", "decode_block", "encode_block", "read_block_table"]
