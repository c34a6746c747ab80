//! Tier 3: a throwaway systemd, booted with `systemd-nspawn --boot` on an
//! overlay whose lower layer is this machine's own `/` and whose upper
//! layer is a tmpfs, entered with `nsenter`. Nothing it does reaches the
//! real root: writes land in the tmpfs, which is unmounted afterwards.
//!
//! Never boot systemd on the real root: its boot-time tmpfiles run wipes
//! `/tmp` and more.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::wait_for;

/// Whether tier 3 must run (CI, or `AI_CMD_EXECUTOR_TIER3=require`): then a
/// missing sandbox is a failure, not a skip.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("AI_CMD_EXECUTOR_TIER3").is_ok_and(|v| v == "require")
}

/// Why a sandbox cannot be booted here, if it cannot.
fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    for tool in ["systemd-nspawn", "nsenter", "mount"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install systemd-container)"
            ));
        }
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        return Some("systemd is not installed".into());
    }
    None
}

/// Runs `cmd`, panicking with its output if it fails.
/// Lets the sandbox's processes use Landlock (see [`Sandbox::boot`]).
const LANDLOCK_CALLS: &str =
    "--system-call-filter=landlock_create_ruleset landlock_add_rule landlock_restrict_self";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Takes the sandbox lock and mounts a tmpfs-backed overlay of `/`.
/// Returns (lock, base, root). `nspawn --keep-unit` puts the container in
/// the caller's cgroup, so two at once would share one and confuse both
/// systemds: one sandbox at a time, across processes too.
fn overlay(test: &str) -> (std::fs::File, PathBuf, PathBuf) {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/var/tmp/aice-sandbox.lock")
        .expect("open the sandbox lock");
    lock.lock().expect("take the sandbox lock");
    let base = PathBuf::from(format!(
        "/var/tmp/aice-sandbox-{}-{test}",
        std::process::id()
    ));
    let root = base.join("root");
    std::fs::create_dir_all(&base).expect("create sandbox base");
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "mode=0755,size=2G", "tmpfs"])
        .arg(&base));
    for d in ["upper", "work", "root"] {
        std::fs::create_dir(base.join(d)).expect("create overlay dirs");
    }
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir=/,upperdir={},workdir={}",
            base.join("upper").display(),
            base.join("work").display()
        ))
        .arg(&root));
    forget_host_install(&root);
    (lock, base, root)
}

/// What an earlier install of this project on the machine itself may have
/// left (a cron file, a configuration, units, a spool): removed from the
/// overlay (the host keeps them), so every test starts from a root that
/// has never seen the project.
const HOST_LEFTOVERS: &[&str] = &[
    "etc/ai-cmd-executor",
    "etc/cron.d/ai-cmd-executor",
    "etc/systemd/system/ai-cmd-executor.service",
    "etc/systemd/system/ai-cmd-executor.service.d",
    "etc/systemd/system/ai-cmd-executor-health.service",
    "etc/systemd/system/ai-cmd-executor-health.timer",
    "etc/systemd/system/ai-cmd-executor-cleanup.service",
    "etc/systemd/system/ai-cmd-executor-cleanup.timer",
    "etc/systemd/system/ai-cmd-executor-alert@.service",
    "etc/systemd/system/multi-user.target.wants/ai-cmd-executor.service",
    "etc/systemd/system/timers.target.wants/ai-cmd-executor-health.timer",
    "etc/systemd/system/timers.target.wants/ai-cmd-executor-cleanup.timer",
    "usr/local/bin/ai-cmd-executor",
    "var/lib/ai-cmd-executor",
];

fn forget_host_install(root: &Path) {
    for rel in HOST_LEFTOVERS {
        let p = root.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p).expect("clearing a host leftover"),
            Ok(_) => std::fs::remove_file(&p).expect("clearing a host leftover"),
            Err(_) => {}
        }
    }
}

/// The sandbox's default target: the basic system (journald, tmpfiles,
/// timers, sockets), D-Bus and logind, and nothing the host enabled for
/// `multi-user.target` (a database, a mail server, cron), which the tests
/// do not need and which could hang the boot (a port taken, say).
const TARGET: &str = "[Unit]
Description=ai-cmd-executor tier-3 sandbox
Requires=basic.target
Wants=dbus.service systemd-logind.service
After=basic.target dbus.service systemd-logind.service
AllowIsolate=yes
";

/// Makes [`TARGET`] the default target of the overlay at `root`.
fn minimal_target(root: &Path) {
    let dir = root.join("etc/systemd/system");
    std::fs::write(dir.join("aice-sandbox.target"), TARGET).expect("writing the sandbox target");
    let default = dir.join("default.target");
    let _ = std::fs::remove_file(&default);
    std::os::unix::fs::symlink("aice-sandbox.target", &default)
        .expect("setting the default target");
}

fn unmount(root: &Path, base: &Path) {
    for m in [root, base] {
        let clean = Command::new("umount")
            .arg(m)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !clean {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
    let _ = std::fs::remove_dir(base);
}

/// Whether tier 3 can run; prints the skip notice (or fails, in CI) if not.
pub fn available(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) => {
            if required() {
                panic!("tier 3 is required here (CI) but cannot run: {why}");
            }
            // Written past the test harness's capture, so it is always seen.
            let _ = writeln!(
                std::io::stderr(),
                "NOTICE: tier-3 system test {test} SKIPPED: {why} (set CI=true to make this a failure)"
            );
            false
        }
    }
}

/// Runs `script` (bash) as root in a namespace on an overlay of `/` where
/// systemd is NOT running (`systemd-nspawn --as-pid2`, no `--boot`), then
/// throws the overlay away. `None` when tier 3 is skipped.
pub fn run_without_systemd(test: &str, binds: &[&Path], script: &str) -> Option<Output> {
    if !available(test) {
        return None;
    }
    let (_lock, base, root) = overlay(test);
    let mut cmd = Command::new("systemd-nspawn");
    cmd.args([
        "--as-pid2",
        LANDLOCK_CALLS,
        "--register=no",
        "--keep-unit",
        "--quiet",
        "--console=pipe",
    ])
    .arg("-D")
    .arg(&root)
    .arg(format!("--machine=aice-{}", std::process::id() % 100_000));
    for b in binds {
        cmd.arg(format!("--bind-ro={}", b.display()));
    }
    cmd.args(["/bin/bash", "-c", script]).stdin(Stdio::null());
    let out = cmd.output().expect("run systemd-nspawn");
    unmount(&root, &base);
    Some(out)
}

/// How long a sandbox may take to boot.
const BOOT_DEADLINE: Duration = Duration::from_secs(60);

/// A booted throwaway systemd.
pub struct Sandbox {
    _lock: std::fs::File,
    base: PathBuf,
    root: PathBuf,
    nspawn: Option<Child>,
    leader: i32,
}

impl Sandbox {
    /// Boots a sandbox, or returns `None` after printing why tier 3 is
    /// skipped (a failure instead when [`required`]). `binds` are host
    /// directories made visible at the same path inside (read-only).
    pub fn boot(test: &str, binds: &[&Path]) -> Option<Sandbox> {
        if !available(test) {
            return None;
        }
        let (lock, base, root) = overlay(test);
        minimal_target(&root);
        let mut sb = Sandbox {
            _lock: lock,
            base,
            root: root.clone(),
            nspawn: None,
            leader: 0,
        };
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args([
            "--boot",
            // Its own network namespace (loopback only): nothing in it can
            // clash with the host's services, nor another sandbox's.
            "--private-network",
            // nspawn's own system-call filter (systemd 252) predates
            // Landlock; a host's services have it, so the sandbox must too.
            LANDLOCK_CALLS,
            "--register=no",
            "--keep-unit",
            "--console=passive",
            "--quiet",
        ])
        .arg("-D")
        .arg(&root)
        .arg(format!("--machine=aice-{}", std::process::id() % 100_000))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        for b in binds {
            cmd.arg(format!("--bind-ro={}", b.display()));
        }
        let child = cmd.spawn().expect("start systemd-nspawn");
        let nspawn_pid = child.id() as i32;
        sb.nspawn = Some(child);
        sb.leader = wait_for("the sandbox's PID 1", Duration::from_secs(30), || {
            child_named(nspawn_pid, "systemd")
        });
        let booting = Instant::now();
        let state = loop {
            let out = sb.sh("systemctl is-system-running");
            let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if matches!(s.as_str(), "running" | "degraded") {
                break s;
            }
            if booting.elapsed() > BOOT_DEADLINE {
                let jobs = sb.sh("systemctl list-jobs --no-pager; systemctl --failed --no-legend --plain --no-pager");
                panic!(
                    "the sandbox did not finish booting in {BOOT_DEADLINE:?} (state {s:?}); jobs still queued and failed units:\n{}{}",
                    String::from_utf8_lossy(&jobs.stdout),
                    String::from_utf8_lossy(&jobs.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if state == "degraded" {
            let failed = sb.sh("systemctl --failed --no-legend --plain");
            let _ = writeln!(
                std::io::stderr(),
                "note: sandbox booted degraded:\n{}",
                String::from_utf8_lossy(&failed.stdout)
            );
        }
        Some(sb)
    }

    /// Runs a shell script inside, as root; returns its output.
    pub fn sh(&self, script: &str) -> Output {
        self.sh_input(script, b"")
    }

    /// `/bin/sh -c script` inside, as root, with a clean environment.
    fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.leader.to_string(),
            "-a",
            "/bin/sh",
            "-c",
            script,
        ])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    }

    /// Runs a shell script inside with `input` on its stdin.
    pub fn sh_input(&self, script: &str, input: &[u8]) -> Output {
        let mut child = self
            .command(script)
            .stdin(Stdio::piped())
            .spawn()
            .expect("nsenter");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
        child.wait_with_output().expect("nsenter output")
    }

    /// Starts a shell script inside without waiting for it.
    pub fn sh_spawn(&self, script: &str) -> Child {
        self.command(script)
            .stdin(Stdio::null())
            .spawn()
            .expect("nsenter")
    }

    /// Runs a script that must succeed; returns its stdout, trimmed.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the sandbox, `{script}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Writes a file inside (parents created).
    pub fn write(&self, path: &str, content: &str) {
        let script = format!("mkdir -p \"$(dirname '{path}')\" && cat > '{path}'");
        let out = self.sh_input(&script, content.as_bytes());
        assert!(
            out.status.success(),
            "writing {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A TCP listener on the sandbox's loopback, `127.0.0.1:<port>` inside
    /// (the sandbox has a network namespace of its own): for a webhook the
    /// sandbox's services can reach. A socket stays in the namespace it was
    /// made in, so a thread enters the namespace only to make it.
    pub fn listen_inside(&self) -> std::net::TcpListener {
        let ns = format!("/proc/{}/ns/net", self.leader);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).expect("opening the sandbox's network namespace");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("entering the sandbox's network namespace");
            std::net::TcpListener::bind("127.0.0.1:0").expect("listening in the sandbox")
        })
        .join()
        .expect("the listening thread")
    }

    /// A `systemctl show` property of a unit.
    pub fn prop(&self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -p {prop} --value {unit}"))
    }

    /// Waits until `script` succeeds and prints something satisfying `pred`.
    pub fn wait_until(
        &self,
        what: &str,
        deadline: Duration,
        script: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        wait_for(what, deadline, || {
            let out = self.sh(script);
            let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            (out.status.success() && pred(&s)).then_some(s)
        })
    }
}

/// A direct child of `parent` whose command name is `name`.
fn child_named(parent: i32, name: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((comm_part, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = comm_part.split_once('(').map_or("", |(_, c)| c);
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) && comm == name {
            return Some(pid);
        }
    }
    None
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            if self.leader > 0 {
                let _ = self.sh("systemctl poweroff --no-block");
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        unmount(&self.root, &self.base);
    }
}
