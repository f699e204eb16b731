"""Streaming loader for the sharder's WebDataset tars: exact, topology-independent order and resume (docs/data.md).

``PretrainStream`` yields one rank's training micro-batches forever; ``EvalStream`` makes one pass over a split
with fixed masks. Both read shards through ``ShardReader`` (checksums, small cache) and mask on CPU workers.
"""
from .config import DataConfig
from .shards import ShardError
from .stream import EvalStream, PretrainStream

__all__ = ["DataConfig", "EvalStream", "PretrainStream", "ShardError"]
