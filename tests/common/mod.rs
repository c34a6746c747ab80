//! Test harness: the real binary as a foreground worker on a temporary
//! spool, job factories, and waiting on conditions with deadlines.

#![allow(dead_code)] // each test file uses its own part of the harness

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ai-cmd-executor");

/// Default deadline for conditions in tests: generous, since CI machines
/// are slow at times; a passing test never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `f` until it returns `Some`, or panics naming `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut nap = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(50));
    }
}

/// Jobs held until the test lets them go: each touches its own marker in
/// `started/` (in the test's scratch space), then waits for the gate file.
pub struct Gate {
    gate: PathBuf,
    started: PathBuf,
}

impl Gate {
    /// A closed gate beside `spool`, with no job started yet.
    pub fn new(spool: &Spool) -> Self {
        let started = spool.scratch("started");
        fs::create_dir_all(&started).expect("creating the started/ markers directory");
        Gate {
            gate: spool.scratch("gate"),
            started,
        }
    }

    /// A shell command that marks `name` started, then waits at the gate.
    pub fn command(&self, name: &str) -> String {
        format!(
            "touch {}/{name}; while [ ! -e {} ]; do sleep 0.01; done",
            self.started.display(),
            self.gate.display()
        )
    }

    /// How many gated jobs have started.
    pub fn started(&self) -> usize {
        fs::read_dir(&self.started)
            .expect("listing started/")
            .count()
    }

    /// Waits until exactly `n` gated jobs have started.
    pub fn wait_started(&self, n: usize) {
        wait_for(&format!("{n} gated job(s) to start"), DEADLINE, || {
            (self.started() == n).then_some(())
        });
    }

    /// Lets every gated job, running or still to come, finish.
    pub fn open(&self) {
        fs::write(&self.gate, "").expect("opening the gate");
    }

    /// The processes still waiting at this gate (their command line names it).
    fn waiting(&self) -> Vec<i32> {
        let gate = self.gate.to_string_lossy().into_owned();
        let Ok(dir) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&gate))
            })
            .collect()
    }
}

/// A gated job can outlive its worker (one killed with SIGKILL, in the
/// foreground): the gate opens when the test ends, before the spool and
/// its gate file go, and what still waits at it after the deadline is
/// killed, so that no test leaves a process looping on the machine.
impl Drop for Gate {
    fn drop(&mut self) {
        let _ = fs::write(&self.gate, "");
        let start = Instant::now();
        while !self.waiting().is_empty() && start.elapsed() < DEADLINE {
            std::thread::sleep(Duration::from_millis(10));
        }
        for pid in self.waiting() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A spool directory that outlives worker restarts.
pub struct Spool {
    dir: tempfile::TempDir,
}

impl Spool {
    /// A fresh, empty spool location.
    pub fn new() -> Self {
        Spool {
            dir: tempfile::Builder::new()
                .prefix("aice-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    /// A fresh spool location in a new directory under `parent`.
    pub fn new_in(parent: &Path) -> Self {
        Spool {
            dir: tempfile::Builder::new()
                .prefix("aice-test-")
                .tempdir_in(parent)
                .expect("tempdir"),
        }
    }

    /// The spool root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// A path in the test's scratch space, outside the spool.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sub-path of the spool.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    /// Writes a config file and returns its path.
    pub fn config(&self, toml: &str) -> PathBuf {
        let p = self.dir.path().join("config.toml");
        fs::write(&p, toml).expect("write config");
        p
    }

    /// Starts a worker on this spool with the given config text.
    pub fn start(&self, config: &str) -> Worker {
        Worker::start(self, config, &[])
    }

    /// Starts a worker with extra environment variables.
    pub fn start_with_env(&self, config: &str, env: &[(&str, &str)]) -> Worker {
        Worker::start(self, config, env)
    }

    /// Starts a worker from another copy of the binary (`bin`).
    pub fn start_binary(&self, bin: &Path, config: &str) -> Worker {
        Worker::start_inner_from(bin, self, config, &[], None, None)
    }

    /// Starts a worker in the cgroup (v2) at `cgroup`, as systemd starts
    /// one in its unit's (the test must be root).
    pub fn start_in_cgroup(&self, config: &str, cgroup: &Path) -> Worker {
        Worker::start_inner_from(Path::new(BIN), self, config, &[], None, Some(cgroup))
    }

    /// Starts a worker as another user (the test must be root).
    pub fn start_as(&self, config: &str, uid: u32, gid: u32) -> Worker {
        Worker::start_inner(self, config, &[], Some((uid, gid)))
    }

    /// Lets other users reach the spool (test directories are private).
    pub fn open_to_all(&self) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// Submits like an agent: write into tmp/, rename into pending/.
    pub fn drop_file(&self, name: &str, bytes: &[u8]) {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let tmp = self.path(&format!(
            "tmp/{name}.{}",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&tmp, bytes).expect("write job");
        fs::rename(&tmp, self.path(&format!("pending/{name}"))).expect("rename job");
    }

    /// Submits a JSON job with this id.
    pub fn submit_json(&self, id: &str, job: Value) {
        self.drop_file(&format!("{id}.json"), job.to_string().as_bytes());
    }

    /// Submits `{"command": cmd}` with this id.
    pub fn submit(&self, id: &str, cmd: &str) {
        self.submit_json(id, serde_json::json!({ "command": cmd }));
    }

    /// The result record of `id`, if there is one.
    pub fn result(&self, id: &str) -> Option<Value> {
        let text = fs::read_to_string(self.path(&format!("completed/{id}.json"))).ok()?;
        Some(serde_json::from_str(&text).expect("result is valid JSON"))
    }

    /// Waits for `completed/<id>.json` and returns it.
    pub fn wait_result(&self, id: &str) -> Value {
        wait_for(&format!("the result of {id}"), DEADLINE, || self.result(id))
    }

    /// Waits for a result of `id` that satisfies `pred`.
    pub fn wait_result_where(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(&format!("{what} for {id}"), DEADLINE, || {
            self.result(id).filter(|r| pred(r))
        })
    }

    /// The text of the log a result points to.
    pub fn log_of(&self, result: &Value) -> String {
        let rel = result["log"].as_str().expect("result has a log");
        fs::read_to_string(self.root().join(rel)).expect("log exists")
    }

    /// File names in a spool sub-directory, sorted.
    pub fn names(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path(rel))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// `logs/<shard>` of `id`, relative to the spool root.
    pub fn log_dir(&self, id: &str) -> String {
        let id = ai_cmd_executor::spool::JobId::new(id).expect("a valid id");
        format!("logs/{}", ai_cmd_executor::spool::log_shard(&id))
    }

    /// The logs of `id` (paths relative to the spool root), oldest first.
    pub fn logs_of(&self, id: &str) -> Vec<String> {
        let dir = self.log_dir(id);
        self.names(&dir)
            .into_iter()
            .filter(|n| n.strip_prefix(id).is_some_and(|rest| rest.starts_with('@')))
            .map(|n| format!("{dir}/{n}"))
            .collect()
    }

    /// Runs the CLI against this spool.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--spool")
            .arg(self.root())
            .args(args)
            .env_remove("AI_CMD_EXECUTOR_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("run the CLI")
    }
}

/// A running worker process. Dropping it kills it (SIGKILL), quietly.
pub struct Worker {
    child: Option<Child>,
    stderr: PathBuf,
    /// Exit status once it has exited.
    pub status: Option<ExitStatus>,
}

impl Worker {
    fn start(spool: &Spool, config: &str, env: &[(&str, &str)]) -> Worker {
        Worker::start_inner(spool, config, env, None)
    }

    fn start_inner(
        spool: &Spool,
        config: &str,
        env: &[(&str, &str)],
        ids: Option<(u32, u32)>,
    ) -> Worker {
        Worker::start_inner_from(Path::new(BIN), spool, config, env, ids, None)
    }

    fn start_inner_from(
        bin: &Path,
        spool: &Spool,
        config: &str,
        env: &[(&str, &str)],
        ids: Option<(u32, u32)>,
        cgroup: Option<&Path>,
    ) -> Worker {
        static N: AtomicU32 = AtomicU32::new(0);
        let cfg = spool.config(config);
        let stderr = spool.scratch(&format!(
            "worker-{}.stderr",
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = match cgroup {
            None => Command::new(bin),
            Some(dir) => {
                // A shell that enters the cgroup, then becomes the worker.
                let mut c = Command::new("/bin/sh");
                c.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
                    .arg(dir)
                    .arg(bin);
                c
            }
        };
        // Not under systemd unless a test says so (the later `envs` wins).
        for var in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "JOURNAL_STREAM",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        if let Some((uid, gid)) = ids {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .arg("--spool")
            .arg(spool.root())
            .env("RUST_LOG", "debug")
            .env_remove("AI_CMD_EXECUTOR_SPOOL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start the worker");
        let mut w = Worker {
            child: Some(child),
            stderr,
            status: None,
        };
        w.wait_log("worker ready");
        w
    }

    /// The worker's pid.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// What the worker has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the worker's log contains `needle`; panics early if the
    /// worker exits first.
    pub fn wait_log(&mut self, needle: &str) {
        let start = Instant::now();
        wait_for(&format!("worker log line {needle:?}"), DEADLINE, || {
            if self.log().contains(needle) {
                return Some(());
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "worker exited ({st}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            if start.elapsed() > DEADLINE {
                // The timeout's panic follows; say what was logged instead.
                eprintln!("the worker's log so far:\n{}", self.log());
            }
            None
        });
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal the worker");
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        self.wait_exit();
    }

    /// Waits for the worker to exit and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let st = wait_for("the worker to exit", DEADLINE, || {
            child.try_wait().expect("try_wait")
        });
        self.status = Some(st);
        st
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .is_some()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A token no other run uses, digits only (it can be the fraction of a
/// `sleep` argument, to find a test's processes by).
pub fn token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .subsec_nanos();
    format!("{:07}{nanos:09}", std::process::id() % 10_000_000)
}

/// Reads a pid written by a job into `path`.
pub fn read_pid(path: &Path) -> Option<Pid> {
    fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(Pid::from_raw)
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: Pid) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

pub mod installed;
pub mod sandbox;

/// A webhook receiver on `listener` (in a sandbox: `Sandbox::listen_inside`)
/// that records each request body.
pub fn webhook_on(
    listener: std::net::TcpListener,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            let mut stream = reader.into_inner();
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (url, bodies)
}

/// Run as root (as CI does), the worker and its jobs are `nobody`'s, as on
/// an installed host where they are the service user's: isolation matters
/// between processes of one unprivileged user (root's jobs can do anything).
pub fn as_nobody(spool: &Spool) -> Option<(u32, u32)> {
    as_uid(spool, 65534)
}

/// As [`as_nobody`], for a uid (and gid) of the caller's choosing: one no
/// other test uses when the test counts the user's processes.
pub fn as_uid(spool: &Spool, id: u32) -> Option<(u32, u32)> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    spool.open_to_all();
    ai_cmd_executor::spool::Spool::new(spool.root())
        .ensure_layout()
        .expect("layout");
    let scratch = spool.scratch("");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = std::process::Command::new("chown")
        .args(["-R", &format!("{id}:{id}")])
        .arg(spool.root())
        .arg(&scratch)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    Some((id, id))
}
