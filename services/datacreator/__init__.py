"""datacreator: labeled training data from one formatting example, at stream scale."""

__version__ = "0.1.0"
