"""A peer running as its own long-running process, answering one JSON request per line.

Why a process and not an import: the peers are other people's code in other runtimes
(oref0 is JavaScript; pyloopkit pins numpy < 2, which glucast's environment does not have).
Starting a process per decision costs 100-200 ms (node, or a Python that imports numpy);
one process answering line after line costs a few milliseconds a decision.

The protocol is the drivers' (``oref0_driver.js``, ``loop_driver.py`` beside this file):
one request ``{"id": n, ...}`` per line on stdin, one answer ``{"id": n, "ok": true,
"result": {...}}`` or ``{"id": n, "ok": false, "error": "..."}`` per line on stdout, in
order. Whatever the peer prints for humans goes to stderr, of which the last lines are
kept for the error message when it dies.

Failures are typed (`PeerError` and subclasses) so the engine can fall back and journal
them; after a timeout or a crash the process is ended and a fresh one starts on the next
call (a peer that hung once must not answer a later request with a stale line).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from serving.controllers import ControllerError


class PeerError(ControllerError):
    """A peer controller could not give a recommendation (the cycle falls back; in a batch,
    per patient: `failed` and `partial` as `serving.controllers.ControllerError` says)."""

    def __init__(
        self,
        message: str,
        *,
        peer: str = "",
        failed: Mapping[int, str] | None = None,
        partial: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(message, failed=failed, partial=partial)
        self.peer = peer


class PeerEnvironmentError(PeerError):
    """The peer's pinned environment (node modules, venv) is missing or not the pinned one."""


class PeerTimeoutError(PeerError):
    """The peer process did not answer in time (it is ended; the next call starts a new one)."""


class PeerCrashError(PeerError):
    """The peer process exited or wrote something that is not a JSON answer."""


class PeerAnswerError(PeerError):
    """The peer answered the request with an error (bad input, or an empty result)."""


class PeerInputError(PeerError, ValueError):
    """The adapter cannot build the peer's request from this input (named field and value)."""


_STDERR_LINES = 40


class PeerProcess:
    """One long-running peer process speaking JSON lines.

    `request_many` pipelines a batch: every request is written before the answers are read,
    so a cohort pays the pipe round trip once. Each answer has `timeout_s` from the previous
    one (or from the write). Not thread-safe: one controller, one caller.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout_s: float = 10.0,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = None if cwd is None else str(cwd)
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._next_id = 0
        self._writer: threading.Thread | None = None
        self.starts = 0  # how many processes were started (restarts = starts - 1)

    # -- lifecycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process and wait for its ready line (``{"ready": true, ...}``)."""
        if self.running:
            return
        self.close()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                cwd=self.cwd,
            )
        except OSError as e:
            raise PeerEnvironmentError(
                f"{self.name}: cannot start {self.argv[0]!r}: {e}", peer=self.name
            ) from e
        self.starts += 1
        self._lines = queue.Queue()
        self._stderr = deque(maxlen=_STDERR_LINES)
        proc = self._proc
        threading.Thread(target=self._pump_stdout, args=(proc, self._lines), daemon=True).start()
        threading.Thread(target=self._pump_stderr, args=(proc, self._stderr), daemon=True).start()
        ready = self._read(self.start_timeout_s, "start")
        if not ready.get("ready"):
            self.close()
            raise PeerCrashError(
                f"{self.name}: expected a ready line at start, got {ready!r}", peer=self.name
            )
        self.info = ready

    def close(self) -> None:
        """End the process (its stdin closes first, so a healthy driver exits by itself)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten controller must not leave a node process behind
        try:
            self.close()
        except Exception:
            pass

    # -- requests
    def request(self, payload: Mapping[str, Any]) -> dict:
        """One request → its result (raises a `PeerError`)."""
        results = self.request_many([payload])
        if isinstance(results[0], PeerAnswerError):
            raise results[0]
        return results[0]

    def request_many(self, payloads: Sequence[Mapping[str, Any]]) -> list[dict | PeerAnswerError]:
        """A batch of requests → one result per request, in order.

        A request the peer answered with an error gives a `PeerAnswerError` in its place (the
        process is fine); a timeout or a crash raises for the batch and ends the process.
        """
        return self.collect(self.submit(payloads))

    def submit(self, payloads: Sequence[Mapping[str, Any]]) -> list[int]:
        """Write a batch of requests without waiting (their ids, for `collect`): several
        processes can then work on their parts of a cohort at the same time."""
        if not payloads:
            return []
        self.start()
        assert self._proc is not None and self._proc.stdin is not None
        ids = []
        lines = []
        for p in payloads:
            self._next_id += 1
            ids.append(self._next_id)
            lines.append(json.dumps({**p, "id": self._next_id}, allow_nan=False) + "\n")
        if self._proc.poll() is not None:
            code = self._proc.poll()
            self._fail()
            raise PeerCrashError(
                f"{self.name}: the process is gone (exit code {code}){self._stderr_tail()}",
                peer=self.name,
            )
        # written by a thread: a batch is larger than the pipe's buffer, and a blocking write
        # would hold this caller until the peer had read nearly all of it, so a second
        # process would get its part only then (no parallelism). The reader notices a peer
        # that dies while reading (its stdout closes): a failed write needs no report here.
        self._writer = threading.Thread(
            target=self._write, args=(self._proc, "".join(lines).encode()), daemon=True
        )
        self._writer.start()
        return ids

    @staticmethod
    def _write(proc: subprocess.Popen[bytes], data: bytes) -> None:
        try:
            assert proc.stdin is not None
            proc.stdin.write(data)
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):  # gone or closed: the reader says why
            pass

    def collect(self, ids: Sequence[int]) -> list[dict | PeerAnswerError]:
        """The answers to submitted requests, in order (see `request_many`)."""
        out: list[dict | PeerAnswerError] = []
        for want in ids:
            msg = self._read(self.timeout_s, f"request {want}")
            if msg.get("id") != want:
                self._fail()
                raise PeerCrashError(
                    f"{self.name}: answer for request {msg.get('id')!r} while waiting for {want}",
                    peer=self.name,
                )
            if msg.get("ok"):
                out.append(msg.get("result") or {})
            else:
                out.append(
                    PeerAnswerError(
                        f"{self.name}: {msg.get('error', 'no error text')}", peer=self.name
                    )
                )
        if self._writer is not None:  # every answer came, so every line was read
            self._writer.join(timeout=1.0)
            self._writer = None
        return out

    # -- internals
    def _read(self, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self._fail()
            raise PeerTimeoutError(
                f"{self.name}: no answer to {what} within {timeout_s:g} s; process ended, "
                f"a new one starts on the next call{self._stderr_tail()}",
                peer=self.name,
            ) from None
        if line is None:
            code = self._proc.poll() if self._proc else None
            self._fail()
            raise PeerCrashError(
                f"{self.name}: the process exited (code {code}) during {what}{self._stderr_tail()}",
                peer=self.name,
            )
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            self._fail()
            raise PeerCrashError(
                f"{self.name}: not a JSON line during {what}: {line[:200]!r}{self._stderr_tail()}",
                peer=self.name,
            ) from None
        if not isinstance(msg, dict):
            self._fail()
            raise PeerCrashError(f"{self.name}: not a JSON object: {msg!r}", peer=self.name)
        return msg

    def _fail(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass

    def _stderr_tail(self) -> str:
        time.sleep(0.05)  # let the stderr thread catch the dying words
        tail = list(self._stderr)[-8:]
        return ("; stderr: " + " | ".join(tail)) if tail else ""

    @staticmethod
    def _pump_stdout(proc: subprocess.Popen[bytes], lines: queue.Queue[bytes | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    @staticmethod
    def _pump_stderr(proc: subprocess.Popen[bytes], tail: deque[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.decode(errors="replace").rstrip())


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a peer process: this one's, in UTC, plus `extra`.

    oref0 reads its schedules in the process's local time zone and glucast's clocks are UTC;
    a peer is run in UTC so a schedule entry at 00:00 means 00:00 UTC.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TZ"] = "UTC"
    env.update(extra or {})
    return env


def answer_batch(
    process: PeerProcess | Sequence[PeerProcess],
    requests: Sequence[Mapping[str, Any] | None],
    convert: Callable[[int, dict], Any],
    names: Sequence[str],
    *,
    failed: Mapping[int, str] | None = None,
) -> list[Any]:
    """Send a cohort's requests, convert each answer (``convert(i, result)``) and return them.

    One patient's bad answer does not hide the others': a `PeerAnswerError` is raised after
    all are converted, with `failed` (index → reason) and `partial` (the others' results).
    A request that is None failed before it was sent (its reason in `failed`). With several
    processes the batch is split into contiguous parts, all written before any is read, so
    the processes decide at the same time (one core each). A timeout or a crash raises at
    once (`PeerTimeoutError`, `PeerCrashError`).
    """
    procs = [process] if isinstance(process, PeerProcess) else list(process)
    bad: dict[int, str] = dict(failed or {})
    todo = [i for i, r in enumerate(requests) if r is not None and i not in bad]
    parts = [list(a) for a in _split(todo, len(procs))]
    sent = [(p, part, p.submit([requests[i] for i in part])) for p, part in zip(procs, parts)]  # type: ignore[misc]
    results: dict[int, dict | PeerAnswerError] = {}
    try:
        for p, part, ids in sent:
            results.update(zip(part, p.collect(ids)))
    except PeerError:  # the others' unread answers would be stale lines next cycle: end them
        for p, _, _ in sent:
            p._fail()
        raise
    out: list[Any] = []
    for i in range(len(requests)):
        if i not in results:
            out.append(None)
            bad.setdefault(i, "no request was built")
            continue
        try:
            res = results[i]
            if isinstance(res, PeerError):
                raise res
            out.append(convert(i, res))
        except PeerError as e:
            out.append(None)
            bad[i] = str(e)
    if bad:
        bad = dict(sorted(bad.items()))
        i, why = next(iter(bad.items()))
        name = procs[0].name
        raise PeerAnswerError(
            f"{name} failed for {len(bad)} of {len(requests)} patient(s); #{i} ({names[i]}): {why}",
            peer=name,
            failed=bad,
            partial=out,
        )
    return out


def _split(items: Sequence[int], parts: int) -> list[Sequence[int]]:
    """`items` in `parts` contiguous runs of near-equal length (empty runs dropped)."""
    n = max(1, min(parts, len(items)))
    bounds = [round(k * len(items) / n) for k in range(n + 1)]
    return [items[bounds[k] : bounds[k + 1]] for k in range(n) if bounds[k] < bounds[k + 1]]


def build_batch(
    build: Callable[[int], Mapping[str, Any]], n: int
) -> tuple[list[Mapping[str, Any] | None], dict[int, str]]:
    """Each patient's request (`build(i)`), None where the input was refused (`PeerInputError`
    and other `PeerError`s name the patient, field and value): one bad record must not take
    the cohort's decisions with it."""
    reqs: list[Mapping[str, Any] | None] = []
    failed: dict[int, str] = {}
    for i in range(n):
        try:
            reqs.append(build(i))
        except PeerError as e:
            reqs.append(None)
            failed[i] = str(e)
    return reqs, failed
