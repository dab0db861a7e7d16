"""The LASAD op in three forms that must agree: `naive_recurrent_lasad` (reference loop),
`chunk_lasad` (training / prefill) and `lasad_step_` (in-place decode step), plus the gates and
the row-start mask that all of them share."""

from .chunk import chunk_lasad
from .gates import gates, input_gate, layer_lower_bounds, log_decay
from .mask import (RESET_LOG_DECAY_FLOOR, ROW_START_MODES, apply_row_start, row_start_log_decay,
                   row_start_mask, sequence_positions)
from .naive import naive_recurrent_lasad
from .step import (fused_gates, lasad_fused_step_, lasad_step_, lasad_step_functional,
                   lasad_step_ref_)

__all__ = [
    "chunk_lasad", "naive_recurrent_lasad", "lasad_step_", "lasad_step_ref_", "lasad_fused_step_",
    "lasad_step_functional", "fused_gates",
    "gates", "input_gate", "layer_lower_bounds", "log_decay",
    "RESET_LOG_DECAY_FLOOR", "ROW_START_MODES", "apply_row_start", "row_start_log_decay",
    "row_start_mask", "sequence_positions",
]
