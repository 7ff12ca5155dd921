"""The native engine: a confluent-kafka consumer group member, RocksDB per partition."""
