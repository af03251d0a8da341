"""The supervisor: every insulin command passes here, and only here reaches the pump.

Three files, each readable on its own:

* `cgm.py` — can this cycle's CGM be trusted? (`assess_cgm` → `CGMCheck`: stale, from the
  future, error codes, out of range, jumping, flat-lined);
* `rules.py` — the pure decision rules (`decide` on numpy arrays, `check_batch`,
  `SafetyState`, `validate_settings`): max basal/bolus/IOB, predictive low-glucose suspend,
  the fallbacks; no I/O, nothing here can send a command;
* `supervisor.py` — `Supervisor`, the only code that commands a pump: `check` (the rules for
  one patient), `commands_for`, `apply` (write-ahead intent in the journal it is handed,
  idempotency keys, never a blind retry).

Imports run one way, cgm ← rules ← supervisor; none of them imports the journal, the loop or
a controller. This package re-exports the public names so `from serving.safety import X`
needs no knowledge of the split.
"""

from serving.safety.cgm import (
    FLAT_READINGS,
    FUTURE_MIN,
    JUMP_MAX_GAP_MIN,
    JUMP_MGDL_PER_5MIN,
    LOW_FALLBACK_MAX_AGE_MIN,
    LOW_MGDL,
    SLOT_MIN,
    STALE_MIN,
    CGMCheck,
    CGMProblem,
    assess_cgm,
)
from serving.safety.rules import (
    FALLBACK_NONE,
    FALLBACK_SCHEDULED,
    FALLBACK_SUSPEND,
    LEVEL2_LOW_MGDL,
    MIN_TEMP_MINUTES,
    PLGS_HORIZON_MIN,
    Decision,
    SafetyError,
    SafetyState,
    Veto,
    check_batch,
    decide,
    max_basal,
    predicted_low,
    validate_settings,
)
from serving.safety.supervisor import (
    CommandOutcome,
    CommandResult,
    Supervisor,
    SupervisorJournal,
    command_key,
)

__all__ = [
    "FALLBACK_NONE",
    "FALLBACK_SCHEDULED",
    "FALLBACK_SUSPEND",
    "FLAT_READINGS",
    "FUTURE_MIN",
    "JUMP_MAX_GAP_MIN",
    "JUMP_MGDL_PER_5MIN",
    "LEVEL2_LOW_MGDL",
    "LOW_FALLBACK_MAX_AGE_MIN",
    "LOW_MGDL",
    "MIN_TEMP_MINUTES",
    "PLGS_HORIZON_MIN",
    "SLOT_MIN",
    "STALE_MIN",
    "CGMCheck",
    "CGMProblem",
    "CommandOutcome",
    "CommandResult",
    "Decision",
    "SafetyError",
    "SafetyState",
    "Supervisor",
    "SupervisorJournal",
    "Veto",
    "assess_cgm",
    "check_batch",
    "command_key",
    "decide",
    "max_basal",
    "predicted_low",
    "validate_settings",
]
