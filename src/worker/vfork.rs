//! Starting a job's process that needs more than `posix_spawn` offers: a
//! working directory, rlimits, a cgroup to enter. glibc 2.36 (Debian 12)
//! has no `posix_spawn` attribute for a directory or a cgroup, and `fork`
//! copies the worker's page tables, which costs about a millisecond per
//! job here. So this does what glibc's `posix_spawn` does: a `clone` with
//! `CLONE_VM | CLONE_VFORK` on a stack of its own, whose child runs only
//! async-signal-safe calls on data prepared before it exists, then `execve`.
//! The calling thread is suspended until the child has called `execve` or
//! exited, and signals are blocked around it, so no handler of the worker
//! runs in the child.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::libc;
use nix::sched::{CloneFlags, clone};
use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use super::limits::Rlimits;

/// The child's stack: it only makes system calls through libc.
const STACK: usize = 64 << 10;

/// What the child sets up before `execve`, besides its group, its signals
/// and its standard descriptors.
#[derive(Default)]
pub(super) struct Setup {
    /// The working directory.
    pub cwd: Option<CString>,
    pub rlimits: Rlimits,
    /// `cgroup.procs` of the cgroup to enter, open for writing.
    pub cgroup: Option<RawFd>,
}

impl Setup {
    /// Whether `posix_spawn` can do it all.
    pub fn is_plain(&self) -> bool {
        self.cwd.is_none() && self.rlimits.is_empty() && self.cgroup.is_none()
    }
}

/// The steps the child can fail at, for the error the parent returns.
const STEPS: [&str; 7] = [
    "",
    "setting its process group",
    "entering its cgroup",
    "connecting its input and output",
    "changing to its working directory",
    "setting its resource limits",
    "starting the shell",
];

/// Starts `path` with `argv` and `envp` in a new process group, its
/// standard input from `stdin` and its output and errors into `out`, with
/// `setup` applied. Returns the child's pid once it has called `execve`.
pub(super) fn spawn(
    path: &CStr,
    argv: &[CString],
    envp: &[&CStr],
    stdin: RawFd,
    out: RawFd,
    setup: &Setup,
) -> io::Result<Pid> {
    let argv_p: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_p: Vec<*const libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let cwd = setup.cwd.as_ref().map(|c| c.as_ptr());
    let (cgroup, rlimits) = (setup.cgroup, setup.rlimits);
    // Written by the child (it shares this memory) when a step fails:
    // errno << 8 | step.
    let failed = AtomicI32::new(0);
    let mut stack = vec![0u8; STACK];
    let child = Box::new(|| -> isize {
        #[allow(unsafe_code)]
        // SAFETY: this runs in the child, which shares the parent's memory
        // while the parent waits (CLONE_VFORK): it allocates nothing, takes
        // no lock and calls only async-signal-safe functions on data built
        // before the clone; every path ends in `execve` or `_exit`.
        unsafe {
            let fail = |step: i32| -> ! {
                failed.store(*libc::__errno_location() << 8 | step, Ordering::Relaxed);
                libc::_exit(127)
            };
            // No handler of the worker may run here: caught signals go back
            // to their default (ignored ones stay ignored, but SIGPIPE,
            // which the Rust runtime ignores and a shell job expects).
            let mut action: libc::sigaction = std::mem::zeroed();
            for sig in 1..libc::SIGRTMAX() {
                if libc::sigaction(sig, std::ptr::null(), &mut action) != 0 {
                    continue;
                }
                let handler = action.sa_sigaction;
                if (handler != libc::SIG_IGN && handler != libc::SIG_DFL) || sig == libc::SIGPIPE {
                    let mut default: libc::sigaction = std::mem::zeroed();
                    default.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(sig, &default, std::ptr::null_mut());
                }
            }
            if libc::setpgid(0, 0) != 0 {
                fail(1);
            }
            if let Some(fd) = cgroup
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                fail(2);
            }
            if libc::dup2(stdin, 0) < 0 || libc::dup2(out, 1) < 0 || libc::dup2(out, 2) < 0 {
                fail(3);
            }
            if let Some(dir) = cwd
                && libc::chdir(dir) != 0
            {
                fail(4);
            }
            if rlimits.apply().is_err() {
                fail(5);
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
            fail(6)
        }
    });
    let mut old = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    #[allow(unsafe_code)]
    // SAFETY: the child runs `child` on `stack`, which outlives it (the
    // parent resumes only once the child has called `execve` or exited);
    // see the child's own comment for what it does.
    let started = unsafe {
        clone(
            child,
            &mut stack,
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
    let pid = started?;
    match failed.load(Ordering::Relaxed) {
        0 => Ok(pid),
        code => {
            let _ = waitpid(pid, None);
            let e = io::Error::from_raw_os_error(code >> 8);
            let what = match code & 0xff {
                4 => format!(
                    "changing to its working directory {}",
                    setup
                        .cwd
                        .as_deref()
                        .map_or_else(String::new, |d| d.to_string_lossy().into_owned())
                ),
                6 => path.to_string_lossy().into_owned(),
                step => STEPS.get(step as usize).copied().unwrap_or("").to_owned(),
            };
            Err(io::Error::new(e.kind(), format!("{what}: {e}")))
        }
    }
}
