"""Flower glue: run settings, metered grids, the in-process harness and the per-method server loops."""
