//! Keeping each job away from the worker and from the other jobs.
//!
//! At `isolation = "process"` each job starts in a Landlock domain of its
//! own, scoped for signals (Landlock ABI 6, Linux 6.12). A process in a
//! Landlock domain can signal, `ptrace` and open the `/proc/PID/{mem,
//! environ,…}` of processes only in its own domain or ones nested in it:
//! a job (and everything it starts) can no longer `kill -9 $PPID`, attach
//! to the worker, read the worker's environment, or reach another job,
//! although they all run under one user. The worker, outside any domain,
//! still signals and reaps its jobs.
//!
//! A domain applies to a thread and to what it starts afterwards, and
//! never comes off. So the worker confines a short-lived thread per job
//! (built from one ruleset prepared at start) and starts the job from it
//! with `posix_spawn`, as before; the slot thread, unconfined, follows the
//! job. No code runs between `fork` and `exec`.
//!
//! Landlock needs `no_new_privs` or `CAP_SYS_ADMIN` to restrict a thread:
//! a worker that is not root sets `no_new_privs` on that thread, so its
//! jobs cannot gain privileges through set-user-ID programs such as
//! `sudo` (the packaged unit has `NoNewPrivileges=yes` anyway).

use std::io;

use landlock::{
    ABI, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, Scope,
};

use crate::config::Isolation;

/// What the worker applies to each job, prepared once per configuration.
pub struct Confinement {
    /// The ruleset each job's thread restricts itself with; `None` at
    /// level `none`.
    ruleset: Option<RulesetCreated>,
}

impl std::fmt::Debug for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confinement")
            .field("level", &self.level())
            .finish()
    }
}

/// The stack of a job's starting thread: it only calls `posix_spawn` (or
/// `Command::spawn`), which runs the child on a stack of its own.
const SPAWN_THREAD_STACK: usize = 256 << 10;

impl Confinement {
    /// No isolation.
    pub fn none() -> Confinement {
        Confinement { ruleset: None }
    }

    /// The confinement `want` asks for. `Auto` takes the strongest level
    /// the kernel supports and returns, beside it, why that is less than
    /// `process`; `Process` fails when the kernel cannot do it.
    pub fn new(want: Isolation) -> Result<(Confinement, Option<String>), String> {
        match want {
            Isolation::None => Ok((Confinement::none(), None)),
            Isolation::Process => process_ruleset()
                .map(|r| (Confinement { ruleset: Some(r) }, None))
                .map_err(|why| format!("isolation = \"process\" cannot be had here: {why}")),
            Isolation::Auto => Ok(match process_ruleset() {
                Ok(r) => (Confinement { ruleset: Some(r) }, None),
                Err(why) => (Confinement::none(), Some(why)),
            }),
        }
    }

    /// The level in effect: `Process` or `None`, never `Auto`.
    pub fn level(&self) -> Isolation {
        if self.ruleset.is_some() {
            Isolation::Process
        } else {
            Isolation::None
        }
    }

    /// Runs `start` (which starts a job's process) on a new thread confined
    /// to a domain of its own, so that the job and all it starts are in
    /// that domain; at level `none`, on this thread.
    pub fn start<T: Send>(&self, start: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let Some(ruleset) = &self.ruleset else {
            return start();
        };
        let ruleset = ruleset.try_clone()?;
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("job-start".into())
                .stack_size(SPAWN_THREAD_STACK)
                .spawn_scoped(scope, move || {
                    ruleset.restrict_self().map_err(|e| {
                        io::Error::other(format!("cannot confine the job (Landlock): {e}"))
                    })?;
                    start()
                })?;
            thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the job's starting thread panicked")))
        })
    }
}

/// The ruleset of level `process`: signals scoped to the domain, which
/// also (as every Landlock domain does) confines `ptrace` and `/proc`
/// access. Nothing of the file system is restricted.
fn process_ruleset() -> Result<RulesetCreated, String> {
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .scope(Scope::Signal)
        .and_then(|r| r.create())
        .map_err(|e| {
            format!(
                "the kernel does not offer Landlock signal scoping (Landlock ABI {} or later, Linux 6.12): {e}",
                ABI::V6 as i32
            )
        })?;
    // Root may restrict itself without no_new_privs (CAP_SYS_ADMIN);
    // anyone else needs it.
    let root = nix::unistd::geteuid().is_root();
    Ok(ruleset.no_new_privs(!root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_runs_on_this_thread_and_reports_none() {
        let c = Confinement::none();
        assert_eq!(c.level(), Isolation::None);
        let here = std::thread::current().id();
        assert_eq!(c.start(|| Ok(std::thread::current().id())).unwrap(), here);
    }

    #[test]
    fn process_confines_another_thread_or_says_why_not() {
        match Confinement::new(Isolation::Process) {
            Ok((c, why)) => {
                assert!(why.is_none());
                assert_eq!(c.level(), Isolation::Process);
                let here = std::thread::current().id();
                let there = c.start(|| Ok(std::thread::current().id())).unwrap();
                assert_ne!(there, here, "the confined thread is a new one");
                // This thread stays outside any domain: it can still
                // signal this process (signal 0 checks permission only).
                nix::sys::signal::kill(nix::unistd::getpid(), None).unwrap();
            }
            Err(why) => {
                assert!(why.contains("Landlock"), "{why}");
                let (c, why) = Confinement::new(Isolation::Auto).unwrap();
                assert_eq!(c.level(), Isolation::None);
                assert!(why.is_some());
            }
        }
    }
}
