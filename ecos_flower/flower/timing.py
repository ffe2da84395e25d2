"""Wall-clock seconds per named phase of a run, for its report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO

from flwr.supercore import log


class PhaseTimer:
    """Wall-clock seconds per named phase, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log(INFO, "[%s] ...", name)
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        log(INFO, "[%s] %.2f s", name, self.seconds[name])
