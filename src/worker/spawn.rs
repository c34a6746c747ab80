//! Starting a job's process and waiting for it.
//!
//! A job is started with `posix_spawn` (a `vfork`-style clone, as
//! `std::process::Command` uses too), from an environment built once per
//! configuration rather than captured and copied at every spawn, and it is
//! followed through a pidfd by the slot thread that started it, then
//! reaped with `wait4` for its resource usage. The pidfd also means no
//! `SIGCHLD` handler: a child's exit costs the worker one readiness event,
//! not a signal delivery. A job with a `cwd`, rlimits or a cgroup goes
//! through [`super::vfork`], the same kind of start with those steps in
//! the child.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use super::isolation::Confinement;
use super::limits::Rlimits;
use super::reaper;
use super::vfork::{self, Setup};
use crate::spool::Usage;

/// Variables of the worker's own environment that must not leak into jobs:
/// they describe the worker's relation to systemd, not the job's.
const PRIVATE_ENV: [&str; 6] = [
    super::handover::ENV,
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "LISTEN_FDS",
];

/// What every job is started with: its environment before the job's own
/// variables, `/dev/null` for its stdin, and its isolation.
pub(super) struct Spawner {
    /// The worker's environment less [`PRIVATE_ENV`], as `KEY=VALUE`.
    base_c: Arc<Vec<CString>>,
    dev_null: io::Result<File>,
    confinement: std::sync::Arc<Confinement>,
}

/// What to start.
pub(super) struct Spec<'a> {
    /// The job's id, which the started process is registered under.
    pub id: &'a str,
    pub shell: &'a Path,
    /// The arguments after the shell's own name.
    pub args: [&'a OsStr; 2],
    pub argc: usize,
    /// The job's own variables, then the worker's (`AI_CMD_EXECUTOR_*`);
    /// both override the inherited environment.
    pub env: &'a BTreeMap<String, String>,
    pub extra_env: [(&'a str, &'a str); 2],
    pub cwd: Option<&'a Path>,
    /// Set in the child before `exec`.
    pub rlimits: Rlimits,
    /// The job's cgroup (its directory, open), which the child starts in;
    /// `None` where the worker has no cgroup subtree.
    pub cgroup: Option<OwnedFd>,
    /// That cgroup's directory, which the reaper follows the job by.
    pub cgroup_dir: Option<PathBuf>,
}

impl Spawner {
    /// Takes the worker's environment and opens `/dev/null`; jobs are
    /// started under `confinement`.
    pub fn new(confinement: std::sync::Arc<Confinement>) -> Self {
        let base_c = Arc::new(
            std::env::vars_os()
                .filter(|(k, _)| !PRIVATE_ENV.iter().any(|p| OsStr::new(p) == k))
                .filter_map(|(k, v)| env_entry(k.as_bytes(), v.as_bytes()))
                .collect(),
        );
        Spawner {
            base_c,
            dev_null: File::open("/dev/null"),
            confinement,
        }
    }

    /// Starts `spec` in a new process group, stdin from `/dev/null`,
    /// stdout and stderr into one pipe (so they interleave in the order
    /// written). Returns the child and the pipe's read end, which does not
    /// block.
    pub fn spawn(&self, spec: Spec<'_>) -> io::Result<(Child, File)> {
        let dev_null = match &self.dev_null {
            Ok(f) => f,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot open /dev/null: {e}"),
                ));
            }
        };
        let (id, cgroup_dir) = (spec.id, spec.cgroup_dir.clone());
        let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        fcntl(&rd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        let launch = self.launch(spec, dev_null.as_raw_fd(), wr)?;
        let spawning = reaper::spawning();
        // `dev_null` outlives the start: `start` returns once the process
        // has been started.
        let pid = self.confinement.start(move || launch.run())?;
        let child = Child::track(pid)?;
        spawning.started(pid, id, cgroup_dir);
        Ok((child, File::from(rd)))
    }

    /// What `posix_spawn` needs for `spec`, owned, so that another thread
    /// can start it.
    fn launch(&self, spec: Spec<'_>, stdin: RawFd, out: OwnedFd) -> io::Result<Launch> {
        let argv0 = cstring(spec.shell.as_os_str(), "the shell path")?;
        let mut argv: Vec<CString> = vec![argv0];
        for a in &spec.args[..spec.argc] {
            argv.push(cstring(a, "the command")?);
        }
        let own: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(spec.extra_env)
            .map(|(k, v)| {
                env_entry(k.as_bytes(), v.as_bytes()).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("environment variable {k:?} contains a NUL byte"),
                    )
                })
            })
            .collect::<io::Result<_>>()?;
        let setup = Setup {
            cwd: spec
                .cwd
                .map(|d| cstring(d.as_os_str(), "the working directory"))
                .transpose()?,
            rlimits: spec.rlimits,
            cgroup: spec.cgroup.as_ref().map(AsRawFd::as_raw_fd),
        };
        Ok(Launch {
            shell: spec.shell.to_owned(),
            argv,
            base: Arc::clone(&self.base_c),
            own,
            stdin,
            out,
            setup,
            _cgroup: spec.cgroup,
        })
    }
}

/// A job's process, ready to be started from any thread (the job's
/// confined starting thread): with `posix_spawn`, or for a job that needs
/// more set up in the child (a `cwd`, rlimits, a cgroup) with
/// [`vfork::spawn`].
struct Launch {
    shell: PathBuf,
    argv: Vec<CString>,
    /// The worker's environment less [`PRIVATE_ENV`]; entries the job
    /// sets itself (in `own`) are left out.
    base: Arc<Vec<CString>>,
    own: Vec<CString>,
    /// `/dev/null`, open for as long as the start takes.
    stdin: RawFd,
    /// The output pipe's write end: closed here once the child has it,
    /// so the reader sees end-of-file once the job's processes close
    /// theirs.
    out: OwnedFd,
    setup: Setup,
    /// The cgroup's directory that `setup` names, open until the start.
    _cgroup: Option<OwnedFd>,
}

impl Launch {
    fn run(self) -> io::Result<Pid> {
        let name = |entry: &CStr| -> Vec<u8> {
            let bytes = entry.to_bytes();
            bytes.split(|b| *b == b'=').next().unwrap_or(b"").to_vec()
        };
        let set: Vec<Vec<u8>> = self.own.iter().map(|e| name(e)).collect();
        let envp: Vec<&CStr> = self
            .base
            .iter()
            .map(CString::as_c_str)
            .filter(|e| !set.contains(&name(e)))
            .chain(self.own.iter().map(CString::as_c_str))
            .collect();
        if !self.setup.is_plain() {
            let path = &self.argv[0];
            return vfork::spawn(
                path,
                &self.argv,
                &envp,
                self.stdin,
                self.out.as_raw_fd(),
                &self.setup,
            );
        }
        let mut actions = PosixSpawnFileActions::init()?;
        actions.add_dup2(self.stdin, 0)?;
        actions.add_dup2(self.out.as_raw_fd(), 1)?;
        actions.add_dup2(self.out.as_raw_fd(), 2)?;
        let mut attr = PosixSpawnAttr::init()?;
        attr.set_flags(
            PosixSpawnFlags::POSIX_SPAWN_SETPGROUP
                | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
                | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
        )?;
        attr.set_pgroup(Pid::from_raw(0))?;
        attr.set_sigmask(&SigSet::empty())?;
        // The Rust runtime ignores SIGPIPE, and an ignored signal stays
        // ignored across exec; a shell job expects the default.
        let mut sigdef = SigSet::empty();
        sigdef.add(Signal::SIGPIPE);
        attr.set_sigdefault(&sigdef)?;
        let pid = posix_spawn(self.shell.as_path(), &actions, &attr, &self.argv, &envp);
        drop(self.out);
        pid.map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: {e}", self.shell.display()),
            )
        })
    }
}

/// A started job process, waited for through its pidfd.
pub(super) struct Child {
    pid: Pid,
    pidfd: OwnedFd,
}

impl Child {
    /// Follows `pid`, a child of this process, through a pidfd; a child
    /// that cannot be followed is killed and reaped.
    pub(super) fn track(pid: Pid) -> io::Result<Self> {
        let opened = rustix::process::Pid::from_raw(pid.as_raw())
            .ok_or_else(|| io::Error::other("posix_spawn returned pid 0"))
            .and_then(|p| {
                rustix::process::pidfd_open(p, rustix::process::PidfdFlags::NONBLOCK)
                    .map_err(io::Error::from)
            });
        match opened {
            Ok(pidfd) => Ok(Child { pid, pidfd }),
            Err(e) => {
                // It cannot be followed (out of file descriptors, say): stop
                // it rather than leave it running unaccounted for.
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                Err(io::Error::new(
                    e.kind(),
                    format!("cannot follow the started process: {e}"),
                ))
            }
        }
    }

    /// The process id, which is also its process group id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The pidfd: readable once the process has ended.
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Reaps the process if it has ended: how it ended, and what it and
    /// the descendants it waited for used.
    pub fn try_wait(&self) -> io::Result<Option<(ExitStatus, Usage)>> {
        loop {
            match wait4_nohang(self.pid) {
                Err(Errno::EINTR) => {}
                r => return r.map_err(io::Error::from),
            }
        }
    }
}

/// `wait4(pid, WNOHANG)`: the exit status and resource usage of `pid`, a
/// child of this process, if it has ended. Neither nix nor rustix offers
/// the rusage of one child (`getrusage(RUSAGE_CHILDREN)` sums every child
/// the process ever reaped, so it cannot tell parallel jobs apart).
fn wait4_nohang(pid: Pid) -> Result<Option<(ExitStatus, Usage)>, Errno> {
    use nix::libc;
    #[allow(unsafe_code)]
    // SAFETY: `status` and `usage` are locals that live across the call and
    // are valid to write: `wait4` fills them and keeps no pointer to them.
    // An all-zero `rusage` is a valid value (it is only integers).
    let (ret, status, usage) = unsafe {
        let mut status: libc::c_int = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        let ret = libc::wait4(pid.as_raw(), &mut status, libc::WNOHANG, &mut usage);
        (ret, status, usage)
    };
    match Errno::result(ret)? {
        0 => Ok(None),
        _ => Ok(Some((ExitStatus::from_raw(status), usage_of(&usage)))),
    }
}

/// The result's usage fields from a `rusage` (`ru_maxrss` is in KiB).
fn usage_of(ru: &nix::libc::rusage) -> Usage {
    let ms = |tv: &nix::libc::timeval| {
        let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
        let micros = u64::try_from(tv.tv_usec).unwrap_or(0);
        secs.saturating_mul(1000).saturating_add(micros / 1000)
    };
    Usage {
        cpu_user_ms: Some(ms(&ru.ru_utime)),
        cpu_system_ms: Some(ms(&ru.ru_stime)),
        max_rss_bytes: Some(
            u64::try_from(ru.ru_maxrss)
                .unwrap_or(0)
                .saturating_mul(1024),
        ),
        memory_peak_bytes: None,
    }
}

fn env_entry(key: &[u8], value: &[u8]) -> Option<CString> {
    let mut entry = Vec::with_capacity(key.len() + value.len() + 1);
    entry.extend_from_slice(key);
    entry.push(b'=');
    entry.extend_from_slice(value);
    CString::new(entry).ok()
}

fn cstring(s: &OsStr, what: &str) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Read;
    use std::path::PathBuf;

    /// Reads the job's output to its end, then reaps it.
    fn run(spawner: &Spawner, spec: Spec<'_>) -> (ExitStatus, String) {
        let (child, mut out) = spawner.spawn(spec).unwrap();
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
                    poll(&mut fds, PollTimeout::NONE).unwrap();
                }
                Err(e) => panic!("reading the output: {e}"),
            }
        }
        loop {
            if let Some((status, _)) = child.try_wait().unwrap() {
                return (status, String::from_utf8(bytes).unwrap());
            }
            let mut fds = [PollFd::new(child.exit_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::NONE).unwrap();
        }
    }

    fn spec<'a>(
        shell: &'a Path,
        command: &'a str,
        env: &'a BTreeMap<String, String>,
        cwd: Option<&'a Path>,
    ) -> Spec<'a> {
        Spec {
            id: "j1",
            shell,
            args: [OsStr::new("-c"), OsStr::new(command)],
            argc: 2,
            env,
            extra_env: [
                ("AI_CMD_EXECUTOR_JOB_ID", "j1"),
                ("AI_CMD_EXECUTOR_ATTEMPT", "1"),
            ],
            cwd,
            rlimits: Rlimits::default(),
            cgroup: None,
            cgroup_dir: None,
        }
    }

    #[test]
    fn both_paths_give_the_same_environment_group_and_status() {
        let spawner = Spawner::new(std::sync::Arc::new(Confinement::none()));
        let shell = PathBuf::from("/bin/sh");
        let mut env = BTreeMap::new();
        env.insert("JOB_VAR".to_owned(), "x y".to_owned());
        // A job's variable overrides an inherited one.
        env.insert("PATH".to_owned(), "/usr/bin:/bin".to_owned());
        let cmd = r#"echo "$JOB_VAR|$AI_CMD_EXECUTOR_JOB_ID|$AI_CMD_EXECUTOR_ATTEMPT|$PATH"; env | grep -c '^PATH='; [ "$(ps -o pgid= $$ | tr -d ' ')" = "$$" ] && echo own-group; read -r x || echo stdin-empty; echo err >&2; exit 3"#;
        let dir = tempfile::tempdir().unwrap();
        for cwd in [None, Some(dir.path())] {
            let (status, out) = run(&spawner, spec(&shell, cmd, &env, cwd));
            assert_eq!(status.code(), Some(3), "{out}");
            assert_eq!(
                out, "x y|j1|1|/usr/bin:/bin\n1\nown-group\nstdin-empty\nerr\n",
                "cwd {cwd:?}"
            );
        }
    }

    #[test]
    fn a_signal_is_reported_and_a_missing_shell_is_an_error() {
        let spawner = Spawner::new(std::sync::Arc::new(Confinement::none()));
        let env = BTreeMap::new();
        let shell = PathBuf::from("/bin/sh");
        let (status, _) = run(&spawner, spec(&shell, "kill -TERM $$", &env, None));
        assert_eq!(status.signal(), Some(libc_sigterm()));
        let missing = PathBuf::from("/nonexistent/shell");
        let err = spawner
            .spawn(spec(&missing, "true", &env, None))
            .err()
            .expect("no such shell");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("/nonexistent/shell"), "{err}");
        // The same through the start that sets up more in the child, and
        // each step's failure is named.
        let tmp = tempfile::tempdir().unwrap();
        let err = spawner
            .spawn(spec(&missing, "true", &env, Some(tmp.path())))
            .err()
            .expect("no such shell");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("/nonexistent/shell"), "{err}");
        let gone = tmp.path().join("gone");
        let err = spawner
            .spawn(spec(&shell, "true", &env, Some(&gone)))
            .err()
            .expect("no such directory");
        let want = format!("changing to its working directory {}: ", gone.display());
        assert!(err.to_string().starts_with(&want), "{err}");
    }

    fn libc_sigterm() -> i32 {
        Signal::SIGTERM as i32
    }
}
