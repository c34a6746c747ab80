//! The sd_notify protocol, observed on a datagram socket the test binds as
//! `NOTIFY_SOCKET`: readiness, status, the watchdog heartbeat (which stops
//! while the worker is frozen and when its spool is unusable), reload and
//! stop.

mod common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{DEADLINE, Spool, wait_for};
use nix::sys::signal::Signal;

/// WATCHDOG_USEC given to the worker: it must ping every half of it.
const WATCHDOG: Duration = Duration::from_millis(400);

struct NotifySocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(spool: &Spool) -> Self {
        let path = spool.scratch("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket { sock, path }
    }

    /// The next message, or `None` after `within`.
    fn recv(&self, within: Duration) -> Option<(Instant, String)> {
        self.sock.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            )),
            Err(_) => None,
        }
    }

    /// Reads messages until one satisfies `pred`; returns it.
    fn until(&self, what: &str, pred: impl Fn(&str) -> bool) -> (Instant, String) {
        let start = Instant::now();
        loop {
            let left = DEADLINE
                .checked_sub(start.elapsed())
                .unwrap_or_else(|| panic!("no {what} within {DEADLINE:?}"));
            if let Some((t, m)) = self.recv(left.min(Duration::from_secs(1)))
                && pred(&m)
            {
                return (t, m);
            }
        }
    }

    /// Drops whatever is queued.
    fn drain(&self) {
        while self.recv(Duration::from_millis(1)).is_some() {}
    }
}

fn start(spool: &Spool, sock: &NotifySocket, config: &str) -> common::Worker {
    let usec = WATCHDOG.as_micros().to_string();
    spool.start_with_env(
        config,
        &[
            ("NOTIFY_SOCKET", sock.path.to_str().unwrap()),
            ("WATCHDOG_USEC", &usec),
        ],
    )
}

#[test]
fn ready_status_heartbeat_reload_and_stop() {
    let spool = Spool::new();
    let sock = NotifySocket::bind(&spool);
    let mut w = start(&spool, &sock, "");

    let (_, ready) = sock.until("READY=1", |m| m.contains("READY=1"));
    assert!(ready.contains("STATUS=idle; 0 pending, 0 done"), "{ready}");

    // Pings come every half of WATCHDOG_USEC: never a gap systemd would
    // punish, and not a busy stream either.
    let mut times = Vec::new();
    while times.len() < 8 {
        let (t, m) = sock.until("WATCHDOG=1", |m| m.contains("WATCHDOG=1"));
        assert_eq!(m.trim(), "WATCHDOG=1");
        times.push(t);
    }
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for g in &gaps {
        assert!(
            *g < WATCHDOG,
            "a ping came {g:?} after the last; the watchdog would fire at {WATCHDOG:?}: {gaps:?}"
        );
    }
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(mean >= WATCHDOG / 4, "pings too frequent: {gaps:?}");

    // STATUS follows the work.
    let gate = spool.scratch("gate");
    spool.submit(
        "busy",
        &format!("while [ ! -e {} ]; do sleep 0.01; done", gate.display()),
    );
    sock.until("a running status", |m| {
        m.contains("STATUS=running 1 job(s): busy;")
    });
    fs::write(&gate, "").unwrap();
    sock.until("an idle status", |m| {
        m.contains("STATUS=idle; 0 pending, 1 done, 0 failed")
    });

    w.signal(Signal::SIGHUP);
    let (t_reload, m) = sock.until("RELOADING=1", |m| m.contains("RELOADING=1"));
    assert!(m.contains("MONOTONIC_USEC="), "{m}");
    let (t_ready, _) = sock.until("READY=1 after the reload", |m| m.contains("READY=1"));
    assert!(t_ready >= t_reload);

    w.signal(Signal::SIGTERM);
    let (_, m) = sock.until("STOPPING=1", |m| m.contains("STOPPING=1"));
    assert!(m.contains("STATUS=stopping"), "{m}");
    assert!(w.wait_exit().success());
}

#[test]
fn heartbeat_stops_while_frozen_and_resumes_after() {
    let spool = Spool::new();
    let sock = NotifySocket::bind(&spool);
    let w = start(&spool, &sock, "");
    sock.until("the first ping", |m| m.contains("WATCHDOG=1"));

    w.signal(Signal::SIGSTOP);
    sock.drain();
    // Three watchdog periods with no ping: systemd would have fired.
    let silence = WATCHDOG * 3;
    if let Some((_, m)) = sock.recv(silence) {
        panic!("a stopped worker sent {m:?}");
    }
    w.signal(Signal::SIGCONT);
    sock.until("a ping after SIGCONT", |m| m.contains("WATCHDOG=1"));
    spool.submit("after", "true");
    assert_eq!(spool.wait_result("after")["status"], "succeeded");
}

#[test]
fn heartbeat_is_withheld_while_the_spool_is_unusable() {
    let spool = Spool::new();
    let sock = NotifySocket::bind(&spool);
    let mut w = start(&spool, &sock, "");
    sock.until("the first ping", |m| m.contains("WATCHDOG=1"));

    // Replace pending/ by a plain file while the worker is frozen, so it
    // cannot simply re-create the directory.
    w.signal(Signal::SIGSTOP);
    fs::rename(spool.path("pending"), spool.scratch("pending.old")).unwrap();
    fs::write(spool.path("pending"), "not a directory").unwrap();
    w.signal(Signal::SIGCONT);
    w.wait_log("watchdog ping withheld");
    sock.drain();
    if let Some((_, m)) = sock
        .recv(WATCHDOG * 2)
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
    {
        panic!("pinged with an unusable spool: {m:?}");
    }
    assert!(w.log().contains("is not a directory"), "{}", w.log());

    // Mend it: the worker re-creates the layout and pings again.
    fs::remove_file(spool.path("pending")).unwrap();
    sock.until("a ping after the repair", |m| m.contains("WATCHDOG=1"));
    wait_for("pending/ re-created", DEADLINE, || {
        spool.path("pending").is_dir().then_some(())
    });
    spool.submit("mended", "true");
    assert_eq!(spool.wait_result("mended")["status"], "succeeded");
}

#[test]
fn jobs_do_not_inherit_the_notify_socket() {
    let spool = Spool::new();
    let sock = NotifySocket::bind(&spool);
    let _w = start(&spool, &sock, "");
    spool.submit(
        "env",
        "echo \"[${NOTIFY_SOCKET-unset}] [${WATCHDOG_USEC-unset}]\"",
    );
    let r = spool.wait_result("env");
    assert_eq!(spool.log_of(&r), "[unset] [unset]\n");
}

#[test]
fn status_updates_are_few_while_busy_and_prompt_when_idle() {
    const JOBS: usize = 300;
    let spool = Spool::new();
    // Queued before the worker starts, so it stays busy from the first job
    // to the last.
    fs::create_dir_all(spool.path("tmp")).unwrap();
    fs::create_dir_all(spool.path("pending")).unwrap();
    for i in 0..JOBS {
        spool.drop_file(&format!("q{i:03}.json"), br#"{"command":"true"}"#);
    }
    let sock = NotifySocket::bind(&spool);
    let mut w = start(&spool, &sock, "");
    let (t_ready, _) = sock.until("READY=1", |m| m.contains("READY=1"));

    // Every turn of the loop changes the counts; systemd hears of it at
    // most about once a second, and at once when the worker goes idle.
    let done = format!("STATUS=idle; 0 pending, {JOBS} done, 0 failed");
    let mut statuses = 0;
    let t_idle = loop {
        let (t, m) = sock.until("a status", |m| m.contains("STATUS="));
        statuses += 1;
        if m.contains(&done) {
            break t;
        }
    };
    let busy = t_idle - t_ready;
    let allowed = 4 + 2 * busy.as_secs() as usize;
    assert!(
        statuses <= allowed,
        "{statuses} STATUS= updates in {busy:?} for {JOBS} jobs; at most {allowed} expected"
    );
    assert_eq!(spool.wait_result("q299")["status"], "succeeded");
    w.signal(Signal::SIGTERM);
    assert!(w.wait_exit().success());
}
