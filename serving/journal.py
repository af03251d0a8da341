"""The journal: a durable SQLite (WAL) record of every cycle, command, delivery and event.

It is what lets a killed loop restart safely:

* **write-ahead intent** — a command row is committed as ``pending`` *before* the pump is
  called and marked ``acked``/``failed`` (or ``unknown`` when the pump did not answer) after;
  a restarted loop finds the pending rows and asks the pump about each key
  (`reconcile`), never re-sending one blindly;
* **insulin history** — the pump's delivery history is copied in by sequence number
  (`record_deliveries`, idempotent), so `insulin_history` rebuilds insulin on board after a
  restart;
* **cycles and events** — readings, prediction, proposal, verdict, fallback and mode of each
  cycle, and every veto, fault, alert and mode change, for audit (`glucast journal show`).

WAL mode, ``synchronous=FULL`` by default: a commit survives a killed process and a power
cut. ``sync="normal"`` keeps the first guarantee (SQLite's WAL never loses a committed
transaction to a process crash) and may lose the last commits to a power cut, at a fraction
of the fsync cost; even then the loop stays safe, because a re-run cycle derives the same
idempotency keys and the pump answers a repeated key with its first acknowledgement.

When the journal cannot be written (read-only file system, full disk) every write raises
`JournalUnavailable`. The policy, carried out by the supervisor and the loop: keep cycling;
send only commands that reduce insulin (cancel temp / zero temp) — no bolus, nothing above
scheduled basal — because an intent that cannot be recorded could not be reconciled after a
crash; warn on stderr each cycle; and record a ``journal_recovered`` event once writes work
again. The pump's own history is the source of truth for deliveries, so nothing is lost: the
next successful sync copies what happened meanwhile.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import DatasetMeta, set_meta
from serving.hal.pump import Ack, Command, Delivery, Pump, resolve_command
from serving.types import JournalError, Proposal, Reading, Verdict

SCHEMA_VERSION = "1"
COMMAND_STATUSES = ("pending", "acked", "failed", "unknown")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cycles(
    id INTEGER PRIMARY KEY,
    patient TEXT NOT NULL,
    time TEXT NOT NULL,
    wall_time TEXT NOT NULL,
    glucose REAL,
    iob_u REAL,
    carbs_g REAL,
    mode TEXT NOT NULL,
    fallback TEXT NOT NULL,
    predictor TEXT NOT NULL DEFAULT '',
    readings TEXT NOT NULL,
    prediction TEXT,
    proposal TEXT,
    verdict TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}',
    UNIQUE(patient, time)
);
CREATE TABLE IF NOT EXISTS commands(
    key TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    cycle_time TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount REAL NOT NULL,
    duration_min INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'acked', 'failed', 'unknown')),
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS acks(
    key TEXT PRIMARY KEY REFERENCES commands(key),
    accepted INTEGER NOT NULL,
    amount REAL NOT NULL,
    time TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS deliveries(
    patient TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time TEXT NOT NULL,
    t_ns INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('basal', 'bolus')),
    units REAL NOT NULL,
    minutes REAL NOT NULL,
    key TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (patient, seq)
);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY,
    patient TEXT NOT NULL DEFAULT '',
    time TEXT,
    wall_time TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_status ON commands(status);
CREATE INDEX IF NOT EXISTS deliveries_time ON deliveries(patient, time);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind);
"""

EVENT_KINDS = (
    "veto",
    "fault",
    "alert",
    "mode",
    "warning",
    "reconcile",
    "start",
    "stop",
    "predictor",
)


# --------------------------------------------------------------------------- errors


class JournalUnavailable(JournalError):
    """The journal cannot be written (read-only, disk full, I/O error, locked)."""


class JournalCorrupt(JournalError):
    """The file is not a glucast journal, or its contents contradict each other."""


class DuplicateCommand(JournalError):
    """An intent for a key that the journal already holds: the caller must not resend."""


_UNAVAILABLE_MARKERS = (
    "readonly",
    "read-only",
    "disk is full",
    "disk i/o",
    "unable to open",
    "locked",
)


def _translate(e: sqlite3.Error, what: str) -> JournalError:
    msg = str(e).lower()
    if isinstance(e, sqlite3.OperationalError) and any(m in msg for m in _UNAVAILABLE_MARKERS):
        return JournalUnavailable(f"journal {what}: {e}")
    if isinstance(e, sqlite3.DatabaseError) and ("not a database" in msg or "malformed" in msg):
        return JournalCorrupt(f"journal {what}: {e}")
    return JournalError(f"journal {what}: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------- helpers


def iso(t: pd.Timestamp | None) -> str | None:
    """One fixed-width UTC format, so times sort as text."""
    if t is None:
        return None
    t = pd.Timestamp(t)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def _utc(t: pd.Timestamp) -> pd.Timestamp:
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _ts(s: str | None) -> pd.Timestamp | None:
    return None if s is None else pd.Timestamp(s)


def _now_wall() -> str:
    return iso(pd.Timestamp.now(tz="UTC")) or ""


def _clean(o: Any) -> Any:
    """JSON-safe: NaN/inf → None, numpy → python, timestamps → ISO, dataclasses → dicts."""
    if is_dataclass(o) and not isinstance(o, type):
        return _clean(asdict(o))
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, pd.Timestamp):
        return iso(o)
    if isinstance(o, str | int | bool) or o is None:
        return o
    return str(o)


def _dumps(o: Any) -> str:
    return json.dumps(_clean(o), allow_nan=False, separators=(",", ":"))


def readings_json(readings: Iterable[Reading]) -> list[dict[str, Any]]:
    return [
        {
            "time": iso(r.time),
            "glucose": r.glucose_mgdl,
            "status": str(r.status),
            "trend": r.trend_mgdl_per_min,
        }
        for r in readings
    ]


@dataclass(frozen=True)
class CommandRecord:
    key: str
    patient: str
    cycle_time: pd.Timestamp
    kind: str
    amount: float
    duration_min: int
    status: str
    created: str
    updated: str
    detail: str
    ack: Ack | None


# --------------------------------------------------------------------------- journal


class Journal:
    """One SQLite file in WAL mode. Not shared between threads; one writer process at a time."""

    def __init__(
        self,
        path: str | Path,
        *,
        readonly: bool = False,
        timeout_s: float = 5.0,
        sync: str = "full",
    ) -> None:
        if sync not in ("full", "normal"):
            raise JournalError(f"journal sync must be 'full' or 'normal', got {sync!r}")
        self.path = Path(path)
        self.readonly = readonly
        try:
            if readonly:
                uri = f"file:{self.path.resolve()}?mode=ro"
                self.con = sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None)
            else:
                self.con = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
            self.con.execute("PRAGMA foreign_keys=ON")
            if not readonly:
                mode = self.con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise JournalError(f"journal {self.path}: could not enable WAL (got {mode})")
                self.con.execute(f"PRAGMA synchronous={sync.upper()}")
                self.con.executescript(_SCHEMA)
                self._init_meta()
            else:
                self.con.execute("SELECT count(*) FROM cycles").fetchone()
        except sqlite3.Error as e:
            raise _translate(e, f"open {self.path}") from e

    def _init_meta(self) -> None:
        v = self.meta("schema_version")
        if v is None:
            self.set_meta("schema_version", SCHEMA_VERSION)
        elif v != SCHEMA_VERSION:
            raise JournalCorrupt(
                f"journal {self.path} has schema {v}, this glucast writes {SCHEMA_VERSION}"
            )

    # ---- plumbing
    def close(self) -> None:
        try:
            self.con.close()
        except sqlite3.Error:
            pass

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def journal_mode(self) -> str:
        return str(self.con.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    def _write(self, what: str, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run statements in one transaction; any failure rolls back and raises typed.

        Returns each statement's row count."""
        if self.readonly:
            raise JournalUnavailable(f"journal {what}: opened read-only")
        try:
            self.con.execute("BEGIN IMMEDIATE")
            try:
                counts = [self.con.execute(sql, params).rowcount for sql, params in statements]
                self.con.execute("COMMIT")
                return counts
            except BaseException:
                if self.con.in_transaction:
                    self.con.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as e:
            if "commands.key" in str(e):
                raise DuplicateCommand(f"journal {what}: {e}") from e
            raise _translate(e, what) from e
        except sqlite3.Error as e:
            raise _translate(e, what) from e

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            cur = self.con.execute(sql, params)
            cols = [c[0] for c in cur.description or ()]
            return [dict(zip(cols, row)) for row in cur.fetchall()]  # type: ignore[misc]
        except sqlite3.Error as e:
            raise _translate(e, "read") from e

    # ---- meta
    def meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta_many(self, values: dict[str, str]) -> None:
        """Several meta keys in one transaction (all or none)."""
        self._write(
            "set meta",
            [
                ("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, v))
                for k, v in values.items()
            ],
        )

    def set_meta(self, key: str, value: str) -> None:
        self._write(
            "set meta", [("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))]
        )

    # ---- cycles
    def record_cycle(
        self,
        *,
        patient: str,
        time: pd.Timestamp,
        readings: Sequence[Reading],
        glucose: float,
        iob_u: float,
        verdict: Verdict,
        mode: str,
        proposal: Proposal | None = None,
        prediction: np.ndarray | None = None,
        carbs_g: float = 0.0,
        predictor: str = "",
        detail: dict[str, Any] | None = None,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> None:
        """One cycle, with its events, in one transaction (a cycle is recorded whole or not)."""
        prop = None
        if proposal is not None:
            prop = {k: v for k, v in asdict(proposal).items() if k != "predicted_mgdl"}
        stmts: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT INTO cycles(patient, time, wall_time, glucose, iob_u, carbs_g, mode, fallback, "
                "predictor, readings, prediction, proposal, verdict, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    patient,
                    iso(time),
                    _now_wall(),
                    _clean(glucose),
                    _clean(iob_u),
                    _clean(carbs_g),
                    mode,
                    verdict.fallback,
                    predictor,
                    _dumps(readings_json(readings)),
                    None if prediction is None else _dumps(np.asarray(prediction)),
                    None if prop is None else _dumps(prop),
                    _dumps(verdict),
                    _dumps(detail or {}),
                ),
            )
        ]
        stmts += [self._event_stmt(k, d, patient, time) for k, d in events]
        self._write("record cycle", stmts)

    def carbs_history(self, patient: str, since: pd.Timestamp) -> pd.DataFrame:
        """Announced carbs per cycle (time, carbs_g) from `since` on: what COB is made of."""
        df = pd.DataFrame(
            self._read(
                "SELECT time, carbs_g FROM cycles WHERE patient = ? AND time >= ? AND carbs_g > 0 ORDER BY time",
                (patient, iso(since)),
            ),
            columns=["time", "carbs_g"],
        )
        df["time"] = pd.to_datetime(df["time"], utc=True, format="ISO8601")
        return df

    def has_cycle(self, patient: str, time: pd.Timestamp) -> bool:
        return bool(
            self._read("SELECT 1 FROM cycles WHERE patient = ? AND time = ?", (patient, iso(time)))
        )

    def last_cycle_time(self, patient: str) -> pd.Timestamp | None:
        rows = self._read("SELECT max(time) AS t FROM cycles WHERE patient = ?", (patient,))
        return _ts(rows[0]["t"]) if rows and rows[0]["t"] else None

    def cycles(self, patient: str | None = None, last: int | None = None) -> pd.DataFrame:
        """Cycles as a frame (JSON columns left as text), oldest first."""
        where, params = ("WHERE patient = ?", (patient,)) if patient else ("", ())
        sql = f"SELECT * FROM cycles {where} ORDER BY time, patient"
        if last:
            sql = f"SELECT * FROM (SELECT * FROM cycles {where} ORDER BY time DESC, patient DESC LIMIT {int(last)}) ORDER BY time, patient"
        df = pd.DataFrame(self._read(sql, params))
        if len(df):
            df["time"] = pd.to_datetime(df["time"], utc=True, format="ISO8601")
        return df

    # ---- commands (write-ahead intent)
    def begin_command(self, cmd: Command, *, patient: str, cycle_time: pd.Timestamp) -> None:
        """Record the intent (pending) before the pump is called. A known key raises."""
        now = _now_wall()
        self._write(
            "begin command",
            [
                (
                    "INSERT INTO commands(key, patient, cycle_time, kind, amount, duration_min, status, created, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                    (
                        cmd.key,
                        patient,
                        iso(cycle_time),
                        str(cmd.kind),
                        float(cmd.amount),
                        int(cmd.duration_min),
                        now,
                        now,
                    ),
                )
            ],
        )

    def finish_command(
        self, key: str, status: str, ack: Ack | None = None, detail: str = ""
    ) -> None:
        """Mark a command acked/failed/unknown and keep the pump's acknowledgement."""
        if status not in COMMAND_STATUSES or status == "pending":
            raise JournalError(f"cannot finish command {key} with status {status!r}")
        stmts: list[tuple[str, Sequence[Any]]] = [
            (
                "UPDATE commands SET status = ?, updated = ?, detail = ? WHERE key = ?",
                (status, _now_wall(), detail, key),
            )
        ]
        if ack is not None:
            stmts.append(
                (
                    "INSERT OR REPLACE INTO acks(key, accepted, amount, time, detail) VALUES (?, ?, ?, ?, ?)",
                    (key, int(ack.accepted), float(ack.amount), iso(ack.time), ack.detail),
                )
            )
        if self.command(key) is None:
            raise JournalError(f"cannot finish command {key}: the journal has no intent for it")
        self._write("finish command", stmts)

    def command(self, key: str) -> CommandRecord | None:
        rows = self._commands("WHERE c.key = ?", (key,))
        return rows[0] if rows else None

    def commands(
        self, *, patient: str | None = None, status: Sequence[str] | None = None
    ) -> list[CommandRecord]:
        clauses, params = [], []
        if patient is not None:
            clauses.append("c.patient = ?")
            params.append(patient)
        if status:
            clauses.append(f"c.status IN ({','.join('?' * len(status))})")
            params.extend(status)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return self._commands(where, params)

    def unresolved(self, patient: str | None = None) -> list[CommandRecord]:
        """Commands whose outcome the journal does not know (pending or unknown)."""
        return self.commands(patient=patient, status=("pending", "unknown"))

    def _commands(self, where: str, params: Sequence[Any]) -> list[CommandRecord]:
        rows = self._read(
            "SELECT c.*, a.accepted AS a_accepted, a.amount AS a_amount, a.time AS a_time, a.detail AS a_detail "
            f"FROM commands c LEFT JOIN acks a ON a.key = c.key {where} ORDER BY c.cycle_time, c.created, c.key",
            params,
        )
        out = []
        for r in rows:
            ack = None
            if r["a_time"] is not None:
                from serving.hal.pump import CommandKind

                ack = Ack(r["key"], CommandKind(r["kind"]), bool(r["a_accepted"]), float(r["a_amount"]),
                          pd.Timestamp(r["a_time"]), r["a_detail"])  # fmt: skip
            out.append(
                CommandRecord(
                    key=r["key"],
                    patient=r["patient"],
                    cycle_time=pd.Timestamp(r["cycle_time"]),
                    kind=r["kind"],
                    amount=float(r["amount"]),
                    duration_min=int(r["duration_min"]),
                    status=r["status"],
                    created=r["created"],
                    updated=r["updated"],
                    detail=r["detail"],
                    ack=ack,
                )
            )
        return out

    def reconcile(self, pump: Pump, patient: str) -> list[CommandRecord]:
        """Resolve this patient's pending/unknown commands by asking the pump about each key.

        Never resends: a key the pump never received becomes ``failed``; one it cannot be
        asked about stays ``unknown`` (and keeps blocking boluses). Each resolution is an
        event. Returns the records after reconciliation.
        """
        for rec in self.unresolved(patient):
            status, ack, detail = resolve_command(pump, rec.key)
            if status == "unknown" and rec.status == "unknown":
                continue
            self._write(
                "reconcile",
                [
                    ("UPDATE commands SET status = ?, updated = ?, detail = ? WHERE key = ?",
                     (status, _now_wall(), f"reconciled: {detail}", rec.key)),
                    *(
                        [("INSERT OR REPLACE INTO acks(key, accepted, amount, time, detail) VALUES (?, ?, ?, ?, ?)",
                          (rec.key, int(ack.accepted), float(ack.amount), iso(ack.time), ack.detail))]
                        if ack is not None else []
                    ),
                    self._event_stmt("reconcile", {"key": rec.key, "was": rec.status, "now": status,
                                                   "detail": detail}, patient, rec.cycle_time),
                ],
            )  # fmt: skip
        return self.commands(patient=patient)

    def unconfirmed_bolus_u(self, patient: str) -> float:
        """Bolus units sent whose outcome is unknown: counted as on board, blocking new ones."""
        rows = self._read(
            "SELECT coalesce(sum(amount), 0) AS u FROM commands WHERE patient = ? AND kind = 'bolus' "
            "AND status IN ('pending', 'unknown')",
            (patient,),
        )
        return float(rows[0]["u"])

    # ---- deliveries
    def record_deliveries(
        self, patient: str, deliveries: Iterable[Delivery], *, synced_at: pd.Timestamp | None = None
    ) -> int:
        """Copy pump deliveries in; a (patient, seq) already present is left as is.

        With `synced_at` the sync time is recorded too, so the write happens (and a journal
        that cannot be written is noticed) even when the pump had nothing new.
        """
        stmts: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT OR IGNORE INTO deliveries(patient, seq, time, t_ns, kind, units, minutes, key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (patient, int(d.seq), iso(d.time), int(_utc(d.time).value), d.kind, float(d.units),
                 float(d.minutes), d.key),
            )
            for d in deliveries
        ]  # fmt: skip
        n = len(stmts)
        if synced_at is not None:
            stmts.append(
                (
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    (f"synced:{patient}", iso(synced_at)),
                )
            )
        if stmts:
            self._write("record deliveries", stmts)
        return n

    def last_delivery_seq(self, patient: str) -> int:
        rows = self._read(
            "SELECT coalesce(max(seq), 0) AS s FROM deliveries WHERE patient = ?", (patient,)
        )
        return int(rows[0]["s"])

    def insulin_record(self, patient: str, since: pd.Timestamp | None = None) -> InsulinRecord:
        """Delivered insulin as arrays (the loop's per-cycle view of `insulin_history`)."""
        sql = "SELECT t_ns, minutes, units, kind = 'bolus' FROM deliveries WHERE patient = ?"
        params: list[Any] = [patient]
        if since is not None:
            sql += " AND t_ns >= ?"
            params.append(int(_utc(since).value))
        try:
            rows = self.con.execute(sql + " ORDER BY seq", params).fetchall()
        except sqlite3.Error as e:
            raise _translate(e, "read") from e
        a = np.array(rows, dtype=float).reshape(-1, 4)
        return InsulinRecord(a[:, 0].astype(np.int64), a[:, 1], a[:, 2], a[:, 3] > 0)

    def insulin_history(self, patient: str, since: pd.Timestamp | None = None) -> pd.DataFrame:
        """Delivered insulin (time, kind, units, minutes, key), oldest first: what IOB is made of."""
        sql = "SELECT time, kind, units, minutes, key, seq FROM deliveries WHERE patient = ?"
        params: list[Any] = [patient]
        if since is not None:
            sql += " AND time >= ?"
            params.append(iso(since))
        df = pd.DataFrame(
            self._read(sql + " ORDER BY seq", params),
            columns=["time", "kind", "units", "minutes", "key", "seq"],
        )
        df["time"] = pd.to_datetime(df["time"], utc=True, format="ISO8601")
        return df

    # ---- events
    def _event_stmt(
        self, kind: str, detail: dict[str, Any], patient: str | None, time: pd.Timestamp | None
    ) -> tuple[str, Sequence[Any]]:
        return (
            "INSERT INTO events(patient, time, wall_time, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (patient or "", iso(time), _now_wall(), kind, _dumps(detail)),
        )

    def event(
        self,
        kind: str,
        detail: dict[str, Any],
        *,
        patient: str | None = None,
        time: pd.Timestamp | None = None,
    ) -> None:
        self._write(f"event {kind}", [self._event_stmt(kind, detail, patient, time)])

    def event_many(
        self,
        events: Sequence[tuple[str, dict[str, Any]]],
        *,
        patient: str | None = None,
        time: pd.Timestamp | None = None,
    ) -> None:
        if events:
            self._write("events", [self._event_stmt(k, d, patient, time) for k, d in events])

    def events(self, kind: str | None = None, last: int | None = None) -> pd.DataFrame:
        where, params = ("WHERE kind = ?", (kind,)) if kind else ("", ())
        sql = f"SELECT * FROM events {where} ORDER BY id"
        if last:
            sql = f"SELECT * FROM (SELECT * FROM events {where} ORDER BY id DESC LIMIT {int(last)}) ORDER BY id"
        return pd.DataFrame(
            self._read(sql, params),
            columns=["id", "patient", "time", "wall_time", "kind", "detail"],
        )

    # ---- integrity
    def check(self) -> list[str]:
        """Contradictions a correct loop never leaves behind (empty list = consistent)."""
        problems: list[str] = []
        if self._read("PRAGMA integrity_check")[0].get("integrity_check") != "ok":
            problems.append("sqlite integrity_check failed")
        # a bolus may be booked over several intervals (a slow pump), never beyond its ack
        for r in self._read(
            "SELECT d.key, sum(d.units) AS u, max(a.amount) AS acked FROM deliveries d "
            "LEFT JOIN acks a ON a.key = d.key WHERE d.kind = 'bolus' GROUP BY d.patient, d.key "
            "HAVING a.amount IS NOT NULL AND sum(d.units) > max(a.amount) + 1e-9"
        ):
            problems.append(
                f"bolus {r['key']}: {r['u']:.2f} U delivered for {r['acked']:.2f} U acknowledged"
            )
        for r in self._read(
            "SELECT d.patient, d.key FROM deliveries d LEFT JOIN commands c ON c.key = d.key "
            "WHERE d.kind = 'bolus' AND (c.key IS NULL OR c.status != 'acked')"
        ):
            problems.append(
                f"bolus {r['key']} delivered but the journal has no acked command for it"
            )
        for r in self._read(
            "SELECT key FROM commands WHERE status = 'acked' AND key NOT IN (SELECT key FROM acks)"
        ):
            problems.append(f"command {r['key']} acked without an acknowledgement")
        for r in self._read(
            "SELECT patient, count(*) AS n, min(seq) AS lo, max(seq) AS hi FROM deliveries GROUP BY patient"
        ):
            if r["hi"] - r["lo"] + 1 != r["n"]:
                problems.append(
                    f"{r['patient']}: delivery sequence has gaps ({r['n']} rows for {r['lo']}..{r['hi']})"
                )
        return problems

    def summary(self) -> dict[str, Any]:
        """Counts and totals for `glucast journal show`."""
        one = self._read(
            "SELECT (SELECT count(*) FROM cycles) AS cycles, (SELECT min(time) FROM cycles) AS first, "
            "(SELECT max(time) FROM cycles) AS last, (SELECT count(*) FROM commands) AS commands, "
            "(SELECT count(*) FROM events WHERE kind = 'veto') AS vetoes, "
            "(SELECT count(*) FROM events) AS events, "
            "(SELECT coalesce(sum(units), 0) FROM deliveries WHERE kind = 'basal') AS basal_u, "
            "(SELECT coalesce(sum(units), 0) FROM deliveries WHERE kind = 'bolus') AS bolus_u"
        )[0]
        by_status = {
            r["status"]: r["n"]
            for r in self._read("SELECT status, count(*) AS n FROM commands GROUP BY status")
        }
        fallbacks = {
            (r["fallback"] or "none"): r["n"]
            for r in self._read("SELECT fallback, count(*) AS n FROM cycles GROUP BY fallback")
        }
        patients = [
            r["patient"] for r in self._read("SELECT DISTINCT patient FROM cycles ORDER BY patient")
        ]
        return {
            "path": str(self.path),
            "journal_mode": self.journal_mode,
            "patients": patients,
            **one,
            "commands_by_status": by_status,
            "fallbacks": fallbacks,
            "problems": self.check(),
        }

    # ---- export
    def to_frame(self, slot_minutes: int = 5) -> pd.DataFrame:
        """The journal as a canonical glucose frame (plus iob_u, mode, fallback columns).

        One row per patient per cycle: glucose is the cycle's trusted reading, basal_u and
        bolus_u the insulin the pump delivered in the slot, carbs_g the announced carbs.
        """
        cyc = self.cycles()
        cols = [
            "subject_id",
            "time",
            "glucose",
            "basal_u",
            "bolus_u",
            "carbs_g",
            "iob_u",
            "mode",
            "fallback",
        ]
        if not len(cyc):
            return pd.DataFrame(columns=cols)
        frames = []
        cyc["time"] = cyc["time"].dt.floor(f"{slot_minutes}min")  # the canonical grid
        cyc = cyc.drop_duplicates(["patient", "time"], keep="last")
        for patient, g in cyc.groupby("patient", sort=True):
            g = g.sort_values("time")
            hist = self.insulin_history(str(patient))
            basal = bin_insulin(hist, g["time"], "basal", slot_minutes)
            bolus = bin_insulin(hist, g["time"], "bolus", slot_minutes)
            frames.append(
                pd.DataFrame(
                    {
                        "subject_id": str(patient),
                        "time": g["time"].dt.as_unit("ns").to_numpy(),
                        "glucose": g["glucose"].astype(float).to_numpy(),
                        "basal_u": basal,
                        "bolus_u": bolus,
                        "carbs_g": g["carbs_g"].astype(float).fillna(0.0).to_numpy(),
                        "iob_u": g["iob_u"].astype(float).to_numpy(),
                        "mode": g["mode"].to_numpy(),
                        "fallback": g["fallback"].to_numpy(),
                    }
                )
            )
        out = pd.concat(frames, ignore_index=True)
        out["time"] = pd.to_datetime(out["time"], utc=True)
        out["subject_id"] = out["subject_id"].astype("string")
        set_meta(out, DatasetMeta(source="glucast-journal", device=self.meta("backend") or ""))
        return out


@dataclass(frozen=True)
class InsulinRecord:
    """Deliveries as arrays: start (UTC ns), length (min, 0 for a bolus), units, is-bolus."""

    t_ns: np.ndarray
    minutes: np.ndarray
    units: np.ndarray
    bolus: np.ndarray

    def extend(self, deliveries: Sequence[Delivery]) -> InsulinRecord:
        """With deliveries the journal does not hold yet (it could not be written)."""
        if not deliveries:
            return self
        return InsulinRecord(
            np.r_[self.t_ns, [_utc(d.time).value for d in deliveries]].astype(np.int64),
            np.r_[self.minutes, [d.minutes for d in deliveries]],
            np.r_[self.units, [d.units for d in deliveries]],
            np.r_[self.bolus, [d.kind == "bolus" for d in deliveries]].astype(bool),
        )

    def per_slot(
        self, slot_ns: np.ndarray, slot_minutes: float = 5, kind: str | None = None
    ) -> np.ndarray:
        """Units delivered in each slot [t, t + slot) (slot starts as UTC ns, ascending)."""
        sel = np.ones(len(self.units), bool) if kind is None else (self.bolus == (kind == "bolus"))
        return bin_doses(self.t_ns[sel], self.minutes[sel], self.units[sel], slot_ns, slot_minutes)


def bin_doses(
    t_ns: np.ndarray,
    minutes: np.ndarray,
    units: np.ndarray,
    slot_ns: np.ndarray,
    slot_minutes: float = 5,
) -> np.ndarray:
    """Units in each slot [t, t + slot): point doses by their time, intervals in proportion."""
    s_ns = np.asarray(slot_ns, dtype=np.int64)
    out = np.zeros(len(s_ns), dtype=float)
    if not len(units) or not len(s_ns):
        return out
    t0 = np.asarray(t_ns, dtype=np.int64)
    dur = (np.asarray(minutes, dtype=float) * 60e9).astype(np.int64)
    units = np.asarray(units, dtype=float)
    width = np.int64(round(slot_minutes * 60e9))
    point = dur <= 0
    if point.any():
        idx = np.searchsorted(s_ns, t0[point], side="right") - 1
        ok = (idx >= 0) & (t0[point] < s_ns[np.clip(idx, 0, None)] + width)
        np.add.at(out, idx[ok], units[point][ok])
    if (~point).any():  # overlap of every interval with every slot, [slots, deliveries]
        a, b, u = t0[~point], t0[~point] + dur[~point], units[~point]
        ov = np.minimum(b[None, :], s_ns[:, None] + width) - np.maximum(a[None, :], s_ns[:, None])
        out += (np.clip(ov, 0, None) / (b - a)[None, :]) @ u
    return out


def bin_insulin(
    history: pd.DataFrame,
    slot_starts: pd.Series | pd.DatetimeIndex,
    kind: str | None,
    slot_minutes: int = 5,
) -> np.ndarray:
    """Units delivered in each slot [t, t + slot): boluses by their time, basal spread over its interval."""
    starts = pd.DatetimeIndex(slot_starts)
    if not len(history) or not len(starts):
        return np.zeros(len(starts), dtype=float)
    h = history if kind is None else history[history["kind"] == kind]
    return bin_doses(
        pd.DatetimeIndex(h["time"]).as_unit("ns").asi8,
        h["minutes"].to_numpy(dtype=float),
        h["units"].to_numpy(dtype=float),
        starts.as_unit("ns").asi8,
        slot_minutes,
    )
