"""Optional engines that run a shard function over a fixed list of shards (torchrun needs none: see dist.py)."""
