//! Starting a job's process that needs more than `posix_spawn` offers: a
//! working directory, rlimits, a cgroup. glibc 2.36 (Debian 12) has no
//! `posix_spawn` attribute for a directory or a cgroup, and `fork` copies
//! the worker's page tables, which costs about a millisecond per job here.
//! So this does what glibc's `posix_spawn` does: a clone with `CLONE_VM |
//! CLONE_VFORK` on a stack of its own, whose child runs only
//! async-signal-safe calls on data prepared before it exists, then
//! `execve`. The calling thread is suspended until the child has called
//! `execve` or exited, and signals are blocked around it, so no handler of
//! the worker runs in the child.
//!
//! A job with a cgroup is created in it (`clone3` with
//! `CLONE_INTO_CGROUP`, Linux 5.7), which costs less than moving the child
//! there; glibc 2.36 exports no `clone3`, so on x86_64 a few instructions
//! of assembly start the child on its stack. Where `clone3` is refused (an
//! older kernel, a seccomp filter), or on other architectures, the child
//! moves itself into the cgroup before `exec` instead.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

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
    /// The directory of the cgroup to start in, open.
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

/// Everything the child uses, built before it exists.
struct Child<'a> {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdin: RawFd,
    out: RawFd,
    cwd: Option<*const libc::c_char>,
    rlimits: Rlimits,
    /// The cgroup to move into, when the child was not created in it.
    enter: Option<RawFd>,
    /// Written by the child (it shares this memory) when a step fails:
    /// errno << 8 | step.
    failed: &'a AtomicI32,
}

/// `clone3` was refused once: the fallback is used from then on.
static NO_CLONE3: AtomicBool = AtomicBool::new(false);

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
    let failed = AtomicI32::new(0);
    let mut child = Child {
        path: path.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        stdin,
        out,
        cwd: setup.cwd.as_ref().map(|c| c.as_ptr()),
        rlimits: setup.rlimits,
        enter: setup.cgroup,
        failed: &failed,
    };
    // 16-byte aligned, as the ABI wants the stack.
    let mut stack = vec![0u128; STACK / 16];
    let mut old = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    let mut started = None;
    if let Some(dir) = setup.cgroup
        && !NO_CLONE3.load(Ordering::Relaxed)
    {
        child.enter = None;
        match clone3_into(dir, &mut stack, &child) {
            Ok(pid) => started = Some(Ok(pid)),
            Err(e) => {
                // Not offered here (an old kernel, a seccomp filter): the
                // child moves itself from now on. Another error is this
                // start's, and the fallback says what it is.
                let refused = [libc::ENOSYS, libc::EPERM, libc::EINVAL, libc::E2BIG];
                if e.raw_os_error().is_some_and(|n| refused.contains(&n)) {
                    NO_CLONE3.store(true, Ordering::Relaxed);
                }
                child.enter = setup.cgroup;
            }
        }
    }
    let started = started.unwrap_or_else(|| {
        // SAFETY: the bytes of a `u128` buffer are valid `u8`s.
        #[allow(unsafe_code)]
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(stack.as_mut_ptr().cast::<u8>(), stack.len() * 16)
        };
        let run = Box::new(|| -> isize {
            #[allow(unsafe_code)]
            // SAFETY: see `run_child`.
            unsafe {
                run_child(&child)
            }
        });
        #[allow(unsafe_code)]
        // SAFETY: the child runs `run` on `bytes`, which outlive it (the
        // parent resumes only once the child has called `execve` or
        // exited); see `run_child` for what it does.
        unsafe {
            clone(
                run,
                bytes,
                CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
                Some(libc::SIGCHLD),
            )
        }
        .map_err(io::Error::from)
    });
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

/// The child: signals back to their defaults, its own process group, its
/// cgroup (unless it was created in it), its descriptors, directory and
/// rlimits, then `execve`.
///
/// # Safety
///
/// Runs in the child, which shares the parent's memory while the parent
/// waits (`CLONE_VFORK`): it allocates nothing, takes no lock and calls
/// only async-signal-safe functions on data built before the clone; every
/// path ends in `execve` or `_exit`.
#[allow(unsafe_code)]
unsafe fn run_child(c: &Child<'_>) -> ! {
    unsafe {
        let fail = |step: i32| -> ! {
            c.failed
                .store(*libc::__errno_location() << 8 | step, Ordering::Relaxed);
            libc::_exit(127)
        };
        // No handler of the worker may run here: caught signals go back to
        // their default (ignored ones stay ignored, but SIGPIPE, which the
        // Rust runtime ignores and a shell job expects).
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
        if let Some(dir) = c.enter {
            let procs = libc::openat(
                dir,
                c"cgroup.procs".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if procs < 0 || libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                fail(2);
            }
            libc::close(procs);
        }
        if libc::dup2(c.stdin, 0) < 0 || libc::dup2(c.out, 1) < 0 || libc::dup2(c.out, 2) < 0 {
            fail(3);
        }
        if let Some(dir) = c.cwd
            && libc::chdir(dir) != 0
        {
            fail(4);
        }
        if c.rlimits.apply().is_err() {
            fail(5);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(c.path, c.argv, c.envp);
        fail(6)
    }
}

/// `struct clone_args` of `clone3(2)`, up to `cgroup`.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// The child's entry on its own stack, from the `clone3` below.
#[allow(unsafe_code)]
extern "C" fn child_entry(c: *const Child<'_>) -> ! {
    // SAFETY: `c` points at the parent's `Child`, alive while it waits.
    unsafe { run_child(&*c) }
}

/// Starts `c` with `clone3(CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP)`
/// in the cgroup whose directory is open as `cgroup`, on `stack`.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn clone3_into(cgroup: RawFd, stack: &mut [u128], c: &Child<'_>) -> io::Result<Pid> {
    const SYS_CLONE3: i64 = 435;
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let mut args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.as_mut_ptr() as u64,
        stack_size: (stack.len() * 16) as u64,
        cgroup: u64::try_from(cgroup).map_err(io::Error::other)?,
        ..CloneArgs::default()
    };
    let ret: i64;
    // SAFETY: `clone3` starts the child with its stack pointer at the top
    // of `stack` (16-byte aligned) and every register but rax, rcx and r11
    // as they were: it calls `child_entry(c)`, which never returns, and
    // the parent, suspended until the child has called `execve` or exited,
    // carries on past label 2 with the child's pid (or -errno) in rax.
    // `stack` and `c` outlive the child's use of them for that reason.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r13",
            "call r12",
            "ud2",
            "2:",
            inlateout("rax") SYS_CLONE3 => ret,
            in("rdi") &mut args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") child_entry as extern "C" fn(*const Child<'_>) -> !,
            in("r13") c as *const Child<'_>,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(
            i32::try_from(-ret).unwrap_or(libc::EINVAL),
        ));
    }
    Ok(Pid::from_raw(i32::try_from(ret).map_err(io::Error::other)?))
}

/// Elsewhere, always the fallback.
#[cfg(not(target_arch = "x86_64"))]
fn clone3_into(_: RawFd, _: &mut [u128], _: &Child<'_>) -> io::Result<Pid> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}
