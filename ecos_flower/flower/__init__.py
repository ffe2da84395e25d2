"""Flower glue: settings, metered grids, the in-process harness and the per-method server loops."""
