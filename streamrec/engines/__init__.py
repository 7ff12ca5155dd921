"""The worker engines: how clicks are consumed and state is kept around the core.

``native`` (default): a confluent-kafka group member with one RocksDB per partition.
``faust``: a Faust agent with Faust tables. ``common``: what both share.
"""
