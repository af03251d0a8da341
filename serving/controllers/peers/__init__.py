"""Peer controllers: other people's closed loops, run as their real code through an adapter.

* ``oref0`` — OpenAPS oref0 0.7.1 (npm, MIT) in a long-running node process:
  `serving.controllers.peers.oref0.Oref0Controller`.
* ``loop`` — Loop as pyloopkit (``opsb-pyloopkit==0.1.0``, BSD-2-Clause) in a long-running
  process of its own venv (it pins numpy < 2): `serving.controllers.peers.loop.LoopController`.

Their environments live in ``$GLUCAST_PEERS_DIR`` (default ``~/.cache/glucast/peers``) and are
made by ``glucast peers install`` (`serving.controllers.peers.env`). Each controller has the
usual ``name`` and ``propose(inputs) -> list[Proposal]`` and needs ``ControlInput.history``;
failures are `PeerError`s (`serving.controllers.peers.process`), after which the process is
restarted on the next call.
"""

from serving.controllers.peers.process import (
    PeerAnswerError,
    PeerCrashError,
    PeerEnvironmentError,
    PeerError,
    PeerInputError,
    PeerTimeoutError,
)

__all__ = [
    "PeerAnswerError",
    "PeerCrashError",
    "PeerEnvironmentError",
    "PeerError",
    "PeerInputError",
    "PeerTimeoutError",
]
