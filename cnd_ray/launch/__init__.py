"""The launch layer: every module that imports Ray (DESIGN.md, "Layers"): the training driver and
worker, Tune, sampling actors, ingest and the stream, the session, run identity, cluster glue."""
