"""The Kafka bus. Only the modules of this package import aiokafka; code outside it that must
tell a broker failure from other errors catches `KafkaError` from here."""

from aiokafka.errors import KafkaError

__all__ = ["KafkaError"]
