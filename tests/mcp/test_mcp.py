"""Tier 2: ``ai-cmd-executor mcp`` driven by a real MCP client, the official
Python SDK (``mcp`` on PyPI), against a foreground worker.

Run by scripts/test.sh in a virtual environment that has ``mcp``, with
``AI_CMD_EXECUTOR_BIN`` naming the binary; skipped without them, except with
``CI=true``, where that is a failure.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

try:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
except ImportError:  # pragma: no cover - reported by the test below
    ClientSession = None

BIN = os.environ.get("AI_CMD_EXECUTOR_BIN")
DEADLINE = 60.0
TOOLS = {"run_command", "get_job", "read_log", "list_jobs", "cancel_job"}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def wait_for(what, predicate, timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


class McpServerTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self) -> None:
        reason = None
        if not BIN:
            reason = "AI_CMD_EXECUTOR_BIN is not set"
        elif ClientSession is None:
            reason = "the mcp package is not installed"
        if reason:
            if _ci():
                self.fail(reason + "; the MCP tests must run when CI=true")
            self.skipTest(reason)
        self.tmp = tempfile.mkdtemp(prefix="ace-mcp-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.spool = os.path.join(self.tmp, "spool")
        self.worker = None

    def start_worker(self) -> None:
        log = open(os.path.join(self.tmp, "worker.log"), "wb")
        self.addCleanup(log.close)
        self.worker = subprocess.Popen(
            [BIN, "run", "--spool", self.spool],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(self.stop_worker)
        wait_for("the worker's spool", lambda: os.path.isdir(os.path.join(self.spool, "completed")))
        wait_for("the worker to serve", lambda: self.cli("status").returncode == 0)

    def stop_worker(self) -> None:
        if self.worker and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            self.worker.wait(timeout=DEADLINE)

    def cli(self, *args):
        return subprocess.run([BIN, "--spool", self.spool, *args], capture_output=True)

    @contextlib.asynccontextmanager
    async def session(self):
        params = StdioServerParameters(command=BIN, args=["--spool", self.spool, "mcp"])
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                yield s

    async def call(self, s, tool, **args):
        r = await s.call_tool(tool, args)
        return r

    def ok(self, r) -> dict:
        self.assertFalse(r.is_error, r)
        self.assertIsInstance(r.structured_content, dict, r)
        self.assertTrue(r.content and r.content[0].text, r)
        return r.structured_content

    def error_text(self, r) -> str:
        self.assertTrue(r.is_error, r)
        return r.content[0].text

    async def test_tools_and_schemas(self) -> None:
        self.start_worker()
        async with self.session() as s:
            listed = await s.list_tools()
            by_name = {t.name: t for t in listed.tools}
            self.assertEqual(set(by_name), TOOLS)
            for t in listed.tools:
                self.assertGreater(len(t.description or ""), 40, t.name)
                self.assertEqual(t.input_schema["type"], "object", t.name)
            run = by_name["run_command"].input_schema
            self.assertEqual(run["required"], ["command"])
            for key in ("command", "cwd", "env", "timeout_secs", "wait_secs"):
                self.assertIn(key, run["properties"])
            self.assertEqual(set(by_name["read_log"].input_schema["properties"]),
                             {"id", "offset", "max_bytes"})

    async def test_a_command_runs_to_its_result(self) -> None:
        self.start_worker()
        async with self.session() as s:
            v = self.ok(await self.call(s, "run_command", command="echo hello; echo oops >&2; exit 3"))
            self.assertEqual(v["state"], "finished", v)
            self.assertEqual(v["status"], "failed", v)
            self.assertEqual(v["exit_code"], 3, v)
            self.assertEqual(v["output"], "hello\noops\n", v)
            self.assertFalse(v["output_truncated"], v)
            self.assertIsInstance(v["duration_ms"], int)
            got = self.ok(await self.call(s, "get_job", id=v["id"]))
            self.assertEqual(got["exit_code"], 3)
            self.assertEqual(got["submitted_via"], "mcp", got)
            self.assertEqual(got["submitted_by"]["uid"], os.geteuid(), got)
            env = self.ok(await self.call(
                s, "run_command", command='echo "$GREETING from $PWD"',
                env={"GREETING": "hi"}, cwd="/tmp"))
            self.assertEqual(env["output"], "hi from /tmp\n", env)
            listed = self.ok(await self.call(s, "list_jobs"))["jobs"]
            self.assertEqual([j["id"] for j in listed][:2], [env["id"], v["id"]], listed)
            self.assertEqual(listed[0]["status"], "succeeded")

    async def test_a_long_command_returns_early_and_its_log_is_read_by_offset(self) -> None:
        self.start_worker()
        gate = os.path.join(self.tmp, "gate")
        command = ('for i in $(seq 1 300); do echo "line $i é"; done; '
                   'while [ ! -e %s ]; do sleep 0.01; done; echo done' % gate)
        async with self.session() as s:
            started = time.monotonic()
            v = self.ok(await self.call(s, "run_command", command=command, wait_secs=1))
            self.assertLess(time.monotonic() - started, 10)
            self.assertEqual(v["state"], "running", v)
            job = v["id"]
            text, offset, finished = "", 0, False
            deadline = time.monotonic() + DEADLINE
            while not finished:
                self.assertLess(time.monotonic(), deadline, text[-300:])
                chunk = self.ok(await self.call(s, "read_log", id=job, offset=offset, max_bytes=500))
                text += chunk["output"]
                self.assertGreaterEqual(chunk["next_offset"], offset)
                offset, finished = chunk["next_offset"], chunk["finished"]
                if text.endswith("line 300 é\n") and not os.path.exists(gate):
                    self.assertFalse(finished)
                    open(gate, "w").close()
                if not chunk["output"]:
                    await asyncio.sleep(0.02)
            want = "".join("line %d é\n" % i for i in range(1, 301)) + "done\n"
            self.assertEqual(text, want)
            self.assertEqual(offset, len(want.encode("utf-8")))
            end = self.ok(await self.call(s, "get_job", id=job))
            self.assertEqual(end["status"], "succeeded", end)

    async def test_cancel_job_stops_the_job_and_its_tree(self) -> None:
        self.start_worker()
        pidfile = os.path.join(self.tmp, "child.pid")
        command = "(setsid sh -c 'echo $$ > %s; exec sleep 1000') & sleep 1000" % pidfile
        async with self.session() as s:
            v = self.ok(await self.call(s, "run_command", command=command, wait_secs=0))
            wait_for("the child", lambda: os.path.exists(pidfile) and read(pidfile).strip())
            child = int(read(pidfile))
            end = self.ok(await self.call(s, "cancel_job", id=v["id"]))
            self.assertEqual(end["state"], "finished", end)
            self.assertEqual(end["status"], "cancelled", end)
            self.assertEqual(end["cancelled_by"]["uid"], os.geteuid(), end)

            def gone():
                try:
                    os.kill(child, 0)
                except ProcessLookupError:
                    return True
                try:
                    with open("/proc/%d/stat" % child) as f:
                        return f.read().split(") ")[1].startswith("Z")
                except FileNotFoundError:
                    return True
            wait_for("the job's setsid child to be gone", gone)
            msg = self.error_text(await self.call(s, "cancel_job", id=v["id"]))
            self.assertIn("already finished", msg)
            msg = self.error_text(await self.call(s, "cancel_job", id="nope"))
            self.assertIn("no job nope", msg)

    async def test_errors_are_tool_errors(self) -> None:
        async with self.session() as s:
            msg = self.error_text(await self.call(s, "run_command", command="true", wait_secs=0))
            self.assertIn("no worker is running on the spool", msg)
            self.assertIn("ai-cmd-executor run --spool", msg)
            self.assertIn("not submitted", msg)
        self.start_worker()
        async with self.session() as s:
            msg = self.error_text(await self.call(s, "get_job", id="../etc/passwd"))
            self.assertIn("is not a job id", msg)
            msg = self.error_text(await self.call(s, "get_job", id="no-such-job"))
            self.assertIn("no job no-such-job", msg)
            msg = self.error_text(await self.call(s, "read_log", id="no-such-job"))
            self.assertIn("no job no-such-job", msg)
            msg = self.error_text(await self.call(s, "list_jobs", state="weird"))
            self.assertIn("state must be", msg)
            msg = self.error_text(await self.call(s, "run_command", command="true", cwd="relative"))
            self.assertIn("absolute", msg)
            # The server still answers after each error.
            v = self.ok(await self.call(s, "run_command", command="echo still here"))
            self.assertEqual(v["output"], "still here\n")

    async def test_a_full_spool_is_a_tool_error(self) -> None:
        # A spool on a tmpfs of its own (root mounts it), filled up.
        if os.geteuid() != 0:
            if _ci():
                self.fail("CI runs the MCP tests as root; this one needs root to mount a tmpfs")
            self.skipTest("needs root to mount a small tmpfs")
        os.makedirs(self.spool)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ace-full", self.spool], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", self.spool])
        self.start_worker()
        filler = os.path.join(self.spool, "filler")
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass
        async with self.session() as s:
            r = await self.call(s, "run_command", command="echo never", wait_secs=0)
            msg = self.error_text(r)
            self.assertIn("file system is full", msg)
            self.assertIn("not submitted", msg)
            self.assertEqual(os.listdir(os.path.join(self.spool, "pending")), [])
            self.assertEqual(os.listdir(os.path.join(self.spool, "tmp")), [])
            # Room again: the same server submits.
            os.unlink(filler)
            v = self.ok(await self.call(s, "run_command", command="echo room"))
            self.assertEqual(v["output"], "room\n", v)

    async def test_the_job_outlives_a_killed_server(self) -> None:
        self.start_worker()
        gate = os.path.join(self.tmp, "gate2")
        mark = os.path.join(self.tmp, "mark")
        command = "while [ ! -e %s ]; do sleep 0.01; done; echo finished > %s" % (gate, mark)
        server = subprocess.Popen(
            [BIN, "--spool", self.spool, "mcp"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        send = lambda msg: (server.stdin.write((json.dumps(msg) + "\n").encode()), server.stdin.flush())
        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2024-11-05", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}})
        self.assertIn(b'"result"', server.stdout.readline())
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "run_command", "arguments": {"command": command, "wait_secs": 60}}})
        # Killed mid-wait, once the job runs.
        running = os.path.join(self.spool, "running")
        wait_for("the job to run", lambda: os.listdir(running))
        server.kill()
        server.wait()
        open(gate, "w").close()
        wait_for("the job to finish without its server", lambda: os.path.exists(mark))
        # A new session finds it again.
        async with self.session() as s:
            jobs = self.ok(await self.call(s, "list_jobs"))["jobs"]
            self.assertEqual(len(jobs), 1, jobs)
            job = wait_for("its result", lambda: os.listdir(os.path.join(self.spool, "completed")))
            end = self.ok(await self.call(s, "get_job", id=jobs[0]["id"]))
            self.assertEqual(end["status"], "succeeded", end)


if __name__ == "__main__":
    unittest.main()
