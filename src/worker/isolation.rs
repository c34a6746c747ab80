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
//! job. No code runs between `fork` and `exec`. Each slot keeps the next
//! job's thread ready, made while the current job runs.
//!
//! At `isolation = "full"` the same domain also keeps jobs out of the
//! spool: Landlock file rules grant every write right (creating, removing,
//! renaming, writing, truncating) beneath every directory *except* the
//! spool, so a job can read its results and logs but change nothing there.
//! Landlock can only allow, and beneath a directory: so the rules go on
//! each entry of `/` but the one that leads to the spool, then on each
//! entry of that directory but the next one, and so on down to the
//! spool's siblings. What is lost are the writes directly *into* those
//! parent directories (a new entry in `/var/lib`, say), which is why
//! `full` needs parents the worker's user cannot write anyway, as the
//! package's `/var/lib/ai-cmd-executor`'s are. An entry added to one of
//! those parents after the worker started is not writable by jobs until
//! the worker restarts.
//!
//! Landlock needs `no_new_privs` or `CAP_SYS_ADMIN` to restrict a thread:
//! a worker that is not root sets `no_new_privs` on that thread, so its
//! jobs cannot gain privileges through set-user-ID programs such as
//! `sudo` (the packaged unit has `NoNewPrivileges=yes` anyway).

use std::cell::RefCell;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use landlock::{
    ABI, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetError, Scope,
};
use rustix::fs::{Access, AtFlags, FileType, Mode, OFlags};

use crate::config::Isolation;

/// What the worker applies to each job, prepared once per configuration.
pub struct Confinement {
    /// The ruleset each job's thread restricts itself with; `None` at
    /// level `none`.
    ruleset: Option<RulesetCreated>,
    level: Isolation,
    /// Tells this confinement's ready threads from another's.
    id: u64,
}

/// The next [`Confinement`]'s id.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

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
        Confinement {
            ruleset: None,
            level: Isolation::None,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The confinement `want` asks for, for jobs of the spool at `spool`
    /// (and of the worker's cgroup subtree `cgroup`, which `full` keeps
    /// them out of too: a job must not raise its own limits or leave its
    /// cgroup). `Auto` takes the strongest level the host allows and
    /// returns, beside it, a warning that says what is missing and why
    /// when that is less than `full`; `Full` and `Process` fail when they
    /// cannot be had.
    pub fn new(
        want: Isolation,
        spool: &Path,
        cgroup: Option<&Path>,
    ) -> Result<(Confinement, Option<String>), String> {
        let at = |level, ruleset| Confinement {
            ruleset: Some(ruleset),
            level,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        };
        let refused = |level: Isolation| {
            move |why: String| format!("isolation = \"{level}\" cannot be had here: {why}")
        };
        match want {
            Isolation::None => Ok((Confinement::none(), None)),
            Isolation::Process => ruleset(None)
                .map(|r| (at(Isolation::Process, r), None))
                .map_err(refused(Isolation::Process)),
            Isolation::Full => ruleset(Some((spool, cgroup)))
                .map(|r| (at(Isolation::Full, r), None))
                .map_err(refused(Isolation::Full)),
            Isolation::Auto => Ok(match ruleset(Some((spool, cgroup))) {
                Ok(r) => (at(Isolation::Full, r), None),
                Err(no_guard) => match ruleset(None) {
                    Ok(r) => (
                        at(Isolation::Process, r),
                        Some(format!(
                            "jobs can change the spool (their own and other jobs' results and logs): {no_guard}; set isolation = \"process\" to accept that without this warning"
                        )),
                    ),
                    Err(why) => (
                        Confinement::none(),
                        Some(format!(
                            "jobs are not isolated from the worker, from each other or from the spool: {why}; set isolation = \"none\" to accept that without this warning"
                        )),
                    ),
                },
            }),
        }
    }

    /// The level in effect: `Full`, `Process` or `None`, never `Auto`.
    pub fn level(&self) -> Isolation {
        self.level
    }

    /// Runs `start` (which starts a job's process) on a thread confined to
    /// a domain of its own, so that the job and all it starts are in that
    /// domain; at level `none`, on this thread.
    ///
    /// The confined thread is made ahead: each calling thread (a slot)
    /// keeps one ready, made while its previous job ran, so creating the
    /// thread and its domain is off the path from claim to start.
    pub fn start<T: Send + 'static>(
        &self,
        start: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let Some(ruleset) = &self.ruleset else {
            return start();
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |confined| {
            let r = confined.map_err(io::Error::other).and_then(|()| start());
            let _ = tx.send(r);
        });
        let ready = SPARE.with(|s| s.borrow_mut().take());
        let spare = match ready {
            Some(spare) if spare.owner == self.id => spare,
            _ => Spare::new(ruleset, self.id)?,
        };
        spare
            .send
            .send(job)
            .map_err(|_| io::Error::other("the job's starting thread is gone"))?;
        let started = rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the job's starting thread panicked")));
        // The next job's thread, made while this one runs; if that fails,
        // the next start makes one itself (and reports why).
        if let Ok(next) = Spare::new(ruleset, self.id) {
            SPARE.with(|s| *s.borrow_mut() = Some(next));
        }
        started
    }
}

/// What a confined thread runs: given whether confining it worked.
type Job = Box<dyn FnOnce(Result<(), String>) + Send>;

thread_local! {
    /// This thread's confined thread, ready for its next job.
    static SPARE: RefCell<Option<Spare>> = const { RefCell::new(None) };
}

/// A thread that has confined itself to a new domain and waits to start
/// one job; it ends after that (or when its owner drops it).
struct Spare {
    send: mpsc::SyncSender<Job>,
    /// The [`Confinement`] whose ruleset it applied.
    owner: u64,
}

impl Spare {
    fn new(ruleset: &RulesetCreated, owner: u64) -> io::Result<Spare> {
        let ruleset = ruleset.try_clone()?;
        let (send, recv) = mpsc::sync_channel::<Job>(1);
        std::thread::Builder::new()
            .name("job-start".into())
            .stack_size(SPAWN_THREAD_STACK)
            .spawn(move || {
                let confined = ruleset
                    .restrict_self()
                    .map(drop)
                    .map_err(|e| format!("cannot confine the job (Landlock): {e}"));
                if let Ok(job) = recv.recv() {
                    job(confined);
                }
            })?;
        Ok(Spare { send, owner })
    }
}

/// The ruleset of level `process`, or with `spool` that of level `full`:
/// signals scoped to the domain, which also (as every Landlock domain
/// does) confines `ptrace` and `/proc` access; with `spool`, no write
/// beneath it (see the module's comment).
fn ruleset(spool: Option<(&Path, Option<&Path>)>) -> Result<RulesetCreated, String> {
    let guard = spool
        .map(|(spool, cgroup)| spool_guard(spool, cgroup))
        .transpose()?;
    let unsupported = |e: RulesetError| {
        format!(
            "the kernel does not offer Landlock signal scoping (Landlock ABI {} or later, Linux 6.12): {e}",
            ABI::V6 as i32
        )
    };
    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::HardRequirement);
    if guard.is_some() {
        ruleset = ruleset
            .handle_access(AccessFs::from_write(ABI::V6))
            .map_err(unsupported)?;
    }
    let mut created = ruleset
        .scope(Scope::Signal)
        .and_then(|r| r.create())
        .map_err(unsupported)?;
    if let Some(rules) = guard {
        created = created
            .add_rules(rules.into_iter().map(Ok::<_, RulesetError>))
            .map_err(|e| format!("the rules that keep jobs out of the spool: {e}"))?;
    }
    // Root may restrict itself without no_new_privs (CAP_SYS_ADMIN);
    // anyone else needs it.
    let root = nix::unistd::geteuid().is_root();
    Ok(created.no_new_privs(!root))
}

/// The rules that allow writing everywhere but beneath `spool` (and
/// `cgroup`): on every entry of each directory from `/` down to the
/// spool's parent, except the one that leads to the spool. Fails when one
/// of those directories is writable by this process (jobs would lose
/// writes it allows them).
fn spool_guard(spool: &Path, cgroup: Option<&Path>) -> Result<Vec<PathBeneath<OwnedFd>>, String> {
    let mut guarded = vec![resolve(spool)?];
    if let Some(c) = cgroup {
        guarded.push(resolve(c)?);
    }
    let mut rules = Vec::new();
    allow_all_but(Path::new("/"), &guarded, &mut rules)?;
    Ok(rules)
}

/// Adds to `rules` every entry of `dir` but those in `guarded` and those
/// above one (whose entries it goes through in turn).
fn allow_all_but(
    dir: &Path,
    guarded: &[PathBuf],
    rules: &mut Vec<PathBeneath<OwnedFd>>,
) -> Result<(), String> {
    let writable =
        rustix::fs::accessat(rustix::fs::CWD, dir, Access::WRITE_OK, AtFlags::EACCESS).is_ok();
    if writable {
        let what = if guarded[0].starts_with(dir) {
            "the spool's parent directory"
        } else {
            "the directory above the worker's cgroup"
        };
        return Err(format!(
            "{what} {} is writable by the worker's user, and keeping jobs out of the spool would stop them writing there; a spool under directories only root may write (as the package's /var/lib/ai-cmd-executor) can be guarded",
            dir.display()
        ));
    }
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let path = entry.path();
        if guarded.contains(&path) {
            continue;
        }
        if guarded.iter().any(|g| g.starts_with(&path)) {
            allow_all_but(&path, guarded, rules)?;
        } else if let Some(rule) = allow_beneath(&path) {
            rules.push(rule);
        }
    }
    Ok(())
}

/// `path` with every link resolved, as far as it exists yet (the worker
/// creates a missing spool after this).
fn resolve(path: &Path) -> Result<PathBuf, String> {
    let absolute = std::path::absolute(path)
        .map_err(|e| format!("cannot resolve the spool {}: {e}", path.display()))?;
    let mut missing = Vec::new();
    let mut at = absolute.as_path();
    loop {
        match fs::canonicalize(at) {
            Ok(mut real) => {
                real.extend(missing.iter().rev());
                return Ok(real);
            }
            Err(e) => match (at.parent(), at.file_name()) {
                (Some(parent), Some(name)) => {
                    missing.push(name.to_owned());
                    at = parent;
                }
                _ => return Err(format!("cannot resolve the spool {}: {e}", path.display())),
            },
        }
    }
}

/// A rule that allows every write beneath `path` (a directory), or to it
/// (any other file); none for a symbolic link, which is never followed
/// here (one could lead into the spool), or for what cannot be opened.
fn allow_beneath(path: &Path) -> Option<PathBeneath<OwnedFd>> {
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd).ok()?.st_mode);
    let access: BitFlags<AccessFs> = match kind {
        FileType::Symlink => return None,
        FileType::Directory => AccessFs::from_write(ABI::V6),
        _ => AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev,
    };
    Some(PathBeneath::new(fd, access))
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
        match Confinement::new(Isolation::Process, Path::new("/"), None) {
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
                let (c, why) = Confinement::new(Isolation::Auto, Path::new("/"), None).unwrap();
                assert_eq!(c.level(), Isolation::None);
                assert!(why.is_some());
            }
        }
    }
}
