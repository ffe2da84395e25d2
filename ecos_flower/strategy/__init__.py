"""Flower strategies of ecos-flower, run by Flower's own `Strategy.start()`."""

from ecos_flower.strategy.dssgd import Dssgd
from ecos_flower.strategy.ecos import Ecos

__all__ = [
    "Dssgd",
    "Ecos",
]
