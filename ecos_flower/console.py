"""A long command's console stays readable: Flower's log, Python warnings and whatever Ray or a
library prints go to a log file; the console keeps what the command itself shows (its progress
bar, its results)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

FLOWER_LOGGER = "flwr"
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TAIL_LINES = 20  # log lines shown on the console when the command fails


def _is_console_handler(handler: logging.Handler) -> bool:
    """A handler printing to a stream (Flower's ConsoleHandler), not one writing to a file."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def _fd_of(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log file (progress-bar redraws count as lines)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "\n").strip().splitlines()[-lines:])


@contextlib.contextmanager
def logs_to_file(
    log_path: str | Path, *, verbose: bool = False, append: bool = False
) -> Iterator[TextIO]:
    """Route the output of everything run inside to `log_path` (created, or emptied; `append`:
    added to); yields the
    stream the command's own output (its progress bar) goes to: the console.

    Quiet (default): Flower's `flwr` logger, Python warnings and anything written to sys.stdout,
    sys.stderr or to the file descriptors 1 and 2 (Ray's driver and the processes it starts, C
    extensions) go to the file. Ray's workers print through Ray's log monitor into the driver's
    sys.stdout/sys.stderr, so into the file too. If the block raises, the console gets the log's
    last lines and its path before the exception goes on.

    Verbose: nothing is hidden, everything prints on the terminal as usual; Flower's log is copied
    to the file as well."""
    log_path = Path(log_path)
    flower = logging.getLogger(FLOWER_LOGGER)
    log_file = open(log_path, "a" if append else "w", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed below)
    file_handler = logging.StreamHandler(log_file)
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    consoles = [h for h in flower.handlers if _is_console_handler(h)]
    flower.addHandler(file_handler)
    try:
        if verbose:
            # Flower's handler keeps the stream it found at import; print where the caller's
            # stderr is now (a test's capture, a redirected stderr).
            previous = [h.setStream(sys.stderr) for h in consoles]
            try:
                yield sys.stderr
            finally:
                for handler, stream in zip(consoles, previous, strict=True):
                    if stream is not None:
                        handler.setStream(stream)
            return
        with _quiet(log_file, log_path, flower, consoles) as console:
            yield console
    finally:
        flower.removeHandler(file_handler)
        log_file.close()


@contextlib.contextmanager
def _quiet(
    log_file: TextIO, log_path: Path, flower: logging.Logger, consoles: list[logging.Handler]
) -> Iterator[TextIO]:
    for handler in consoles:
        flower.removeHandler(handler)
    sys.stdout.flush()
    sys.stderr.flush()
    # The console: a copy of the terminal's descriptor when stderr is fd 2 (redirected below),
    # else the stderr object itself (a test's capture), which the redirection does not touch.
    err_fd = _fd_of(sys.stderr)
    if err_fd in (1, 2):
        console: TextIO = os.fdopen(
            os.dup(err_fd), "w", buffering=1, encoding="utf-8", errors="replace"
        )
        own_console = True
    else:
        console, own_console = sys.stderr, False
    saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    saved_streams = sys.stdout, sys.stderr
    for fd in saved_fds:
        os.dup2(log_file.fileno(), fd)
    sys.stdout = sys.stderr = log_file
    # Python warnings: into the file, whoever installed the current hook.
    saved_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        log_file.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = showwarning
    failed = False
    try:
        yield console
    except BaseException:
        failed = True
        raise
    finally:
        with contextlib.suppress(OSError, ValueError):
            log_file.flush()
        warnings.showwarning = saved_showwarning
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        for handler in consoles:
            flower.addHandler(handler)
        if failed:
            tail = log_tail(log_path)
            console.write(f"\nfailed; the log ({log_path}) ends with:\n{tail}\n")
            console.flush()
        if own_console:
            console.close()
