"""Import Opacus without its logging side effect.

`opacus.utils.module_utils` calls `logging.basicConfig` at import, which adds a handler to the
root logger and makes every Flower log line print twice. Import Opacus here, then drop exactly
the root handlers that import added.
"""

from __future__ import annotations

import logging

_root = logging.getLogger()
_before = list(_root.handlers)

import opacus  # noqa: E402,F401  (imported for its side effect, undone below)
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent  # noqa: E402

for _handler in list(_root.handlers):
    if _handler not in _before:
        _root.removeHandler(_handler)

__all__ = ["compute_rdp", "get_privacy_spent"]
