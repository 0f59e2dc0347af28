"""The incoming-state share of a chunk of rows: what a recurrent state entering each row adds to its outputs
(sequence parallelism: each rank runs the operator from a zero state, then adds this share once the true entering
states are known). See `api.py`."""

from metala.ops.incoming_state.api import incoming_state_output, piece_log_decays

__all__ = ["incoming_state_output", "piece_log_decays"]
