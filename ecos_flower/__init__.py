"""ecos-flower: privacy-preserving outsourced training (ECOS, DSSGD) as Flower apps."""

__version__ = "0.1.0"
