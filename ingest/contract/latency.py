"""The latency histograms' buckets, seconds: the edge's requests and the workers' batches
are counted in the same ones, so their histograms compare."""

from __future__ import annotations

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
