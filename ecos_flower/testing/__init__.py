"""Test and benchmark tooling, not the plugin's API: a Flower deployment on loopback (`deployment`)
and a tiny scenario from the embedded digits (`scenarios`), used by the tests and benchmarks.

Nothing in the plugin imports this package, and its contents may change without notice.
"""
