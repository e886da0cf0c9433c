"""The web view of the data being created: `datacreator view`, and `--view` of `run` and `up`."""
