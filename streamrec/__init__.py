"""streamrec: real-time session-based recommendations (GRU4Rec, HRNN, p-RNN) over Kafka."""

__version__ = "0.1.0"
