"""Python client for the ai-cmd-executor spool (stdlib only, Python 3.9+).

Agents submit shell commands by dropping job files into a spool directory; a
worker (``ai-cmd-executor run``) runs them and writes one result file per job.
This module only performs plain file operations on the spool -- it never runs
the CLI.  The on-disk contract is described in ``docs/PROTOCOL.md``.

Typical use::

    import ai_cmd_executor as ace

    job_id = ace.create_bash_command("make -C /src test", timeout_secs=600)
    result = ace.wait(job_id, timeout=900)
    print(result["status"], result["exit_code"])
    print(ace.get_latest_log(job_id))

The module-level functions are thin wrappers around :class:`Spool`; pass
``spool=`` (a path or a :class:`Spool`) to use a spool other than the default
one (see :func:`default_spool_path`).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import secrets
import threading
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

__all__ = [
    "Spool",
    "create_bash_command",
    "create_bash_script",
    "check_results",
    "get_latest_log",
    "get_state",
    "wait",
    "default_spool_path",
    "is_valid_id",
    "validate_id",
    "generate_id",
    "ENV_SPOOL",
    "SYSTEM_SPOOL",
    "SUBDIRS",
    "STATUSES",
    "RESULT_KEYS",
    "LIMIT_KEYS",
    "read_log",
    "cancel",
    "UnknownJob",
    "AlreadyFinished",
]

#: Environment variable that overrides the default spool location.
ENV_SPOOL = "AI_CMD_EXECUTOR_SPOOL"

#: Environment variable naming the worker's configuration file.
ENV_CONFIG = "AI_CMD_EXECUTOR_CONFIG"

#: The configuration file read when ``AI_CMD_EXECUTOR_CONFIG`` is not set.
DEFAULT_CONFIG = "/etc/ai-cmd-executor/config.toml"

#: The lock every live worker holds (shared) on the spool it serves.
SERVING_LOCK = ".serving.lock"
#: Default spool when running as root (uid 0).
SYSTEM_SPOOL = "/var/lib/ai-cmd-executor"
#: Directory name used below ``$XDG_STATE_HOME`` for non-root users.
APP_NAME = "ai-cmd-executor"
#: Sub-directories of a spool root.
SUBDIRS = ("tmp", "pending", "cancel", "running", "completed", "logs", "archive")
#: Suffixes of job files in ``pending/`` and ``running/``.
JOB_SUFFIXES = (".json", ".sh")
#: Possible values of a result's ``"status"``.  ``"expired"``: the job never
#: ran; it waited in ``pending/`` longer than the worker's
#: ``stale_pending_after`` while no worker served the spool, and maintenance
#: (``cleanup``, ``health --fix``) archived it (``"error"`` says so; submit it
#: again to run it).  The CLI's ``wait`` exits 75 for it (EX_TEMPFAIL).
STATUSES = frozenset({
    "succeeded", "failed", "timed_out", "interrupted", "rejected", "expired", "cancelled",
})
#: The exact key set of a result (as returned by :func:`check_results`,
#: :func:`wait` and :meth:`Spool.read_result`).  ``"submitted_by"`` is
#: ``{"uid": int, "name": str or None}`` (the owner of the job file), or
#: None when unknown; a result file written by a worker older than that key
#: lacks it and is read with ``"submitted_by": None``.  ``"cpu_user_ms"``,
#: ``"cpu_system_ms"`` (CPU time in milliseconds) and ``"max_rss_bytes"``
#: (the peak resident memory of one process, in bytes) say what the job's
#: process and the commands it waited for used; they are None for a job that
#: did not run, one whose end a crash hid, and in results written before
#: they existed.  Where the job had a cgroup of its own (a worker under
#: systemd with ``Delegate=yes``), the CPU times are its whole tree's, and
#: ``"memory_peak_bytes"`` is the most memory the whole job held at once
#: (with the memory controller; None otherwise).  ``"limits"`` is None for a run without resource limits,
#: else ``{"memory_max": bytes, "tasks_max": int, "cpu_max": "50%",
#: "enforced_by": {key: how}}`` with the keys of the limits it had.
#: ``"submitted_via"`` is how the job was submitted: ``"python"`` (this
#: module), ``"cli"``, ``"mcp"`` or ``"file"`` (a job file written directly,
#: and every script job); None for a job file that could not be read.
RESULT_KEYS = frozenset({
    "id", "status", "exit_code", "signal", "started_at", "finished_at",
    "duration_ms", "log", "output_truncated", "error", "attempt",
    "submitted_by", "cpu_user_ms", "cpu_system_ms", "max_rss_bytes", "memory_peak_bytes",
    "limits", "submitted_via", "cancelled_by",
})
#: Keys a result may lack (written by an older worker, or a run without
#: limits); they read as None.
_LATER_KEYS = (
    "submitted_by", "cpu_user_ms", "cpu_system_ms", "max_rss_bytes", "memory_peak_bytes", "limits",
    "submitted_via", "cancelled_by",
)
#: The keys of a job's ``"limits"``.
LIMIT_KEYS = ("memory_max", "tasks_max", "cpu_max")
#: Allowed values of a job's ``"on_interrupt"``.
ON_INTERRUPT_VALUES = ("fail", "retry")
#: Worker's default limit on a job file's size (it is configurable there).
DEFAULT_MAX_JOB_BYTES = 1024 * 1024
#: How long after its file went to ``archive/rejected/`` a job without a
#: result yet counts as being rejected (``"pending"``), not unknown.
REJECTING_SECS = 10.0
#: What :func:`read_log` reads at most by default, in bytes.
DEFAULT_READ_BYTES = 64 * 1024
#: Tolerance subtracted from the remembered submit time by :meth:`Spool.wait`.
SUBMIT_TOLERANCE_SECS = 1.0
#: First and maximum poll interval of :meth:`Spool.wait`, in seconds.
POLL_INITIAL_SECS = 0.005
POLL_MAX_SECS = 0.2

_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)

PathLike = Union[str, "os.PathLike[str]"]
SpoolArg = Union[None, PathLike, "Spool"]
Since = Union[None, int, float, _dt.datetime]

# Submit times (time.time()) of jobs submitted by this process, keyed by
# (spool path, id); used by wait()/check_results() to ignore a previous run's
# result. Bounded so that long-lived agents do not grow it without limit.
_SUBMITTED: Dict[Tuple[str, str], float] = {}
_SUBMITTED_MAX = 4096
_SUBMITTED_LOCK = threading.Lock()


def is_valid_id(cmd_id: object) -> bool:
    """Return True if *cmd_id* is a valid job id.

    A valid id is a string of 1 to 128 characters from ``[A-Za-z0-9._-]``
    that does not start with a dot.
    """
    return isinstance(cmd_id, str) and _ID_RE.fullmatch(cmd_id) is not None


def validate_id(cmd_id: object) -> str:
    """Return *cmd_id* unchanged if it is a valid id, else raise ValueError."""
    if not is_valid_id(cmd_id):
        raise ValueError(
            "invalid job id %r: need 1 to 128 characters from [A-Za-z0-9._-], "
            "not starting with '.'" % (cmd_id,)
        )
    return cmd_id  # type: ignore[return-value]


def generate_id(prefix: str = "job") -> str:
    """Return a new unique id like ``job-20261126T193309.123456Z-1a2b3c4d5e6f``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return validate_id("%s-%s-%s" % (prefix, stamp, secrets.token_hex(6)))


def _config_spool() -> Optional[str]:
    """Return the ``spool`` key of the worker's configuration file, if any.

    The file is ``$AI_CMD_EXECUTOR_CONFIG`` if set, else
    ``/etc/ai-cmd-executor/config.toml`` if it exists.  Only the ``spool``
    key is read; a file that is not valid TOML is a warning (the CLI does
    the same), and a ``spool`` that is not an absolute path a ValueError.
    """
    path = os.environ.get(ENV_CONFIG) or None
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            return None
        path = DEFAULT_CONFIG
    with open(path, "rb") as f:
        raw = f.read()
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - older Pythons
        tomllib = None
    if tomllib is not None:
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            warnings.warn(
                "%s is not valid TOML (%s); its spool is not used. "
                "`ai-cmd-executor config check` shows the mistake" % (path, e),
                stacklevel=3,
            )
            return None
        value = doc.get("spool")
    else:  # pragma: no cover
        m = re.search(r'(?m)^\s*spool\s*=\s*"([^"]*)"\s*(#.*)?$', raw.decode("utf-8", "replace"))
        value = m.group(1) if m else None
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError("%s: spool must be an absolute path, not %r" % (path, value))
    return value


def _home() -> str:
    """Return the home directory: ``$HOME`` if absolute, else the user database's."""
    home = os.environ.get("HOME")
    if home and os.path.isabs(home):
        return home
    try:
        import pwd

        home = pwd.getpwuid(os.geteuid()).pw_dir
    except (ImportError, KeyError):
        home = ""
    return home if home and os.path.isabs(home) else "/nonexistent"


def default_spool_path() -> str:
    """Return the spool to use when none is given, as every client finds it.

    In order (docs/PROTOCOL.md, "Finding the spool"):

    1. ``$AI_CMD_EXECUTOR_SPOOL`` if set and non-empty;
    2. the ``spool`` key of the worker's configuration file
       (``$AI_CMD_EXECUTOR_CONFIG``, else ``/etc/ai-cmd-executor/config.toml``
       if it exists);
    3. ``$STATE_DIRECTORY`` (its first entry, if absolute);
    4. ``/var/lib/ai-cmd-executor`` when running as root (effective uid 0);
    5. ``$XDG_STATE_HOME/ai-cmd-executor`` if that is absolute, else
       ``~/.local/state/ai-cmd-executor``, with ``~`` from ``$HOME`` if
       absolute, else from the user database.

    Never a relative path.
    """
    env = os.environ.get(ENV_SPOOL)
    if env:
        return env
    configured = _config_spool()
    if configured:
        return configured
    state_dir = (os.environ.get("STATE_DIRECTORY") or "").split(":")[0]
    if state_dir and os.path.isabs(state_dir):
        return state_dir
    geteuid = getattr(os, "geteuid", None)
    if geteuid is not None and geteuid() == 0:
        return SYSTEM_SPOOL
    state = os.environ.get("XDG_STATE_HOME")
    if not state or not os.path.isabs(state):
        state = os.path.join(_home(), ".local", "state")
    return os.path.join(state, APP_NAME)


class NotASpool(FileNotFoundError):
    """The directory is not a spool: it has no ``pending/`` (no worker set it up)."""


class UnknownJob(LookupError):
    """No job has this id: it is not pending, running or finished."""


class AlreadyFinished(Exception):
    """The job has finished: there is nothing to cancel."""


def _check_text(what: str, value: object) -> str:
    """Return *value* if it is a str that can be passed to the OS, else raise.

    Raises TypeError for non-strings and ValueError for NUL characters or
    lone surrogates (which cannot be encoded as UTF-8).
    """
    if not isinstance(value, str):
        raise TypeError("%s must be a str, not %s" % (what, type(value).__name__))
    if "\x00" in value:
        raise ValueError("%s must not contain NUL characters" % what)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("%s is not valid UTF-8: %s" % (what, exc)) from None
    return value


def _parse_rfc3339(value: object) -> Optional[float]:
    """Parse an RFC 3339 timestamp into POSIX seconds; None if it is not one."""
    if not isinstance(value, str):
        return None
    m = _RFC3339_RE.fullmatch(value)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    micro = int(((m.group(7) or "") + "000000")[:6])
    if m.group(8):
        tz = _dt.timezone.utc
    else:
        offset = _dt.timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        tz = _dt.timezone(offset if m.group(9) == "+" else -offset)
    try:
        stamp = _dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        return None
    return stamp.timestamp()


def _since_to_posix(since: Since) -> Optional[float]:
    """Convert a ``since`` argument (POSIX seconds or aware datetime) to seconds."""
    if since is None:
        return None
    if isinstance(since, _dt.datetime):
        if since.tzinfo is None or since.utcoffset() is None:
            raise ValueError("since must be a timezone-aware datetime (e.g. UTC)")
        return since.timestamp()
    if isinstance(since, bool) or not isinstance(since, (int, float)):
        raise TypeError("since must be a number of POSIX seconds or a datetime")
    return float(since)


class Spool:
    """A spool directory: submit jobs, read their results and logs, wait.

    *path* defaults to :func:`default_spool_path` (resolved when the object is
    created).  Relative paths are made absolute immediately.  Creating a
    Spool touches nothing on disk.
    """

    def __init__(self, path: Optional[PathLike] = None) -> None:
        """Create a handle on the spool at *path* (default: the default spool)."""
        if path is None:
            path = default_spool_path()
        self.path = os.path.abspath(os.fspath(path))

    def __repr__(self) -> str:
        """Return ``Spool('/path/to/spool')``."""
        return "Spool(%r)" % self.path

    def __eq__(self, other: object) -> bool:
        """Two Spool objects are equal when their paths are equal."""
        return isinstance(other, Spool) and other.path == self.path

    def __hash__(self) -> int:
        """Hash by path."""
        return hash(self.path)

    # -- layout ---------------------------------------------------------------

    def subdir(self, name: str) -> str:
        """Return the path of the spool sub-directory *name* (e.g. ``"pending"``)."""
        if name not in SUBDIRS:
            raise ValueError("unknown spool sub-directory %r" % (name,))
        return os.path.join(self.path, name)

    def check(self) -> None:
        """Raise NotASpool unless ``tmp/`` and ``pending/`` exist (and say which).

        PermissionError when they exist but this user may not use them.
        """
        for name in ("pending", "tmp"):
            path = self.subdir(name)
            try:
                os.stat(path)
            except FileNotFoundError:
                raise NotASpool(
                    errno.ENOENT,
                    "%s is not a spool (no %s/ directory): start a worker on it "
                    "(`ai-cmd-executor run --spool %s`) or give the right spool"
                    % (self.path, name, self.path),
                    path,
                ) from None
            if not os.path.isdir(path):
                raise NotASpool(errno.ENOTDIR, "%s is not a directory" % path, path)

    def served(self) -> Optional[bool]:
        """Return whether a live worker serves this spool (None when unknown).

        Every worker holds a shared lock on ``.serving.lock`` for its life.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return None
        path = os.path.join(self.path, SERVING_LOCK)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)
        return False

    def _job_paths(self, state: str, cmd_id: str):
        """Yield the possible job file paths of *cmd_id* in *state*'s directory."""
        base = self.subdir(state)
        for suffix in JOB_SUFFIXES:
            yield os.path.join(base, cmd_id + suffix)

    def result_path(self, cmd_id: str) -> str:
        """Return the path of ``completed/<id>.json`` (it may not exist)."""
        return os.path.join(self.subdir("completed"), validate_id(cmd_id) + ".json")

    # -- submitting -----------------------------------------------------------

    def submit(
        self,
        command: str,
        cmd_id: Optional[str] = None,
        *,
        timeout_secs: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        on_interrupt: Optional[str] = None,
        limits: Optional[Mapping[str, Any]] = None,
    ) -> str:
        """Queue ``bash -c <command>`` as ``pending/<id>.json``; return the id.

        *cmd_id* defaults to a generated unique id.  Optional keys are only
        written when given: *timeout_secs* (positive int; an integral float
        such as ``60.0`` is written as ``60``), *env* (str -> str),
        *cwd* (absolute path), *on_interrupt* (``"fail"`` or ``"retry"``)
        and *limits* (a mapping with any of ``"memory_max"`` (bytes, or a
        size such as ``"512M"``), ``"tasks_max"`` (int) and ``"cpu_max"``
        (a share of one CPU such as 0.5, or ``"50%"``); the worker checks the
        values and rejects the job, naming the key, if one is bad or above
        the host's ceiling).

        Raises ValueError for an invalid id or option value, TypeError for
        wrongly typed arguments, FileExistsError if ``pending/<id>.json`` or
        ``pending/<id>.sh`` already exists.  Creates ``tmp/`` and ``pending/``
        if they are missing.
        """
        job: Dict[str, Any] = {"command": _check_text("command", command),
                               "submitted_via": "python"}
        if timeout_secs is not None:
            if isinstance(timeout_secs, float) and timeout_secs.is_integer():
                timeout_secs = int(timeout_secs)  # tolerate 60.0 from older callers
            if isinstance(timeout_secs, bool) or not isinstance(timeout_secs, int):
                raise TypeError("timeout_secs must be an int")
            if timeout_secs <= 0:
                raise ValueError("timeout_secs must be positive, got %d" % timeout_secs)
            job["timeout_secs"] = timeout_secs
        if env is not None:
            if not isinstance(env, Mapping):
                raise TypeError("env must be a mapping of str to str")
            clean: Dict[str, str] = {}
            for key, value in env.items():
                _check_text("env name", key)
                if not key or "=" in key:
                    raise ValueError("invalid env name %r" % (key,))
                clean[key] = _check_text("env[%r]" % (key,), value)
            job["env"] = clean
        if cwd is not None:
            cwd = os.fspath(cwd)
            _check_text("cwd", cwd)
            if not os.path.isabs(cwd):
                raise ValueError("cwd must be an absolute path, got %r" % (cwd,))
            job["cwd"] = cwd
        if on_interrupt is not None:
            if on_interrupt not in ON_INTERRUPT_VALUES:
                raise ValueError(
                    "on_interrupt must be 'fail' or 'retry', got %r" % (on_interrupt,)
                )
            job["on_interrupt"] = on_interrupt
        if limits is not None:
            if not isinstance(limits, Mapping):
                raise TypeError("limits must be a mapping such as {'memory_max': '512M'}")
            unknown = sorted(set(limits) - set(LIMIT_KEYS))
            if unknown:
                raise ValueError(
                    "unknown limits %s; the keys are %s" % (unknown, ", ".join(LIMIT_KEYS))
                )
            job["limits"] = dict(limits)
        data = (json.dumps(job, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
        return self._publish(cmd_id, ".json", data)

    def submit_script(self, script: Union[str, bytes], cmd_id: Optional[str] = None) -> str:
        """Queue a whole bash script as ``pending/<id>.sh``; return the id.

        *script* (str, or UTF-8 bytes) must not be empty.  A script job has
        no options: it gets the worker's default timeout, environment and
        working directory.  Raises like :meth:`submit`.
        """
        if isinstance(script, str):
            data = _check_text("script", script).encode("utf-8")
        elif isinstance(script, (bytes, bytearray)):
            data = bytes(script)
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError("script is not valid UTF-8: %s" % exc) from None
        else:
            raise TypeError("script must be str or bytes")
        if not data:
            raise ValueError("script must not be empty")
        return self._publish(cmd_id, ".sh", data)

    def _check_not_queued(self, cmd_id: str) -> None:
        """Raise FileExistsError if ``pending/<id>.json`` or ``.sh`` exists."""
        for path in self._job_paths("pending", cmd_id):
            if os.path.lexists(path):
                raise FileExistsError(
                    errno.EEXIST, "job %r is already queued" % cmd_id, path
                )

    def cancel(self, cmd_id: str) -> None:
        """Ask the worker to cancel *cmd_id*: withdrawn if pending, stopped if running.

        A running job gets SIGTERM, then SIGKILL after the worker's
        ``kill_grace``, with everything it started; its result then has
        status ``"cancelled"`` and ``"cancelled_by"``.  Writes the request
        ``cancel/<id>`` (through ``tmp/`` and a rename); returns once it is
        written (:meth:`wait` gives the result).  Only the job's submitter
        or root may cancel it: PermissionError for anyone else (the worker
        refuses them too).  Raises UnknownJob for an unknown id and
        AlreadyFinished for a finished job.
        """
        validate_id(cmd_id)
        found = None
        for state in ("pending", "running"):
            for path in self._job_paths(state, cmd_id):
                try:
                    found = os.lstat(path)
                    break
                except FileNotFoundError:
                    continue
            if found is not None:
                break
        if found is None:
            if self.state(cmd_id) is None:
                raise UnknownJob("no job %r in %s" % (cmd_id, self.path))
            raise AlreadyFinished("job %r has already finished; there is nothing to cancel" % cmd_id)
        me = os.geteuid()
        if me != 0 and found.st_uid != me:
            raise PermissionError(
                "job %r was submitted by uid %d; only its submitter or root may cancel it"
                % (cmd_id, found.st_uid))
        self.check()
        tmp_path = os.path.join(
            self.subdir("tmp"), ".cancel-%s.%d.%s" % (cmd_id, os.getpid(), secrets.token_hex(8)))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        os.close(os.open(tmp_path, flags, 0o640))
        target = os.path.join(self.subdir("cancel"), cmd_id)
        try:
            # Renamed in, as the worker watches for; a request already there
            # stands (another user's cannot be replaced in the sticky
            # directory).
            if not os.path.lexists(target):
                os.rename(tmp_path, target)
        except PermissionError:
            pass
        finally:
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass

    def _publish(self, cmd_id: Optional[str], suffix: str, data: bytes) -> str:
        """Write *data* to ``tmp/``, fsync it and rename it to ``pending/<id><suffix>``.

        The existence check and the rename are two steps: two submitters
        racing on the same id may both pass the check and the later rename
        then replaces the earlier file.  Use unique ids (the default) when
        several processes submit concurrently.
        """
        cmd_id = generate_id() if cmd_id is None else validate_id(cmd_id)
        submitted_at = time.time()
        tmp_dir, pending_dir = self.subdir("tmp"), self.subdir("pending")
        # Clients never create spool directories: a spool without them is
        # not one a worker serves (a mistyped path, a missing install).
        self.check()
        self._check_not_queued(cmd_id)
        tmp_path = os.path.join(
            tmp_dir, "%s%s.%d.%s.tmp" % (cmd_id, suffix, os.getpid(), secrets.token_hex(8))
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp_path, flags, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._check_not_queued(cmd_id)
            os.rename(tmp_path, os.path.join(pending_dir, cmd_id + suffix))
        except BaseException:
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(pending_dir)
        with _SUBMITTED_LOCK:
            key = (self.path, cmd_id)
            _SUBMITTED.pop(key, None)
            _SUBMITTED[key] = submitted_at
            while len(_SUBMITTED) > _SUBMITTED_MAX:
                del _SUBMITTED[next(iter(_SUBMITTED))]
        if self.served() is False:
            warnings.warn(
                "no worker is running on %s; the job waits in pending/" % self.path,
                stacklevel=3,
            )
        return cmd_id

    # -- state and results ----------------------------------------------------

    def state(self, cmd_id: str) -> Optional[str]:
        """Return ``"pending"``, ``"running"``, ``"completed"`` or None (unknown id).

        Checked in the race-free order pending, running, completed;
        ``"completed"`` means no run is queued or in progress and a result
        exists.
        """
        validate_id(cmd_id)
        for state in ("pending", "running"):
            if any(os.path.lexists(p) for p in self._job_paths(state, cmd_id)):
                return state
        if os.path.exists(self.result_path(cmd_id)):
            return "completed"
        # Being rejected: its file went to archive/rejected/ moments ago and
        # its result follows.
        return "pending" if self._being_rejected(cmd_id) else None

    def _being_rejected(self, cmd_id: str) -> bool:
        """Whether ``archive/rejected/<id>.<kind>.<stamp>`` is under 10 s old."""
        try:
            names = os.listdir(os.path.join(self.path, "archive", "rejected"))
        except OSError:
            return False
        now = _dt.datetime.now(_dt.timezone.utc)
        for name in names:
            for kind in (".json.", ".sh."):
                prefix = cmd_id + kind
                stamp = name[len(prefix):len(prefix) + 23] if name.startswith(prefix) else ""
                if _LOG_STAMP.fullmatch(stamp):
                    at = _dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(
                        tzinfo=_dt.timezone.utc)
                    if (now - at).total_seconds() < REJECTING_SECS:
                        return True
        return False

    def read_result(self, cmd_id: str) -> Optional[Dict[str, Any]]:
        """Return the parsed ``completed/<id>.json`` or None if it does not exist.

        This is the latest finished run of *cmd_id*, even if a newer run is
        queued or running right now (see :meth:`result` for the done-ness
        aware variant).  A result written before ``"submitted_by"`` or the
        usage keys existed is returned with those keys None.
        """
        try:
            with open(self.result_path(cmd_id), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        result = json.loads(raw.decode("utf-8"))
        if isinstance(result, dict):
            for key in _LATER_KEYS:
                result.setdefault(key, None)
        return result

    def _finished(
        self, cmd_id: str, not_before: Optional[float]
    ) -> Tuple[Optional[Dict[str, Any]], str]:
        """Return ``(result, state)``: the result if *cmd_id* is finished, else None.

        *state* describes why it is not finished: ``"pending"``,
        ``"running"``, ``"no result"`` or ``"stale result"`` (a result whose
        ``started_at`` is before *not_before*).
        """
        for state in ("pending", "running"):
            if any(os.path.lexists(p) for p in self._job_paths(state, cmd_id)):
                return None, state
        result = self.read_result(cmd_id)
        if result is None:
            return None, "no result"
        if not_before is not None:
            started = _parse_rfc3339(result.get("started_at"))
            if started is not None and started < not_before:
                return None, "stale result"
        return result, "completed"

    def _not_before(self, cmd_id: str, since: Since) -> Optional[float]:
        """Return the lower bound for ``started_at`` used by result()/wait()."""
        if since is not None:
            return _since_to_posix(since)
        with _SUBMITTED_LOCK:
            submitted = _SUBMITTED.get((self.path, cmd_id))
        return None if submitted is None else submitted - SUBMIT_TOLERANCE_SECS

    def result(self, cmd_id: str, *, since: Since = None) -> Optional[Dict[str, Any]]:
        """Return the result of *cmd_id* if it is finished, else None.

        Finished means: no ``pending/<id>.*`` and no ``running/<id>.*`` and
        ``completed/<id>.json`` exists.  So while a new run of a reused id
        is queued or running this returns None rather than the previous
        run's result.  *since* works as in :meth:`wait`.  Returns exactly
        what :meth:`wait` would return at this moment.
        """
        validate_id(cmd_id)
        return self._finished(cmd_id, self._not_before(cmd_id, since))[0]

    def wait(
        self, cmd_id: str, timeout: Optional[float] = None, *, since: Since = None
    ) -> Dict[str, Any]:
        """Block until *cmd_id* is finished and return its result dict.

        Polls the spool (5 ms, doubling up to 200 ms) and raises TimeoutError
        if the job is not finished within *timeout* seconds (None = forever;
        0 = check once).

        A result is only accepted if its ``started_at`` is not earlier than
        *since* (POSIX seconds or an aware datetime).  When *since* is None
        and this process submitted *cmd_id* to this spool, it defaults to the
        submit time minus 1 second, so a previous run's result of a reused
        id is never mistaken for the new one.  Pass ``since=0`` to accept
        any result.
        """
        validate_id(cmd_id)
        not_before = self._not_before(cmd_id, since)
        first = self.state(cmd_id) or self.state(cmd_id)
        if first is None:
            raise UnknownJob(
                "no job %r in %s: it is not pending, running or finished (a mistyped id?)"
                % (cmd_id, self.path)
            )
        if first == "pending" and self.served() is False:
            warnings.warn(
                "no worker is running on %s; the job waits in pending/" % self.path,
                stacklevel=2,
            )
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError("timeout must be a number of seconds or None")
            deadline: Optional[float] = time.monotonic() + max(0.0, float(timeout))
        else:
            deadline = None
        delay = POLL_INITIAL_SECS
        while True:
            result, state = self._finished(cmd_id, not_before)
            if result is not None:
                return result
            if deadline is None:
                time.sleep(delay)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        "job %r not finished after %s s (state: %s, spool: %s)"
                        % (cmd_id, timeout, state, self.path)
                    )
                time.sleep(min(delay, remaining))
            delay = min(delay * 2, POLL_MAX_SECS)

    # -- logs -----------------------------------------------------------------

    def log_dir(self, cmd_id: str) -> str:
        """Return the path of ``logs/<shard>/``, which holds the logs of
        *cmd_id* (it may not exist); see :func:`log_shard`."""
        return os.path.join(self.subdir("logs"), log_shard(cmd_id))

    def log_paths(self, cmd_id: str) -> List[str]:
        """Return the paths of all logs (``<id>@<stamp>.log``) of *cmd_id*,
        oldest first."""
        directory = self.log_dir(cmd_id)
        prefix = cmd_id + "@"
        try:
            with os.scandir(directory) as it:
                names = [
                    e.name for e in it
                    if e.name.startswith(prefix) and e.name.endswith(".log")
                    and _LOG_STAMP.fullmatch(e.name[len(prefix):-len(".log")])
                    and e.is_file()
                ]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [os.path.join(directory, n) for n in sorted(names)]

    def latest_log_path(self, cmd_id: str) -> Optional[str]:
        """Return the path of the latest log of *cmd_id*, or None if there is none.

        Log names are UTC start stamps, so the latest is the greatest name.
        """
        paths = self.log_paths(cmd_id)
        return paths[-1] if paths else None

    def latest_log(self, cmd_id: str) -> Optional[str]:
        """Return the text of the latest log of *cmd_id*, or None if there is none.

        Decoded as UTF-8 with ``errors="replace"``.  The log of a running
        job can be read; it is then the output so far.
        """
        for path in reversed(self.log_paths(cmd_id)):
            try:
                with open(path, "rb") as f:
                    return f.read().decode("utf-8", errors="replace")
            except FileNotFoundError:
                continue  # removed meanwhile; fall back to the previous one
        return None


    def read_log(
        self, cmd_id: str, offset: int = 0, max_bytes: int = DEFAULT_READ_BYTES
    ) -> Tuple[str, int, bool]:
        """Return ``(text, next_offset, finished)``: the latest log of *cmd_id* from byte *offset*.

        At most *max_bytes* are read, and *text* never ends inside a UTF-8
        character (unless the finished log does); other invalid UTF-8 is
        replaced.  Pass *next_offset* to the next call to read on: while
        the job runs, each byte is returned once.  *finished* is True once
        the job had finished before the log was read: then the log is
        whole.  A pending job gives ``("", offset, False)``.  Raises
        KeyError for an id the spool knows nothing of.
        """
        validate_id(cmd_id)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError("offset must be a non-negative int, got %r" % (offset,))
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError("max_bytes must be a positive int, got %r" % (max_bytes,))
        # The state first: a job finished by then has its whole log.
        state = self.state(cmd_id)
        if state is None:
            raise KeyError("no job %r in %s (not pending, not running, no result)"
                           % (cmd_id, self.path))
        if state == "pending":
            return "", offset, False
        finished = state == "completed"
        data = b""
        path = self.latest_log_path(cmd_id)
        if path is not None:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(max_bytes)
            if not (finished and len(data) < max_bytes):
                data = data[:_whole_chars(data)]
        return data.decode("utf-8", errors="replace"), offset + len(data), finished


def _whole_chars(data: bytes) -> int:
    """Length of *data* without an incomplete UTF-8 character at its end."""
    n = len(data)
    for back in range(1, min(3, n) + 1):
        b = data[n - back]
        if b & 0xC0 != 0x80:
            size = 2 if 0xC0 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF7 else 1
            return n - back if size > back else n
    return n


_LOG_STAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z")


def log_shard(cmd_id: str) -> str:
    """Return the ``logs/`` shard of *cmd_id*: the low byte, as two
    lower-case hex digits, of the 32-bit FNV-1a hash of the id's bytes."""
    h = 0x811C9DC5
    for b in validate_id(cmd_id).encode("ascii"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return "%02x" % (h & 0xFF)


def _fsync_dir(path: str) -> None:
    """fsync a directory so a rename into it is durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _spool(spool: SpoolArg) -> Spool:
    """Return *spool* if it is a Spool, else ``Spool(spool)``."""
    return spool if isinstance(spool, Spool) else Spool(spool)


# -- module-level API (kept compatible with the older system) ------------------


def create_bash_command(
    cmd: str,
    cmd_id: Optional[str] = None,
    timeout_secs: Optional[int] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    on_interrupt: Optional[str] = None,
    spool: SpoolArg = None,
    limits: Optional[Mapping[str, Any]] = None,
) -> str:
    """Queue ``bash -c <cmd>`` and return the job id.  See :meth:`Spool.submit`.

    Raises ValueError for a bad id or option, FileExistsError if the id is
    already queued in ``pending/``.
    """
    return _spool(spool).submit(
        cmd,
        cmd_id,
        timeout_secs=timeout_secs,
        env=env,
        cwd=cwd,
        on_interrupt=on_interrupt,
        limits=limits,
    )


def create_bash_script(
    script: Union[str, bytes], cmd_id: Optional[str] = None, spool: SpoolArg = None
) -> str:
    """Queue a whole bash script as ``pending/<id>.sh`` and return the id.

    See :meth:`Spool.submit_script`.
    """
    return _spool(spool).submit_script(script, cmd_id)


def check_results(
    cmd_id: str, spool: SpoolArg = None, *, since: Since = None
) -> Optional[Dict[str, Any]]:
    """Return the result dict of *cmd_id* if it is finished, else None.

    The dict has the keys listed in :data:`RESULT_KEYS` (``"exit_code"``,
    ``"status"``, ...).  None while the job is queued or running, or if it
    never ran.  See :meth:`Spool.result`.
    """
    return _spool(spool).result(cmd_id, since=since)


def get_latest_log(cmd_id: str, spool: SpoolArg = None) -> Optional[str]:
    """Return the text of the latest log of *cmd_id*, or None if there is none.

    See :meth:`Spool.latest_log`.
    """
    return _spool(spool).latest_log(cmd_id)


def read_log(
    cmd_id: str,
    offset: int = 0,
    max_bytes: int = DEFAULT_READ_BYTES,
    spool: SpoolArg = None,
) -> Tuple[str, int, bool]:
    """Return ``(text, next_offset, finished)`` of the latest log from *offset*.

    See :meth:`Spool.read_log`.
    """
    return _spool(spool).read_log(cmd_id, offset, max_bytes)


def cancel(cmd_id: str, spool: SpoolArg = None) -> None:
    """Ask the worker to cancel *cmd_id* (withdraw it, or stop it and all it started).

    See :meth:`Spool.cancel`.
    """
    _spool(spool).cancel(cmd_id)


def get_state(cmd_id: str, spool: SpoolArg = None) -> Optional[str]:
    """Return ``"pending"``, ``"running"``, ``"completed"`` or None.

    See :meth:`Spool.state`.
    """
    return _spool(spool).state(cmd_id)


def wait(
    cmd_id: str,
    timeout: Optional[float] = None,
    spool: SpoolArg = None,
    *,
    since: Since = None,
) -> Dict[str, Any]:
    """Block until *cmd_id* is finished and return its result dict.

    Raises TimeoutError after *timeout* seconds (None = wait forever).
    See :meth:`Spool.wait`.
    """
    return _spool(spool).wait(cmd_id, timeout, since=since)
