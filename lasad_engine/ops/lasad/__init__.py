"""The LASAD op (docs/model.md, "The mixer") in the forms that must agree:
`naive_recurrent_lasad` (the reference loop), `chunk_lasad` (training and prefill) and
`lasad_step_` / `lasad_fused_step_` (the in-place decode step; `lasad_step_functional` is its
side-effect-free definition, which the exports trace), with the gates and the row-start rule that
all of them share. Internals (the torch reference of the step kernel, the mask helpers) are
imported from their modules."""

from .chunk import chunk_lasad
from .gates import fused_gates, layer_lower_bounds
from .mask import ROW_START_MODES, row_start_mask
from .naive import naive_recurrent_lasad
from .step import lasad_fused_step_, lasad_step_, lasad_step_functional

__all__ = [
    "naive_recurrent_lasad", "chunk_lasad", "lasad_step_", "lasad_fused_step_", "lasad_step_functional",
    "fused_gates", "layer_lower_bounds", "row_start_mask", "ROW_START_MODES",
]
