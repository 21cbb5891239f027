"""Hypothesis and fuzz tests: generated inputs, hostile bytes and generated programs over
in-process clusters, checked against properties rather than examples."""
