"""Data: the ISIC layouts, image decoding, skin tone, the shard set's manifest, synthetic dermoscopy
and the external evaluation sets. Ingest and the training stream run on Ray: launch/ingest.py and
launch/stream.py.

Import the submodule you need; importing this package does nothing (house rule 9).
"""
