"""Errors of the data layer: both are ValueErrors so callers can catch either or both."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data or path; the message names the file or folder and what is wrong with it."""


class ScenarioError(ValueError):
    """Bad scenario file; the message names the offending key and the scenario file."""
