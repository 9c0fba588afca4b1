"""Data: the ISIC layouts, ingest into Parquet shards, synthetic dermoscopy, and the Ray Data stream.

Import the submodule you need; importing this package does nothing (house rule 9).
"""
