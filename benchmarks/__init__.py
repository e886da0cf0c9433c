"""datacreator benchmarks, run from a clone as `python -m benchmarks NAME [options]`."""
