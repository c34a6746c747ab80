"""Tests for ai_cmd_executor.

Run from the repository root with::

    python3 -m unittest discover -s clients/python -v

The unit tests use a temporary spool and a simulated worker.  The end-to-end
tests (EndToEndTest) run the real worker: set ``AI_CMD_EXECUTOR_BIN`` to the
``ai-cmd-executor`` binary.  Without it they are skipped, unless ``CI=true``,
in which case they fail.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import unittest
from unittest import mock

import ai_cmd_executor as ace

DEADLINE_SECS = 10.0


def utc_stamp(when: dt.datetime) -> str:
    """Format *when* as the worker does: RFC 3339 UTC with microseconds."""
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def wait_until(predicate, timeout=DEADLINE_SECS, what="condition"):
    """Poll *predicate* until it returns a truthy value; fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %s s waiting for %s" % (timeout, what))
        time.sleep(0.005)


class FakeWorker:
    """Performs the worker's side of the spool contract step by step."""

    def __init__(self, root: str) -> None:
        """Use the spool at *root*, creating its layout."""
        self.root = root
        for d in ace.SUBDIRS:
            os.makedirs(os.path.join(root, d), exist_ok=True)

    def claim(self, name: str) -> str:
        """Rename ``pending/<name>`` to ``running/<name>``; return the new path."""
        dst = os.path.join(self.root, "running", name)
        os.rename(os.path.join(self.root, "pending", name), dst)
        return dst

    def write_log(self, cmd_id: str, started: dt.datetime, data: bytes) -> str:
        """Write a log for a run started at *started*; return its relative path."""
        shard = ace.log_shard(cmd_id)
        rel = os.path.join(
            "logs", shard,
            cmd_id + "@" + started.strftime("%Y%m%dT%H%M%S.%fZ") + ".log"
        )
        os.makedirs(os.path.join(self.root, "logs", shard), exist_ok=True)
        with open(os.path.join(self.root, rel), "wb") as f:
            f.write(data)
        return rel

    def write_result(self, cmd_id: str, **overrides) -> dict:
        """Atomically write ``completed/<id>.json`` and return the result."""
        now = dt.datetime.now(dt.timezone.utc)
        result = {
            "id": cmd_id,
            "status": "succeeded",
            "exit_code": 0,
            "signal": None,
            "started_at": utc_stamp(now),
            "finished_at": utc_stamp(now),
            "duration_ms": 0,
            "log": None,
            "output_truncated": False,
            "error": None,
            "attempt": 1,
            "submitted_by": {"uid": os.geteuid(), "name": None},
            "cpu_user_ms": 1,
            "cpu_system_ms": 0,
            "max_rss_bytes": 3 << 20,
            "submitted_via": "python",
        }
        result.update(overrides)
        tmp = os.path.join(self.root, "tmp", ".result-%s" % cmd_id)
        with open(tmp, "w") as f:
            json.dump(result, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.root, "completed", cmd_id + ".json"))
        # As the worker does, a run without limits has no "limits" key in
        # the file, nor one without a cgroup "memory_peak_bytes"; the
        # client reads them as None.
        result.setdefault("limits", None)
        result.setdefault("memory_peak_bytes", None)
        result.setdefault("cancelled_by", None)
        return result

    def finish(self, name: str) -> None:
        """Remove ``running/<name>`` (after the result was written)."""
        os.unlink(os.path.join(self.root, "running", name))


class SpoolTestCase(unittest.TestCase):
    """Base class: a fresh temporary spool in ``self.root`` / ``self.spool``."""

    def setUp(self) -> None:
        """Create a temporary spool directory (without its layout)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="ace-test-")
        self.addCleanup(self._tmp.cleanup)
        self.root = os.path.join(self._tmp.name, "spool")
        self.spool = ace.Spool(self.root)
        # A spool as a worker sets it up (clients never create it).
        for d in ace.SUBDIRS:
            os.makedirs(self.path(d))

    def path(self, *parts: str) -> str:
        """Return a path inside the spool."""
        return os.path.join(self.root, *parts)

    def read_json(self, *parts: str) -> dict:
        """Parse a JSON file inside the spool."""
        with open(self.path(*parts), "rb") as f:
            return json.loads(f.read().decode("utf-8"))


class IdTest(unittest.TestCase):
    """Id validation and generation."""

    def test_valid_ids(self) -> None:
        """Ids from the allowed alphabet, 1 to 128 characters, are accepted."""
        for good in ["a", "A9", "build-7", "periodic_health_check", "a.b.c",
                     "-lead", "_x", "x.", "x" * 128, "a.json", "0"]:
            with self.subTest(id=good):
                self.assertTrue(ace.is_valid_id(good))
                self.assertEqual(ace.validate_id(good), good)

    def test_invalid_ids(self) -> None:
        """Empty, too long, dot-leading or out-of-alphabet ids are refused."""
        for bad in ["", ".", "..", ".hidden", "x" * 129, "a/b", "../x", "a b",
                    "é", "a\n", "a\x00", "a:b", "a*", None, 7, b"abc"]:
            with self.subTest(id=bad):
                self.assertFalse(ace.is_valid_id(bad))
                with self.assertRaises(ValueError):
                    ace.validate_id(bad)

    def test_generated_ids_are_valid_and_unique(self) -> None:
        """generate_id() gives valid, distinct ``job-<stamp>-<hex>`` ids."""
        ids = {ace.generate_id() for _ in range(500)}
        self.assertEqual(len(ids), 500)
        for cmd_id in ids:
            self.assertTrue(ace.is_valid_id(cmd_id))
            self.assertRegex(cmd_id, r"\Ajob-\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{12}\Z")

    def test_functions_validate_ids(self) -> None:
        """Every function taking an id refuses a bad one with ValueError."""
        with tempfile.TemporaryDirectory() as root:
            for call in (
                lambda: ace.create_bash_command("true", "../evil", spool=root),
                lambda: ace.create_bash_script("true", ".x", spool=root),
                lambda: ace.check_results("a/b", spool=root),
                lambda: ace.get_latest_log("..", spool=root),
                lambda: ace.wait("x" * 129, timeout=0, spool=root),
                lambda: ace.get_state("", spool=root),
            ):
                with self.assertRaises(ValueError):
                    call()
            self.assertFalse(os.path.exists(os.path.join(root, "pending")))


class DefaultSpoolTest(unittest.TestCase):
    """Resolution of the default spool location."""

    def resolve(self, environ: dict, euid: int) -> str:
        """Return default_spool_path() under a given environment and euid."""
        with mock.patch.dict(os.environ, environ, clear=True), \
                mock.patch.object(ace, "DEFAULT_CONFIG", "/nonexistent/config.toml"), \
                mock.patch.object(ace.os, "geteuid", return_value=euid, create=True):
            return ace.default_spool_path()

    def test_config_file_spool_comes_after_the_variable(self) -> None:
        """The config file's spool (AI_CMD_EXECUTOR_CONFIG) is used as the CLI uses it."""
        with tempfile.TemporaryDirectory() as d:
            cfg = os.path.join(d, "config.toml")
            with open(cfg, "w") as f:
                f.write('max_parallel = 2\nspool = "/srv/from-config"\n')
            env = {"AI_CMD_EXECUTOR_CONFIG": cfg, "HOME": "/home/u"}
            self.assertEqual(self.resolve(env, 1000), "/srv/from-config")
            self.assertEqual(self.resolve(env, 0), "/srv/from-config")
            env["AI_CMD_EXECUTOR_SPOOL"] = "/srv/env"
            self.assertEqual(self.resolve(env, 1000), "/srv/env")
            with open(cfg, "w") as f:
                f.write('spool = "relative"\n')
            with self.assertRaises(ValueError):
                self.resolve({"AI_CMD_EXECUTOR_CONFIG": cfg}, 1000)
            with open(cfg, "w") as f:
                f.write('spool = "/srv/x"\nbroken = [\n')
            with self.assertWarns(UserWarning):
                self.assertEqual(
                    self.resolve({"AI_CMD_EXECUTOR_CONFIG": cfg, "HOME": "/h"}, 1000),
                    "/h/.local/state/ai-cmd-executor",
                )

    def test_no_home_is_never_a_relative_path(self) -> None:
        """With HOME unset the user database's home is used, never the current directory."""
        import pwd

        got = self.resolve({}, os.geteuid() or 1000)
        self.assertTrue(os.path.isabs(got), got)
        if os.geteuid() != 0:
            want = os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".local/state/ai-cmd-executor")
            self.assertEqual(got, want)

    def test_env_var_wins(self) -> None:
        """AI_CMD_EXECUTOR_SPOOL overrides everything, also for root."""
        env = {"AI_CMD_EXECUTOR_SPOOL": "/srv/spool", "XDG_STATE_HOME": "/x", "HOME": "/h"}
        self.assertEqual(self.resolve(env, 0), "/srv/spool")
        self.assertEqual(self.resolve(env, 1000), "/srv/spool")

    def test_root(self) -> None:
        """Root uses /var/lib/ai-cmd-executor."""
        env = {"XDG_STATE_HOME": "/x", "HOME": "/root"}
        self.assertEqual(self.resolve(env, 0), "/var/lib/ai-cmd-executor")

    def test_xdg_state_home(self) -> None:
        """Non-root uses $XDG_STATE_HOME/ai-cmd-executor."""
        env = {"XDG_STATE_HOME": "/state", "HOME": "/home/u"}
        self.assertEqual(self.resolve(env, 1000), "/state/ai-cmd-executor")

    def test_xdg_default(self) -> None:
        """Unset, empty or relative XDG_STATE_HOME falls back to ~/.local/state."""
        want = "/home/u/.local/state/ai-cmd-executor"
        self.assertEqual(self.resolve({"HOME": "/home/u"}, 1000), want)
        self.assertEqual(self.resolve({"HOME": "/home/u", "XDG_STATE_HOME": ""}, 1000), want)
        self.assertEqual(self.resolve({"HOME": "/home/u", "XDG_STATE_HOME": "rel"}, 1000), want)
        self.assertEqual(
            self.resolve({"HOME": "/home/u", "AI_CMD_EXECUTOR_SPOOL": ""}, 1000), want
        )

    def test_functions_use_default_spool(self) -> None:
        """spool=None means the default spool (read at call time)."""
        with tempfile.TemporaryDirectory() as root:
            FakeWorker(root)
            with mock.patch.dict(os.environ, {"AI_CMD_EXECUTOR_SPOOL": root}):
                cmd_id = ace.create_bash_command("true", "dflt")
                self.assertEqual(ace.get_state(cmd_id), "pending")
            self.assertTrue(os.path.exists(os.path.join(root, "pending", "dflt.json")))


class SubmitTest(SpoolTestCase):
    """create_bash_command / create_bash_script."""

    def test_minimal_job(self) -> None:
        """Only "command" is written when no options are given."""
        cmd_id = ace.create_bash_command("echo hi", "j1", spool=self.root)
        self.assertEqual(cmd_id, "j1")
        self.assertEqual(self.read_json("pending", "j1.json"), {"command": "echo hi", "submitted_via": "python"})
        self.assertEqual(os.listdir(self.path("tmp")), [])
        self.assertEqual(ace.get_state("j1", spool=self.root), "pending")

    def test_all_options(self) -> None:
        """All options are written with the contract's key names and types."""
        ace.create_bash_command(
            "make test", "j2", timeout_secs=90, env={"A": "1", "B_2": "x y"},
            cwd="/tmp", on_interrupt="retry", spool=self.root,
        )
        self.assertEqual(self.read_json("pending", "j2.json"), {
            "command": "make test", "timeout_secs": 90,
            "env": {"A": "1", "B_2": "x y"}, "cwd": "/tmp", "on_interrupt": "retry",
            "submitted_via": "python",
        })
        ace.create_bash_command("x", "j3", on_interrupt="fail", spool=self.root)
        self.assertEqual(self.read_json("pending", "j3.json")["on_interrupt"], "fail")
        ace.create_bash_command("x", "j4", timeout_secs=60.0, spool=self.root)
        with open(self.path("pending", "j4.json")) as f:
            self.assertIn('"timeout_secs": 60\n', f.read())
        limits = {"memory_max": "512M", "tasks_max": 64, "cpu_max": 0.5}
        ace.create_bash_command("x", "j5", limits=limits, spool=self.root)
        self.assertEqual(self.read_json("pending", "j5.json")["limits"], limits)

    def test_positional_legacy_signature(self) -> None:
        """The legacy positional order (cmd, cmd_id, timeout_secs, env, cwd, on_interrupt, spool) works."""
        ace.create_bash_command("true", "pos", 5, {"K": "v"}, "/", "fail", self.root)
        self.assertEqual(self.read_json("pending", "pos.json"), {
            "command": "true", "timeout_secs": 5, "env": {"K": "v"}, "cwd": "/",
            "on_interrupt": "fail", "submitted_via": "python",
        })

    def test_generated_id(self) -> None:
        """Without cmd_id an id is generated and returned."""
        cmd_id = ace.create_bash_command("true", spool=self.root)
        self.assertTrue(ace.is_valid_id(cmd_id))
        self.assertTrue(os.path.isfile(self.path("pending", cmd_id + ".json")))

    def test_unicode_is_utf8(self) -> None:
        """Non-ASCII text is stored as UTF-8."""
        ace.create_bash_command("echo 'héllo ✓'", "u", spool=self.root)
        with open(self.path("pending", "u.json"), "rb") as f:
            raw = f.read()
        self.assertIn("héllo ✓".encode("utf-8"), raw)
        self.assertEqual(json.loads(raw.decode("utf-8"))["command"], "echo 'héllo ✓'")

    def test_bad_options(self) -> None:
        """Bad option values raise before anything is written."""
        cases = [
            (TypeError, dict(cmd=None)),
            (TypeError, dict(cmd=b"echo")),
            (ValueError, dict(cmd="a\x00b")),
            (ValueError, dict(cmd="\udcff")),
            (ValueError, dict(timeout_secs=0)),
            (ValueError, dict(timeout_secs=-5)),
            (TypeError, dict(timeout_secs=1.5)),
            (TypeError, dict(timeout_secs=float("nan"))),
            (TypeError, dict(timeout_secs="10")),
            (TypeError, dict(timeout_secs=True)),
            (TypeError, dict(env=[("A", "1")])),
            (TypeError, dict(env={"A": 1})),
            (TypeError, dict(env={1: "a"})),
            (ValueError, dict(env={"": "a"})),
            (ValueError, dict(env={"A=B": "a"})),
            (ValueError, dict(env={"A": "a\x00"})),
            (ValueError, dict(cwd="relative/dir")),
            (ValueError, dict(on_interrupt="ignore")),
            (TypeError, dict(limits=["memory_max"])),
            (ValueError, dict(limits={"memory": "1G"})),
        ]
        for exc, kwargs in cases:
            kwargs = dict(kwargs)
            cmd = kwargs.pop("cmd", "true")
            with self.subTest(kwargs=kwargs, cmd=cmd):
                with self.assertRaises(exc):
                    ace.create_bash_command(cmd, "bad", spool=self.root, **kwargs)
        self.assertEqual(os.listdir(self.path("pending")) if os.path.isdir(self.path("pending")) else [], [])

    def test_duplicate_pending_id_refused(self) -> None:
        """An id already queued as .json or .sh is refused; the file is untouched."""
        ace.create_bash_command("echo first", "dup", spool=self.root)
        with self.assertRaises(FileExistsError):
            ace.create_bash_command("echo second", "dup", spool=self.root)
        with self.assertRaises(FileExistsError):
            ace.create_bash_script("echo second", "dup", spool=self.root)
        self.assertEqual(self.read_json("pending", "dup.json"), {"command": "echo first", "submitted_via": "python"})
        self.assertEqual(os.listdir(self.path("tmp")), [])

        ace.create_bash_script("echo s", "dup2", spool=self.root)
        with self.assertRaises(FileExistsError):
            ace.create_bash_command("echo j", "dup2", spool=self.root)

    def test_duplicate_check_sees_dangling_symlink(self) -> None:
        """Even a dangling symlink in pending/ counts as queued."""
        os.symlink("/nonexistent", self.path("pending", "ln.json"))
        with self.assertRaises(FileExistsError):
            ace.create_bash_command("true", "ln", spool=self.root)

    def test_reuse_after_claim(self) -> None:
        """Once the worker claimed the job, the id can be queued again."""
        ace.create_bash_command("echo 1", "again", spool=self.root)
        FakeWorker(self.root).claim("again.json")
        ace.create_bash_command("echo 2", "again", spool=self.root)
        self.assertEqual(self.read_json("pending", "again.json"), {"command": "echo 2", "submitted_via": "python"})

    def test_rename_is_the_publication(self) -> None:
        """The file is complete in tmp/ and is published by one rename into pending/."""
        real_rename = os.rename
        calls = []

        def spy(src, dst):
            calls.append((src, dst))
            self.assertEqual(os.path.dirname(src), self.path("tmp"))
            self.assertEqual(dst, self.path("pending", "atomic.json"))
            self.assertFalse(os.path.lexists(dst))
            with open(src, "rb") as f:
                self.assertEqual(json.loads(f.read()), {"command": "echo x" * 1000, "submitted_via": "python"})
            return real_rename(src, dst)

        with mock.patch.object(ace.os, "rename", side_effect=spy):
            ace.create_bash_command("echo x" * 1000, "atomic", spool=self.root)
        self.assertEqual(len(calls), 1)
        self.assertEqual(os.listdir(self.path("tmp")), [])

    def test_tmp_file_removed_on_failure(self) -> None:
        """If publishing fails, nothing is left in tmp/ or pending/."""
        with mock.patch.object(ace.os, "rename", side_effect=OSError("boom")):
            with self.assertRaises(OSError):
                ace.create_bash_command("true", "fail", spool=self.root)
        self.assertEqual(os.listdir(self.path("tmp")), [])
        self.assertEqual(os.listdir(self.path("pending")), [])

    def test_concurrent_reader_never_sees_partial_file(self) -> None:
        """A reader scanning pending/ only ever sees complete job files."""
        big = "echo " + "x" * 200_000
        n = 60
        stop = threading.Event()
        seen = set()
        errors = []

        def reader():
            while not stop.is_set():
                for name in os.listdir(self.path("pending")):
                    try:
                        with open(self.path("pending", name), "rb") as f:
                            job = json.loads(f.read().decode("utf-8"))
                        if job != {"command": big, "submitted_via": "python"}:
                            errors.append(name)
                    except Exception as exc:  # partial/empty file
                        errors.append("%s: %r" % (name, exc))
                    seen.add(name)

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(n):
                ace.create_bash_command(big, "c%d" % i, spool=self.root)
            wait_until(lambda: len(seen) == n, what="reader to see all jobs")
        finally:
            stop.set()
            thread.join(DEADLINE_SECS)
        self.assertEqual(errors, [])
        self.assertEqual(os.listdir(self.path("tmp")), [])

    def test_script_submission(self) -> None:
        """create_bash_script writes pending/<id>.sh byte for byte."""
        script = "#!/bin/bash\nset -e\necho 'é'\n"
        cmd_id = ace.create_bash_script(script, "s1", spool=self.root)
        self.assertEqual(cmd_id, "s1")
        with open(self.path("pending", "s1.sh"), "rb") as f:
            self.assertEqual(f.read(), script.encode("utf-8"))
        ace.create_bash_script(b"echo bytes\n", "s2", spool=self.root)
        with open(self.path("pending", "s2.sh"), "rb") as f:
            self.assertEqual(f.read(), b"echo bytes\n")
        self.assertEqual(os.listdir(self.path("tmp")), [])
        generated = ace.create_bash_script("true", spool=self.root)
        self.assertTrue(os.path.isfile(self.path("pending", generated + ".sh")))

    def test_script_validation(self) -> None:
        """Empty, non-UTF-8 or non-text scripts are refused."""
        for exc, script in [(ValueError, ""), (ValueError, b""), (ValueError, b"\xff\xfe"),
                            (TypeError, None), (ValueError, "a\x00")]:
            with self.subTest(script=script):
                with self.assertRaises(exc):
                    ace.create_bash_script(script, "bad", spool=self.root)

    def test_spool_object_accepted(self) -> None:
        """spool= may be a Spool instance or a path-like."""
        import pathlib
        ace.create_bash_command("true", "o1", spool=self.spool)
        ace.create_bash_command("true", "o2", spool=pathlib.Path(self.root))
        self.assertEqual(sorted(os.listdir(self.path("pending"))), ["o1.json", "o2.json"])


class ResultsAndLogsTest(SpoolTestCase):
    """check_results, get_state and get_latest_log."""

    def test_check_results_missing(self) -> None:
        """No result (and even no spool) gives None."""
        self.assertIsNone(ace.check_results("nothing", spool=self.root))
        self.assertIsNone(ace.get_state("nothing", spool=self.root))

    def test_check_results_present(self) -> None:
        """A written result is returned as a dict with all keys."""
        worker = FakeWorker(self.root)
        written = worker.write_result("done", status="failed", exit_code=3,
                                      log="logs/done/x.log")
        got = ace.check_results("done", spool=self.root)
        self.assertEqual(got, written)
        self.assertEqual(set(got), ace.RESULT_KEYS)
        self.assertEqual(got["exit_code"], 3)
        self.assertEqual(ace.get_state("done", spool=self.root), "completed")

    def test_check_results_written_before_submitted_by(self) -> None:
        """A result without the later keys (an older worker's) reads with them None."""
        worker = FakeWorker(self.root)
        written = worker.write_result("old")
        path = os.path.join(self.root, "completed", "old.json")
        later = ace._LATER_KEYS
        for key in later:
            written.pop(key, None)
        with open(path, "w") as f:
            json.dump(written, f)
        got = ace.check_results("old", spool=self.root)
        self.assertEqual(set(got), ace.RESULT_KEYS)
        for key in later:
            self.assertIsNone(got[key], key)
        self.assertEqual(got, dict(written, **{key: None for key in later}))

    def test_check_results_none_while_rerun_queued_or_running(self) -> None:
        """While a new run of a reused id is pending or running, the old result is hidden."""
        worker = FakeWorker(self.root)
        old = worker.write_result("re", exit_code=0)
        ace.create_bash_command("echo again", "re", spool=self.root)
        self.assertIsNone(ace.check_results("re", spool=self.root))
        self.assertEqual(self.spool.read_result("re"), old)  # raw access still works
        self.assertEqual(ace.get_state("re", spool=self.root), "pending")
        worker.claim("re.json")
        self.assertIsNone(ace.check_results("re", spool=self.root))
        self.assertEqual(ace.get_state("re", spool=self.root), "running")
        new = worker.write_result("re", exit_code=1, status="failed")
        self.assertIsNone(ace.check_results("re", spool=self.root))  # running file still there
        worker.finish("re.json")
        self.assertEqual(ace.check_results("re", spool=self.root), new)

    def test_latest_log_none(self) -> None:
        """No log directory or no *.log file gives None."""
        self.assertIsNone(ace.get_latest_log("nolog", spool=self.root))
        shard = ace.log_shard("nolog")
        os.makedirs(self.path("logs", shard))
        self.assertIsNone(ace.get_latest_log("nolog", spool=self.root))
        for name in ("notes.txt", "nolog@notastamp.log",
                     "nolog.x@20261126T193309.123456Z.log",
                     "other@20261126T193309.123456Z.log"):
            with open(self.path("logs", shard, name), "w") as f:
                f.write("not a log of nolog")
        self.assertIsNone(ace.get_latest_log("nolog", spool=self.root))

    def test_log_shard_matches_the_protocol(self) -> None:
        """FNV-1a 32-bit of the id, low byte in hex (docs/PROTOCOL.md)."""
        self.assertEqual(ace.log_shard("a"), "2c")
        self.assertEqual(len({ace.log_shard("job-%d" % i) for i in range(2000)}), 256)

    def test_latest_log_picks_greatest_name(self) -> None:
        """The lexicographically greatest *.log name is the latest run."""
        d = self.path("logs", ace.log_shard("lg"))
        os.makedirs(d)
        names = ["lg@20261126T193309.123456Z.log", "lg@20261126T193309.123457Z.log",
                 "lg@20251231T235959.999999Z.log", "lg@20261126T093309.000000Z.log"]
        for name in names:
            with open(os.path.join(d, name), "w") as f:
                f.write("content of " + name)
        with open(os.path.join(d, "lg@20991231T000000.000000Z.log.tmp"), "w") as f:
            f.write("ignored")
        os.mkdir(os.path.join(d, "lg@20991231T000000.000000Z.log"))  # a directory: ignored
        self.assertEqual(ace.get_latest_log("lg", spool=self.root),
                         "content of lg@20261126T193309.123457Z.log")
        self.assertEqual(self.spool.latest_log_path("lg"),
                         os.path.join(d, "lg@20261126T193309.123457Z.log"))
        self.assertEqual([os.path.basename(p) for p in self.spool.log_paths("lg")],
                         sorted(names))

    def test_latest_log_decodes_with_replacement(self) -> None:
        """Invalid UTF-8 in a log is replaced, not an error."""
        worker = FakeWorker(self.root)
        worker.write_log("bin", dt.datetime.now(dt.timezone.utc), b"ok \xff\xfe end\n")
        self.assertEqual(ace.get_latest_log("bin", spool=self.root), "ok \ufffd\ufffd end\n")

    def test_a_job_being_rejected_is_not_unknown(self) -> None:
        """Moved to archive/rejected/ moments ago, before its result: pending, not unknown."""
        rejected = self.path("archive", "rejected")
        os.makedirs(rejected, exist_ok=True)
        now = dt.datetime.now(dt.timezone.utc)
        open(os.path.join(rejected, "fresh.json." + now.strftime("%Y%m%dT%H%M%S.%fZ")), "w").close()
        old = now - dt.timedelta(minutes=5)
        open(os.path.join(rejected, "stale.sh." + old.strftime("%Y%m%dT%H%M%S.%fZ")), "w").close()
        self.assertEqual(ace.get_state("fresh", spool=self.root), "pending")
        self.assertIsNone(ace.get_state("stale", spool=self.root))
        self.assertIsNone(ace.get_state("fres", spool=self.root))
        with self.assertRaises(ace.UnknownJob):
            ace.wait("stale", timeout=0, spool=self.root)

    def test_read_log_by_offset(self) -> None:
        """Chunks from each next_offset give every byte once, never half a character."""
        with self.assertRaises(KeyError):
            ace.read_log("ghost", spool=self.root)
        ace.create_bash_command("true", "rl", spool=self.root)
        self.assertEqual(ace.read_log("rl", 7, spool=self.root), ("", 7, False))
        worker = FakeWorker(self.root)
        worker.claim("rl.json")
        now = dt.datetime.now(dt.timezone.utc)
        rel = worker.write_log("rl", now, "héllo".encode("utf-8"))
        self.assertEqual(ace.read_log("rl", 0, 2, spool=self.root), ("h", 1, False))
        self.assertEqual(ace.read_log("rl", 1, 100, spool=self.root), ("éllo", 6, False))
        with open(os.path.join(self.root, rel), "ab") as f:
            f.write(b" w\xc3")  # a character cut by the writer, for now
        self.assertEqual(ace.read_log("rl", 6, 100, spool=self.root), (" w", 8, False))
        with open(os.path.join(self.root, rel), "ab") as f:
            f.write(b"\xb6rld \xff\n")
        worker.write_result("rl")
        worker.finish("rl.json")
        self.assertEqual(ace.read_log("rl", 8, 100, spool=self.root),
                         ("\u00f6rld \ufffd\n", 16, True))
        self.assertEqual(ace.read_log("rl", 16, 100, spool=self.root), ("", 16, True))
        for bad in (-1, 1.5, True):
            with self.assertRaises(ValueError):
                ace.read_log("rl", bad, spool=self.root)
        with self.assertRaises(ValueError):
            ace.read_log("rl", 0, 0, spool=self.root)


class WaitTest(SpoolTestCase):
    """wait() against a simulated worker."""

    def start_waiter(self, cmd_id: str, **kwargs):
        """Run wait() in a thread; return (thread, outcome dict)."""
        outcome = {}

        def run():
            try:
                outcome["result"] = ace.wait(cmd_id, spool=self.root, **kwargs)
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, outcome

    def join(self, thread, outcome) -> dict:
        """Join a waiter thread with a deadline and return its result."""
        thread.join(DEADLINE_SECS)
        self.assertFalse(thread.is_alive(), "wait() did not return")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def test_wait_returns_when_worker_finishes(self) -> None:
        """wait() returns the new result, not the stale one of a previous run."""
        worker = FakeWorker(self.root)
        worker.write_result("w", exit_code=0, status="succeeded",
                            started_at="2020-01-01T00:00:00.000000Z")
        ace.create_bash_command("echo hello; exit 3", "w", spool=self.root)
        thread, outcome = self.start_waiter("w", timeout=DEADLINE_SECS * 2)

        started = dt.datetime.now(dt.timezone.utc)
        worker.claim("w.json")
        log = worker.write_log("w", started, b"hello\n")
        written = worker.write_result("w", status="failed", exit_code=3, log=log,
                                      started_at=utc_stamp(started))
        worker.finish("w.json")

        got = self.join(thread, outcome)
        self.assertEqual(got, written)
        self.assertEqual(got["exit_code"], 3)
        self.assertEqual(ace.get_latest_log("w", spool=self.root), "hello\n")

    def test_wait_for_script_job(self) -> None:
        """.sh jobs are tracked the same way."""
        worker = FakeWorker(self.root)
        ace.create_bash_script("exit 0\n", "sh", spool=self.root)
        thread, outcome = self.start_waiter("sh", timeout=DEADLINE_SECS * 2)
        worker.claim("sh.sh")
        written = worker.write_result("sh")
        worker.finish("sh.sh")
        self.assertEqual(self.join(thread, outcome), written)

    def test_wait_timeout(self) -> None:
        """wait() raises TimeoutError when nobody runs the job."""
        ace.create_bash_command("true", "never", spool=self.root)
        t0 = time.monotonic()
        with self.assertRaises(TimeoutError) as cm:
            ace.wait("never", timeout=0.2, spool=self.root)
        elapsed = time.monotonic() - t0
        self.assertGreaterEqual(elapsed, 0.2)
        self.assertLess(elapsed, DEADLINE_SECS)
        self.assertIn("pending", str(cm.exception))
        with self.assertRaises(TimeoutError):
            ace.wait("never", timeout=0, spool=self.root)

    def test_wait_timeout_while_running(self) -> None:
        """A job stuck in running/ also times out."""
        worker = FakeWorker(self.root)
        ace.create_bash_command("sleep 1000", "stuck", spool=self.root)
        worker.claim("stuck.json")
        worker.write_result("stuck")  # result already there but running file remains
        with self.assertRaises(TimeoutError) as cm:
            ace.wait("stuck", timeout=0.05, spool=self.root)
        self.assertIn("running", str(cm.exception))

    def test_wait_unknown_id_fails_at_once(self) -> None:
        """An id that was never submitted (a typo) fails at once, even with no timeout."""
        with self.assertRaises(ace.UnknownJob) as cm:
            ace.wait("ghost", spool=self.root)
        self.assertIn("ghost", str(cm.exception))

    def test_waiting_with_no_worker_says_so(self) -> None:
        """A pending job on a spool no worker serves: a warning, and the wait goes on."""
        with self.assertWarnsRegex(UserWarning, "no worker is running on .*waits in pending/"):
            ace.create_bash_command("true", "alone", spool=self.root)
        with self.assertWarnsRegex(UserWarning, "no worker is running"):
            with self.assertRaises(TimeoutError):
                ace.wait("alone", timeout=0.05, spool=self.root)

    def test_a_directory_that_is_not_a_spool_is_refused(self) -> None:
        """Submitting to a directory without pending/ creates nothing and says why."""
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(ace.NotASpool) as cm:
                ace.create_bash_command("true", "x", spool=d)
            self.assertIn("is not a spool", str(cm.exception))
            self.assertEqual(os.listdir(d), [])

    def test_wait_already_finished(self) -> None:
        """A finished job returns at once, even with timeout=0."""
        written = FakeWorker(self.root).write_result("fin")
        self.assertEqual(ace.wait("fin", timeout=0, spool=self.root), written)
        self.assertEqual(ace.wait("fin", spool=self.root), written)

    def test_wait_ignores_stale_result_after_submit(self) -> None:
        """After this process submitted an id, an older run's result is not accepted.

        Simulates the moment a re-queue (running -> pending) races with the
        waiter's pending/running checks: neither file is visible but
        completed/ still holds the previous run.
        """
        worker = FakeWorker(self.root)
        old = worker.write_result("st", started_at="2020-01-01T00:00:00.000000Z")
        ace.create_bash_command("true", "st", spool=self.root)
        os.unlink(self.path("pending", "st.json"))
        self.assertIsNone(ace.check_results("st", spool=self.root))
        with self.assertRaises(TimeoutError) as cm:
            ace.wait("st", timeout=0.05, spool=self.root)
        self.assertIn("stale", str(cm.exception))
        # Explicit since overrides the remembered submit time.
        self.assertEqual(ace.wait("st", timeout=0, spool=self.root, since=0), old)
        self.assertEqual(ace.check_results("st", spool=self.root, since=0), old)
        # A result of a run started after the submission is accepted.
        new = worker.write_result("st", exit_code=0)
        self.assertEqual(ace.wait("st", timeout=DEADLINE_SECS, spool=self.root), new)

    def test_wait_since_argument(self) -> None:
        """since= accepts POSIX seconds or an aware datetime."""
        worker = FakeWorker(self.root)
        written = worker.write_result("sa", started_at="2026-01-01T00:00:00.500000Z")
        boundary = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        self.assertEqual(ace.wait("sa", timeout=0, spool=self.root, since=boundary), written)
        self.assertEqual(
            ace.wait("sa", timeout=0, spool=self.root, since=boundary.timestamp() + 0.5),
            written,
        )
        with self.assertRaises(TimeoutError):
            ace.wait("sa", timeout=0, spool=self.root, since=boundary.timestamp() + 0.6)
        with self.assertRaises(ValueError):
            ace.wait("sa", timeout=0, spool=self.root, since=dt.datetime(2026, 1, 1))

    def test_wait_returns_an_expired_result(self) -> None:
        """A job archived by maintenance (no worker served the spool) ends wait()."""
        worker = FakeWorker(self.root)
        ace.create_bash_command("true", "late", spool=self.root)
        thread, outcome = self.start_waiter("late", timeout=DEADLINE_SECS * 2)
        # What cleanup does: the result first, then the job file leaves pending/.
        written = worker.write_result(
            "late", status="expired", exit_code=None,
            error="expired, never run: it waited 2h in pending/ while no worker served the spool",
        )
        stale = os.path.join(self.root, "archive", "stale")
        os.makedirs(stale, exist_ok=True)
        os.rename(self.path("pending", "late.json"), os.path.join(stale, "late.json.x"))
        got = self.join(thread, outcome)
        self.assertEqual(got, written)
        self.assertIn(got["status"], ace.STATUSES)
        self.assertEqual(got["status"], "expired")
        self.assertEqual(ace.get_state("late", spool=self.root), "completed")

    def test_parse_rfc3339(self) -> None:
        """The started_at parser handles Z, offsets and fraction lengths."""
        base = dt.datetime(2026, 11, 26, 19, 33, 9, tzinfo=dt.timezone.utc).timestamp()
        p = ace._parse_rfc3339
        self.assertAlmostEqual(p("2026-11-26T19:33:09.123456Z"), base + 0.123456, places=5)
        self.assertAlmostEqual(p("2026-11-26T19:33:09Z"), base)
        self.assertAlmostEqual(p("2026-11-26T19:33:09.5Z"), base + 0.5)
        self.assertAlmostEqual(p("2026-11-26T20:33:09.000+01:00"), base)
        for bad in [None, 5, "", "yesterday", "2026-13-01T00:00:00Z", "2026-11-26 19:33"]:
            self.assertIsNone(p(bad))


def _ci_is_true() -> bool:
    """True if the CI environment variable says we run in CI."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


class EndToEndTest(unittest.TestCase):
    """Runs the real worker binary named by AI_CMD_EXECUTOR_BIN.

    Skipped when the variable is unset, except with ``CI=true``, where the
    tests fail instead.
    """

    JOB_TIMEOUT = 60.0

    def setUp(self) -> None:
        """Start ``$AI_CMD_EXECUTOR_BIN run --spool <tmpdir>`` in the foreground."""
        binary = os.environ.get("AI_CMD_EXECUTOR_BIN")
        if not binary:
            reason = "AI_CMD_EXECUTOR_BIN is not set (path of the ai-cmd-executor binary)"
            if _ci_is_true():
                self.fail(reason + "; end-to-end tests must run when CI=true")
            self.skipTest(reason)
        tmp = tempfile.TemporaryDirectory(prefix="ace-e2e-")
        self.addCleanup(tmp.cleanup)
        self.root = os.path.join(tmp.name, "spool")
        self.worker_log_path = os.path.join(tmp.name, "worker.log")
        self.worker_log = open(self.worker_log_path, "wb")
        self.addCleanup(self.worker_log.close)
        self.proc = subprocess.Popen(
            [binary, "run", "--spool", self.root],
            stdin=subprocess.DEVNULL, stdout=self.worker_log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(self.stop_worker)
        # The worker creates the layout itself; wait for it so we know it is up.
        deadline = time.monotonic() + DEADLINE_SECS
        while not all(os.path.isdir(os.path.join(self.root, d)) for d in ace.SUBDIRS):
            if self.proc.poll() is not None:
                self.fail("worker exited with %s:\n%s" % (self.proc.returncode, self.worker_output()))
            if time.monotonic() >= deadline:
                self.fail("worker did not create the spool layout:\n" + self.worker_output())
            time.sleep(0.01)

    def stop_worker(self) -> None:
        """SIGTERM the worker, then SIGKILL it if it has not exited by a deadline."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=DEADLINE_SECS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE_SECS)

    def worker_output(self) -> str:
        """Return the tail of the worker's stdout/stderr, for failure messages."""
        self.worker_log.flush()
        with open(self.worker_log_path, "rb") as f:
            return f.read()[-4000:].decode("utf-8", errors="replace")

    def wait(self, cmd_id: str) -> dict:
        """wait() for a job, failing with the worker's output on timeout."""
        try:
            return ace.wait(cmd_id, timeout=self.JOB_TIMEOUT, spool=self.root)
        except TimeoutError as exc:
            self.fail("%s\nworker output:\n%s" % (exc, self.worker_output()))

    def check_result_shape(self, result: dict, cmd_id: str) -> None:
        """Assert the result has exactly the contract's keys and sane types."""
        self.assertEqual(set(result), ace.RESULT_KEYS, result)
        self.assertEqual(result["id"], cmd_id)
        self.assertIn(result["status"], ace.STATUSES)
        for key in ("started_at", "finished_at"):
            self.assertRegex(result[key], r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
        self.assertIsInstance(result["duration_ms"], int)
        self.assertIsInstance(result["output_truncated"], bool)
        self.assertIsInstance(result["attempt"], int)
        self.assertGreaterEqual(result["attempt"], 1)
        # This process wrote the job file, so it is the submitter.
        self.assertEqual(result["submitted_by"]["uid"], os.geteuid(), result)
        if result["status"] != "rejected":
            self.assertIn(result["submitted_via"], ("python", "file"), result)
        self.assertIn("name", result["submitted_by"], result)
        # A job that ran says what it used; one that did not, nothing.
        ran = result["log"] is not None
        for key in ("cpu_user_ms", "cpu_system_ms", "max_rss_bytes"):
            if not ran:
                self.assertIsNone(result[key], (key, result))
            else:
                self.assertIsInstance(result[key], int, (key, result))
                self.assertGreaterEqual(result[key], 0, (key, result))
        if ran:
            self.assertGreater(result["max_rss_bytes"], 0, result)

    def test_failed_job(self) -> None:
        """``echo hello; exit 3`` fails with exit code 3 and logs hello."""
        cmd_id = ace.create_bash_command("echo hello; exit 3", spool=self.root)
        result = self.wait(cmd_id)
        self.check_result_shape(result, cmd_id)
        self.assertEqual(result["status"], "failed", result)
        self.assertEqual(result["exit_code"], 3, result)
        self.assertIsNone(result["signal"], result)
        self.assertEqual(result["attempt"], 1, result)
        self.assertIn("hello", ace.get_latest_log(cmd_id, spool=self.root) or "")
        self.assertIsNotNone(result["log"])
        self.assertEqual(os.path.join(self.root, result["log"]),
                         ace.Spool(self.root).latest_log_path(cmd_id))
        self.assertEqual(ace.check_results(cmd_id, spool=self.root), result)
        self.assertEqual(ace.get_state(cmd_id, spool=self.root), "completed")

    def test_cancel(self) -> None:
        """A running job is stopped, a pending one withdrawn; both end cancelled."""
        gate = os.path.join(os.path.dirname(self.root), "gate")
        running = ace.create_bash_command(
            "while [ ! -e %s ]; do sleep 0.01; done" % gate, spool=self.root)
        wait_until(lambda: ace.get_state(running, spool=self.root) == "running",
                   what="the job to run")
        queued = ace.create_bash_command("echo never", spool=self.root)
        ace.cancel(queued, spool=self.root)
        ace.cancel(running, spool=self.root)
        for cmd_id in (queued, running):
            result = self.wait(cmd_id)
            self.check_result_shape(result, cmd_id)
            self.assertEqual(result["status"], "cancelled", result)
            self.assertEqual(result["cancelled_by"]["uid"], os.geteuid(), result)
        with self.assertRaises(ace.AlreadyFinished):
            ace.cancel(running, spool=self.root)
        with self.assertRaises(ace.UnknownJob):
            ace.cancel("no-such-job", spool=self.root)

    def test_read_log_follows_a_running_job(self) -> None:
        """Polling read_log while a job writes returns its output once, in order."""
        gate = os.path.join(os.path.dirname(self.root), "gate")
        cmd_id = ace.create_bash_command(
            "for i in $(seq 1 200); do echo \"line $i é\"; done; "
            "while [ ! -e %s ]; do sleep 0.01; done; echo end" % gate,
            spool=self.root,
        )
        text, offset, finished = "", 0, False
        deadline = time.monotonic() + DEADLINE_SECS
        while not finished:
            self.assertLess(time.monotonic(), deadline, text[-200:])
            chunk, offset, finished = ace.read_log(cmd_id, offset, 100, spool=self.root)
            text += chunk
            if text.endswith("line 200 é\n") and not os.path.exists(gate):
                self.assertFalse(finished)
                open(gate, "w").close()
            if not chunk:
                time.sleep(0.01)
        want = "".join("line %d é\n" % i for i in range(1, 201)) + "end\n"
        self.assertEqual(text, want)
        self.assertEqual(offset, len(want.encode("utf-8")))

    def test_limits_are_applied_and_named(self) -> None:
        """A job over its ``limits`` fails with them named; bad values are rejected."""
        cmd_id = ace.create_bash_command(
            "while :; do :; done", timeout_secs=4, limits={"cpu_max": "25%"},
            spool=self.root,
        )
        result = self.wait(cmd_id)
        self.check_result_shape(result, cmd_id)
        self.assertEqual(result["status"], "failed", result)
        self.assertEqual(result["signal"], "SIGXCPU", result)
        self.assertEqual(result["limits"]["cpu_max"], "25%", result)
        self.assertEqual(result["limits"]["enforced_by"]["cpu_max"], "RLIMIT_CPU 1s per process"
                         + ("; root can raise it" if os.geteuid() == 0 else ""), result)
        self.assertTrue(result["error"].startswith("cpu limit 25% reached"), result)
        bad = ace.create_bash_command("true", limits={"memory_max": "lots"}, spool=self.root)
        result = self.wait(bad)
        self.check_result_shape(result, bad)
        self.assertEqual(result["status"], "rejected", result)
        self.assertIn('"memory_max" must be', result["error"])
        self.assertIsNone(result["limits"], result)

    def test_succeeded_job(self) -> None:
        """A job with env and cwd succeeds with exit code 0."""
        cmd_id = ace.create_bash_command(
            'echo "value=$ACE_TEST_VAR"; pwd', "e2e-ok", timeout_secs=30,
            env={"ACE_TEST_VAR": "42"}, cwd="/", spool=self.root,
        )
        self.assertEqual(cmd_id, "e2e-ok")
        result = self.wait(cmd_id)
        self.check_result_shape(result, cmd_id)
        self.assertEqual(result["status"], "succeeded", result)
        self.assertEqual(result["exit_code"], 0, result)
        self.assertIsNone(result["error"], result)
        log = ace.get_latest_log(cmd_id, spool=self.root) or ""
        self.assertIn("value=42", log)
        self.assertIn("/\n", log)

    def test_script_job(self) -> None:
        """A .sh job runs the whole file with bash."""
        cmd_id = ace.create_bash_script("set -e\necho from-script\nexit 0\n", spool=self.root)
        result = self.wait(cmd_id)
        self.check_result_shape(result, cmd_id)
        self.assertEqual(result["status"], "succeeded", result)
        self.assertIn("from-script", ace.get_latest_log(cmd_id, spool=self.root) or "")

    def test_reused_id(self) -> None:
        """Running an id twice: wait() returns the second run, with its own log."""
        first = ace.create_bash_command("echo run-one", "again", spool=self.root)
        self.assertEqual(self.wait(first)["exit_code"], 0)
        ace.create_bash_command("echo run-two; exit 7", "again", spool=self.root)
        result = self.wait("again")
        self.assertEqual(result["exit_code"], 7, result)
        log = ace.get_latest_log("again", spool=self.root) or ""
        self.assertIn("run-two", log)
        self.assertNotIn("run-one", log)

    def test_rejected_job(self) -> None:
        """A job file with an unknown key is rejected and archived."""
        os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
        tmp = os.path.join(self.root, "tmp", "bad-job")
        with open(tmp, "w") as f:
            json.dump({"command": "true", "no_such_key": 1}, f)
        os.rename(tmp, os.path.join(self.root, "pending", "bad-job.json"))
        result = self.wait("bad-job")
        self.check_result_shape(result, "bad-job")
        self.assertEqual(result["status"], "rejected", result)
        self.assertIsNone(result["exit_code"], result)
        self.assertIsNone(result["log"], result)
        self.assertIsInstance(result["error"], str)
        archived = os.path.join(self.root, "archive", "rejected")
        self.assertTrue(os.path.isdir(archived) and os.listdir(archived), "nothing archived")


class ExpiredEndToEndTest(unittest.TestCase):
    """The real ``cleanup`` expires a job that waited while no worker ran.

    Needs AI_CMD_EXECUTOR_BIN, as EndToEndTest does.
    """

    def test_cleanup_expires_a_job_nobody_served(self) -> None:
        """wait() returns the expired result cleanup writes; the job is archived."""
        binary = os.environ.get("AI_CMD_EXECUTOR_BIN")
        if not binary:
            reason = "AI_CMD_EXECUTOR_BIN is not set (path of the ai-cmd-executor binary)"
            if _ci_is_true():
                self.fail(reason + "; end-to-end tests must run when CI=true")
            self.skipTest(reason)
        tmp = tempfile.TemporaryDirectory(prefix="ace-e2e-")
        self.addCleanup(tmp.cleanup)
        root = os.path.join(tmp.name, "spool")
        config = os.path.join(tmp.name, "config.toml")
        with open(config, "w") as f:
            f.write('stale_pending_after = "30m"\n')
        FakeWorker(root)
        cmd_id = ace.create_bash_command("echo never", "late", spool=root)
        two_hours_ago = time.time() - 7200
        os.utime(os.path.join(root, "pending", "late.json"), (two_hours_ago, two_hours_ago))
        out = subprocess.run(
            [binary, "--config", config, "--spool", root, "cleanup"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE_SECS,
        )
        self.assertEqual(out.returncode, 0, out)
        result = ace.wait(cmd_id, timeout=DEADLINE_SECS, spool=root)
        self.assertEqual(set(result), ace.RESULT_KEYS, result)
        self.assertEqual(result["status"], "expired", result)
        self.assertIn(result["status"], ace.STATUSES)
        self.assertIsNone(result["exit_code"], result)
        self.assertIsNone(result["log"], result)
        self.assertIn("no worker served the spool", result["error"])
        self.assertEqual(result["submitted_by"]["uid"], os.geteuid(), result)
        for key in ("cpu_user_ms", "cpu_system_ms", "max_rss_bytes"):
            self.assertIsNone(result[key], (key, result))
        self.assertEqual(os.listdir(os.path.join(root, "pending")), [])
        archived = os.listdir(os.path.join(root, "archive", "stale"))
        self.assertEqual(len(archived), 2, archived)


if __name__ == "__main__":
    unittest.main()
