"""What every training stage runs on: the session (distributed set-up, logging, step loop,
preemption, teardown) and the checkpoint manager (cadence, resume, all saved state)."""

from prism_megatron.runtime.checkpoints import Checkpoints, Snapshot
from prism_megatron.runtime.session import (
    PREEMPTED_EXIT_CODE, PREEMPTED_FILE, STAGE_LOG, STAGE_LOG_ENV, Preempted, PreemptionWatch,
    StageSession, StepResult, check_stage_config, stage_session)

__all__ = ["Checkpoints", "Snapshot", "PREEMPTED_EXIT_CODE", "PREEMPTED_FILE", "STAGE_LOG",
           "STAGE_LOG_ENV", "Preempted", "PreemptionWatch", "StageSession", "StepResult",
           "check_stage_config", "stage_session"]
