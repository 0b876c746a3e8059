"""qjax.numerics: formats, granularity, rounding, scales, QArray — the vocabulary everything else uses."""

from qjax.numerics.formats import FORMATS, Format, get_format
from qjax.numerics.granularity import (
    FULL,
    Granularity,
    per_axis,
    per_block,
    per_channel,
    per_group,
    per_tensor,
    per_token,
)
from qjax.numerics.packing import pack, unpack
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import (
    QuantSpec,
    check_input,
    compute_scale,
    fake_quant,
    init_lsq_scale,
    lsq_fake_quant,
    mx_spec,
    mxfp4,
    mxfp8,
    quantize,
    quantize_dequantize,
    scale_from_range,
)
from qjax.numerics.rounding import round_to_grid

__all__ = [
    "FORMATS", "FULL", "Format", "Granularity", "QArray", "QuantSpec", "check_input", "compute_scale",
    "fake_quant", "get_format", "init_lsq_scale", "lsq_fake_quant", "mx_spec", "mxfp4", "mxfp8", "pack",
    "per_axis", "per_block", "per_channel", "per_group", "per_tensor", "per_token", "quantize",
    "quantize_dequantize", "round_to_grid", "scale_from_range", "unpack",
]  # fmt: skip
