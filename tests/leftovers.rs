//! Tier 2: nothing a job starts outlives it (issue 19, point 1). The
//! worker is a child subreaper: when a job's main process ends (it exits,
//! or times out, or the worker stops), whatever the job started — in its
//! process group or out of it (`setsid`, `nohup`, a double fork) — gets
//! SIGTERM at once and SIGKILL once `kill_grace` has passed. While a job
//! runs, an orphan tied to it (by its process group, or by its
//! `AI_CMD_EXECUTOR_JOB_ID`) is left alone; one tied to no running job is
//! killed at once.
//!
//! The processes a test's jobs start are `sleep 100<k>.<token>`, with a
//! token of the test's own. The job gets it as `$LEFTOVER_MARK` in its
//! environment, so only the sleepers (and the shells wrapped around them)
//! carry it on their command line, never the job's own shell; every
//! process of the job but those started under `env -i` carries it in its
//! environment. A test finds them through `/proc/*/cmdline` and
//! `/proc/*/environ`, and kills what is left when it ends (the job's own
//! shell too, should a failing test leave it waiting at its gate).

mod common;

use std::fs;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{DEADLINE, Gate, Spool, alive, read_pid, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The grace every test here configures, as the config writes it.
const KILL_GRACE_CONFIG: &str = "kill_grace = \"1s\"\n";
/// The same grace, for the deadlines.
const KILL_GRACE: Duration = Duration::from_secs(1);
/// What a leftover may take beyond `kill_grace` to be gone (scans, a slow
/// machine).
const MARGIN: Duration = Duration::from_secs(5);

/// The variable that carries a test's token into its jobs.
const MARK_VAR: &str = "LEFTOVER_MARK";

/// Live processes (zombies left out) for which `pick` holds, given their
/// command line (arguments joined by spaces) and their environment
/// (`NAME=value` entries; empty where it cannot be read): their pid and
/// command line.
fn processes_where(pick: impl Fn(&str, &[&[u8]]) -> bool) -> Vec<(Pid, String)> {
    let me = std::process::id() as i32;
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw)
                .trim_end_matches('\0')
                .replace('\0', " ");
            let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let environ: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
            let pid = Pid::from_raw(pid);
            (pick(&cmdline, &environ) && alive(pid)).then_some((pid, cmdline))
        })
        .collect()
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: Pid) -> Option<Pid> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace()
        .nth(1)?
        .parse()
        .ok()
        .map(Pid::from_raw)
}

/// The marked processes of one test. Dropping it kills whatever of them
/// is still running, so a failing test leaves nothing behind.
struct Marks {
    token: String,
}

impl Marks {
    /// A token no other test, and no other run, uses: digits only (it is
    /// the fraction of a `sleep` argument), of a fixed length (so that no
    /// token is the start of another).
    fn new() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("a clock after 1970")
            .subsec_nanos();
        Marks {
            token: format!(
                "{:07}{:03}{nanos:09}",
                std::process::id() % 10_000_000,
                SEQ.fetch_add(1, Ordering::Relaxed) % 1000
            ),
        }
    }

    /// A job running `command` with the token in its environment.
    fn job(&self, command: &str) -> Value {
        json!({ "command": command, "env": { (MARK_VAR): self.token } })
    }

    /// The command line of sleeper `k`, as it runs.
    fn sleeper(&self, k: u32) -> String {
        format!("sleep {}.{}", 1000 + k, self.token)
    }

    /// The pid of sleeper `k`, if it runs.
    fn running(&self, k: u32) -> Option<Pid> {
        let want = self.sleeper(k);
        processes_where(|cmdline, _| cmdline == want)
            .first()
            .map(|&(pid, _)| pid)
    }

    /// Waits until every sleeper in `ks` runs.
    fn wait_running(&self, ks: &[u32]) {
        wait_for(&format!("sleepers {ks:?} to run"), DEADLINE, || {
            ks.iter().all(|&k| self.running(k).is_some()).then_some(())
        });
    }

    /// Every live process that carries the token: on its command line
    /// (the sleepers and the shells around them, even under `env -i`) or
    /// in its environment (every process of the job that kept it, the
    /// job's own shell included).
    fn survivors(&self) -> Vec<(Pid, String)> {
        let arg = format!(".{}", self.token);
        let var = format!("{MARK_VAR}={}", self.token);
        processes_where(|cmdline, environ| {
            cmdline.contains(&arg) || environ.contains(&var.as_bytes())
        })
    }

    /// Waits, for at most `within` and a [`MARGIN`], until the processes
    /// `which` picks are gone; panics listing those left, saying what
    /// they outlived.
    fn wait_gone_where(&self, within: Duration, outlived: &str, which: impl Fn(&str) -> bool) {
        let start = Instant::now();
        let limit = within + MARGIN;
        // `wait_for` only backs this up: the loop ends at `limit`, with
        // what is left, so that the panic can list it.
        let left = wait_for(&format!("leftovers of {outlived}"), limit + MARGIN, || {
            let left: Vec<_> = self
                .survivors()
                .into_iter()
                .filter(|(_, cmdline)| which(cmdline))
                .collect();
            (left.is_empty() || start.elapsed() > limit).then_some(left)
        });
        assert!(
            left.is_empty(),
            "still running {:?} after {outlived}: {left:#?}",
            start.elapsed()
        );
    }

    /// Waits, for at most `within` and a [`MARGIN`], until no marked
    /// process is left.
    fn wait_all_gone(&self, within: Duration, outlived: &str) {
        self.wait_gone_where(within, outlived, |_| true);
    }
}

impl Drop for Marks {
    fn drop(&mut self) {
        for (pid, _) in self.survivors() {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// `sleep 100<k>.$LEFTOVER_MARK` in a job's command.
fn sleep(k: u32) -> String {
    format!("sleep {}.${MARK_VAR}", 1000 + k)
}

/// A shell that ignores SIGTERM (so does its `sleep`, which inherits the
/// ignored signal) around sleeper `k`; the job's shell expands the mark, so
/// the wrapper carries the token too, even under `env -i`.
fn stubborn(k: u32) -> String {
    format!("sh -c \"trap '' TERM; {}\"", sleep(k))
}

#[test]
fn a_job_that_exits_takes_everything_it_started_with_it() {
    let marks = Marks::new();
    let spool = Spool::new();
    let _worker = spool.start(KILL_GRACE_CONFIG);
    let gate = Gate::new(&spool);
    let quiet = ">/dev/null 2>&1";
    let command = format!(
        "nohup {nohup} {quiet} &
         setsid {setsid} {quiet} &
         ( {double} {quiet} & )
         ( setsid {setsid_double} {quiet} & )
         {stubborn} {quiet} &
         ( setsid {stubborn_setsid_double} {quiet} & )
         {gate}
         exit 0",
        nohup = sleep(1),
        setsid = sleep(2),
        double = sleep(3),
        setsid_double = sleep(4),
        stubborn = stubborn(5),
        stubborn_setsid_double = stubborn(6),
        gate = gate.command("main"),
    );
    spool.submit_json("leaver", marks.job(&command));
    gate.wait_started(1);
    marks.wait_running(&[1, 2, 3, 4, 5, 6]);

    gate.open();
    let r = spool.wait_result("leaver");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["exit_code"], 0, "{r}");
    marks.wait_all_gone(
        KILL_GRACE,
        "the job's result (nohup, setsid, double fork, SIGTERM ignored)",
    );
}

#[test]
fn a_timed_out_job_takes_a_setsid_child_that_ignores_sigterm_with_it() {
    let marks = Marks::new();
    let spool = Spool::new();
    let _worker = spool.start(KILL_GRACE_CONFIG);
    // The stubborn shell writes its pid: proof that it ran, however
    // quickly it is gone.
    let pidfile = spool.scratch("stubborn.pid");
    let command = format!(
        "( setsid sh -c \"trap '' TERM; echo \\$\\$ > {pidfile}; {sleeper}\" >/dev/null 2>&1 & )
         ( setsid {plain} >/dev/null 2>&1 & )
         sleep 300",
        pidfile = pidfile.display(),
        sleeper = sleep(1),
        plain = sleep(2),
    );
    let mut job = marks.job(&command);
    job["timeout_secs"] = json!(2);
    spool.submit_json("slow", job);

    let r = spool.wait_result("slow");
    assert_eq!(r["status"], "timed_out", "{r}");
    let stubborn = read_pid(&pidfile).expect("the stubborn child wrote its pid");
    marks.wait_all_gone(KILL_GRACE, "the timed-out job's result");
    assert!(!alive(stubborn), "the stubborn child {stubborn} still runs");
}

#[test]
fn a_stopped_worker_exits_only_once_its_jobs_leftovers_are_gone() {
    let marks = Marks::new();
    let spool = Spool::new();
    let mut worker = spool.start(&format!("stop_grace = \"1s\"\n{KILL_GRACE_CONFIG}"));
    let gate = Gate::new(&spool);
    let command = format!(
        "( setsid {stubborn_setsid} >/dev/null 2>&1 & )
         ( setsid {plain} >/dev/null 2>&1 & )
         {stubborn_in_group} >/dev/null 2>&1 &
         {gate}",
        stubborn_setsid = stubborn(1),
        plain = sleep(2),
        stubborn_in_group = stubborn(3),
        gate = gate.command("held"),
    );
    spool.submit_json("held", marks.job(&command));
    gate.wait_started(1);
    marks.wait_running(&[1, 2, 3]);

    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit();
    // Right after the exit, not after a wait: the worker waits for them.
    let left = marks.survivors();
    assert!(
        left.is_empty(),
        "the worker exited, its job's leftovers still run: {left:#?}\n{}",
        worker.log()
    );
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

#[test]
fn a_running_jobs_orphans_live_and_untied_orphans_die_at_once() {
    let marks = Marks::new();
    let spool = Spool::new();
    let worker = spool.start(&format!("max_parallel = 2\n{KILL_GRACE_CONFIG}"));
    let gate = Gate::new(&spool);
    // 1: tied by the process group; 2: by AI_CMD_EXECUTOR_JOB_ID;
    // 3 and 4 (SIGTERM ignored): by nothing (new session, no environment).
    // All four double-forked, so that they are orphans while the job runs.
    // The untied ones' pids are written by the subshell that starts them,
    // before it exits and orphans them: proof that they ran, however
    // quickly they are gone (an orphan can be killed before its first
    // command). After the gate the job says, itself, which of them it
    // still sees.
    let untied_pids = [spool.scratch("untied-3.pid"), spool.scratch("untied-4.pid")];
    let command = format!(
        "( {group} >/dev/null 2>&1 & )
         ( setsid {env} >/dev/null 2>&1 & )
         ( env -i setsid sh -c \"exec {untied}\" >/dev/null 2>&1 & echo $! > {pid3} )
         ( env -i setsid sh -c \"trap '' TERM; {untied_stubborn}\" >/dev/null 2>&1 & echo $! > {pid4} )
         {gate}
         for k in 1 2 3 4; do
           if pgrep -f \"^sleep 100$k\\.${MARK_VAR}\\$\" >/dev/null; then echo \"100$k: alive\"; else echo \"100$k: gone\"; fi
         done",
        group = sleep(1),
        env = sleep(2),
        pid3 = untied_pids[0].display(),
        untied = sleep(3),
        pid4 = untied_pids[1].display(),
        untied_stubborn = sleep(4),
        gate = gate.command("keeper"),
    );
    spool.submit_json("keeper", marks.job(&command));
    gate.wait_started(1);
    marks.wait_running(&[1, 2]);
    let untied: Vec<Pid> = untied_pids
        .iter()
        .map(|p| wait_for("an untied orphan's pid", DEADLINE, || read_pid(p)))
        .collect();

    // The untied orphans are killed while their job still runs.
    let untied_lines = [marks.sleeper(3), marks.sleeper(4)];
    marks.wait_gone_where(
        KILL_GRACE,
        "they were orphaned with no tie to a running job",
        |cmdline| untied_lines.iter().any(|u| cmdline.contains(u.as_str())),
    );
    for pid in untied {
        assert!(!alive(pid), "the untied orphan {pid} still runs");
    }
    assert!(spool.result("keeper").is_none(), "the job still runs");

    // Another job ending (a scan of orphans) does not touch the first
    // job's tied orphans either.
    spool.submit("quick", "true");
    assert_eq!(spool.wait_result("quick")["status"], "succeeded");

    // The tied orphans live, as children of the worker (a subreaper).
    for k in [1, 2] {
        let pid = marks
            .running(k)
            .unwrap_or_else(|| panic!("orphan {} was killed while its job ran", marks.sleeper(k)));
        assert_eq!(
            parent_of(pid),
            Some(worker.pid()),
            "orphan {} is not the worker's child",
            marks.sleeper(k)
        );
    }

    gate.open();
    let r = spool.wait_result("keeper");
    assert_eq!(r["status"], "succeeded", "{r}");
    let log = spool.log_of(&r);
    for line in ["1001: alive", "1002: alive", "1003: gone", "1004: gone"] {
        assert!(log.contains(line), "{line:?} not in the job's log:\n{log}");
    }
    // And once the job is over, its tied orphans go too.
    marks.wait_all_gone(KILL_GRACE, "the result of the job that left them");
}
