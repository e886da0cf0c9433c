"""Processes the project can start for itself on one machine (the embedded Kafka-protocol broker)."""
