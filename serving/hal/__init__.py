"""Hardware abstraction: the protocols a CGM or pump driver implements, and backends.

`cgm.CGM` and `pump.Pump` are what the loop codes against. Backends: `simulated` (devices
over `forecast.sim`, one patient or a whole cohort), `replay` (a CGM replaying a recorded
canonical frame) and `faults` (wrappers that inject device faults into any of them).
Submodules are imported on demand so `serving.hal` stays light.
"""

from serving.hal.cgm import CGM, CGMError, Clock, SystemClock
from serving.hal.pump import (
    Ack,
    Command,
    CommandKind,
    Delivery,
    Pump,
    PumpCommandError,
    PumpError,
    PumpFault,
    PumpNoAck,
    PumpStatus,
    PumpTimeout,
)

__all__ = [
    "CGM",
    "CGMError",
    "Clock",
    "SystemClock",
    "Ack",
    "Command",
    "CommandKind",
    "Delivery",
    "Pump",
    "PumpCommandError",
    "PumpError",
    "PumpFault",
    "PumpNoAck",
    "PumpStatus",
    "PumpTimeout",
]
