"""The public way to read created examples: `from datacreator.consumer import iter_examples`.

The implementation lives in the bus package (`datacreator.bus.consumer`), the one place that
imports aiokafka; this module keeps the documented import path.
"""

from datacreator.bus.consumer import ExampleStream, iter_examples, stream_examples

__all__ = ["ExampleStream", "iter_examples", "stream_examples"]
