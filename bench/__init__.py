"""The benchmark: the edge, the workers and the whole pipeline measured side by side against
their baselines, from a checkout (it ships with the source tree, not the package). Run it as
``python -m bench`` (``scripts/bench``); the figures are in docs/benchmarks.md."""
