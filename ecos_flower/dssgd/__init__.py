"""DSSGD (Shokri & Shmatikov 2015): pure algorithms (no Flower), shared by simulation and apps."""

from ecos_flower.dssgd.participant import (
    apply_download,
    flatten_params,
    load_flat_params,
    local_step,
)
from ecos_flower.dssgd.selection import clip, select_largest, select_threshold, upload_count
from ecos_flower.dssgd.server import ParameterServer, fraction_count
from ecos_flower.dssgd.sparse import InvalidUpdateError, SparseUpdate, validate_sparse_update
from ecos_flower.dssgd.svt import SvtScales, svt_scales, svt_select, svt_select_reference
from ecos_flower.privacy.noise import NoiseSource

__all__ = [
    "InvalidUpdateError",
    "NoiseSource",
    "ParameterServer",
    "SparseUpdate",
    "SvtScales",
    "apply_download",
    "clip",
    "flatten_params",
    "fraction_count",
    "load_flat_params",
    "local_step",
    "select_largest",
    "select_threshold",
    "svt_scales",
    "svt_select",
    "svt_select_reference",
    "upload_count",
    "validate_sparse_update",
]
