//! Alerts that say what failed, once per incident.
//!
//! The alert path (`notify`, which `OnFailure=` runs, and the incident
//! alerts of the health timer) reads only what it needs: the `[notify]`
//! table, read past mistakes elsewhere in the configuration
//! ([`Config::load_notify`]), or the systemd credential `webhook` when not
//! even that table can be read. A broken configuration therefore does not
//! silence the alert that the same broken configuration caused. With no
//! notifier at all, the alert is a journal entry at priority err with
//! [`message_id::ALERT`].
//!
//! What was alerted is kept in [`INCIDENTS_DIR`], so that the health timer,
//! which runs every few minutes, tells of an incident once, and not again
//! when `OnFailure=` already did.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tracing::error;

use crate::config::Config;
use crate::health::{Ctx, Finding, Level};
use crate::logging::message_id;
use crate::notifier::{Event, Notifier, NotifyError};
use crate::systemd::bus::ServiceInfo;
use crate::systemd::units::SERVICE;

/// Where the alerts already sent are recorded: root's alone, under `/run`,
/// so that it can be written while the disk is full, and empty after a
/// reboot (an incident that outlives one is told again, once). Never in
/// the spool, which jobs can write. The alert and health units name it in
/// `RuntimeDirectory=` (with `RuntimeDirectoryPreserve=yes`).
pub const INCIDENTS_DIR: &str = "/run/ai-cmd-executor-alerts";

/// The file in [`INCIDENTS_DIR`]: a JSON object, incident kind → the
/// incident alerted.
const INCIDENTS_FILE: &str = "incidents.json";

/// systemd's `MESSAGE_ID` of "job finished" ("Failed to start …" when it
/// failed): it says that a start failed, never why.
const SYSTEMD_JOB_DONE: &str = "39f53479d3a045ac8e11786248231fbf";

/// Longest last error quoted in an alert, in characters.
const LAST_ERROR_CHARS: usize = 500;

/// The last error the journal holds for `unit` since `since_usec` (wall
/// clock, microseconds since the epoch; 0: no bound): the newest entry at
/// priority err or worse from the unit's processes or from systemd about
/// it, leaving out systemd's "Failed to start" (which says that, not why)
/// and the alerts themselves. `None` when there is none, or the journal
/// cannot be read.
pub fn last_error(unit: &str, since_usec: u64) -> Option<String> {
    let mut cmd = Command::new("journalctl");
    cmd.args([
        "--no-pager",
        "-q",
        "-o",
        "json",
        "-p",
        "err",
        "-n",
        "50",
        "--output-fields=MESSAGE,MESSAGE_ID,JOB_RESULT",
        "-u",
        unit,
    ]);
    if since_usec > 0 {
        cmd.arg(format!("--since=@{}", since_usec / 1_000_000));
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    newest_error(&String::from_utf8_lossy(&out.stdout))
}

/// Whether systemd gave up on `s`, the service `unit`: its start-rate
/// limit (`StartLimitBurst=`) stopped the automatic restarts. systemd 252
/// leaves `Result` at the last exit's cause then, and the restart count
/// falls short of the burst when the run of starts began with a start by
/// hand; what tells is systemd's own word in the journal ("Start request
/// repeated too quickly.") since the unit was last started.
pub fn hit_start_limit(unit: &str, s: &ServiceInfo) -> bool {
    if s.hit_start_limit() {
        return true;
    }
    if s.unit.active_state != "failed" {
        return false;
    }
    let since = if s.inactive_exit_timestamp != 0 {
        s.inactive_exit_timestamp
    } else {
        s.inactive_enter_timestamp.saturating_sub(2_000_000)
    };
    let out = Command::new("journalctl")
        .args([
            "--no-pager",
            "-q",
            "-o",
            "json",
            "--output-fields=MESSAGE,__REALTIME_TIMESTAMP",
            "_PID=1",
        ])
        .arg(format!("UNIT={unit}"))
        .arg(format!("--since=@{}", since / 1_000_000))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
            v["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.contains("Start request repeated too quickly"))
                && v["__REALTIME_TIMESTAMP"]
                    .as_str()
                    .and_then(|t| t.parse::<u64>().ok())
                    .is_some_and(|t| t >= since)
        })
    })
}

/// The newest telling entry of `journalctl -o json` output (oldest first).
fn newest_error(json_lines: &str) -> Option<String> {
    json_lines.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let id = v["MESSAGE_ID"].as_str().unwrap_or_default();
        if id == SYSTEMD_JOB_DONE || id == message_id::ALERT || !v["JOB_RESULT"].is_null() {
            return None;
        }
        let text = match &v["MESSAGE"] {
            serde_json::Value::String(s) => s.clone(),
            // Not UTF-8: journalctl gives the bytes.
            serde_json::Value::Array(bytes) => String::from_utf8_lossy(
                &bytes
                    .iter()
                    .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect::<Vec<u8>>(),
            )
            .into_owned(),
            _ => return None,
        };
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.is_empty() {
            return None;
        }
        Some(match text.char_indices().nth(LAST_ERROR_CHARS) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text,
        })
    })
}

/// A systemd wall-clock time (microseconds since the epoch; 0: none), for
/// people.
fn when(usec: u64) -> Option<String> {
    (usec != 0).then(|| {
        humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_micros(usec))
            .to_string()
    })
}

/// What failed, for people: the unit, its state and result, since when,
/// whether systemd gave up on it (`start_limit`: see [`hit_start_limit`]),
/// and its last error (`last_error`: see [`last_error`]).
pub fn describe_failure(
    unit: &str,
    s: &ServiceInfo,
    start_limit: bool,
    last_error: Option<&str>,
) -> String {
    let mut m = format!("{unit} is {}", s.describe());
    if let Some(t) = when(s.inactive_enter_timestamp).filter(|_| s.unit.active_state == "failed") {
        m.push_str(&format!(" since {t}"));
    }
    if s.n_restarts > 0 {
        m.push_str(&format!(", after {} restart(s)", s.n_restarts));
    }
    if start_limit {
        m.push_str(": it hit its start limit and systemd gave up");
    }
    match last_error {
        Some(e) => m.push_str(&format!("; last error: {e}")),
        None => m.push_str("; its journal holds no error"),
    }
    m
}

/// How an alert went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Posted to the webhook.
    Posted,
    /// No notifier is configured: the alert is the journal entry.
    Journal,
}

/// Sends `event` through the notifier of the configuration's `[notify]`
/// table, read leniently from `config_path` (`None`: the default file), or
/// of the `webhook` credential when the configuration is broken and that
/// table cannot be read. A broken configuration is named in the message.
/// With no notifier, the alert is logged at priority err with
/// [`message_id::ALERT`]; a notifier that fails is an error, and the alert
/// is logged so too.
pub fn deliver(config_path: Option<&Path>, mut event: Event) -> Result<Delivery, NotifyError> {
    let setting = Config::load_notify(config_path);
    if let Some(broken) = &setting.broken {
        event.message.push_str(&format!(
            " (and the configuration is broken: {}; `ai-cmd-executor config check` shows the mistake)",
            crate::error::chain(broken)
        ));
    }
    let notifier = match (&setting.notify, &setting.broken) {
        (Some(n), _) => Notifier::new(n).map(Some),
        (None, Some(_)) => Notifier::from_credential(),
        (None, None) => Ok(None),
    };
    let sent = match notifier {
        Ok(None) => {
            log(&event, None);
            return Ok(Delivery::Journal);
        }
        Ok(Some(n)) => n.send(&event),
        Err(e) => Err(e),
    };
    match sent {
        Ok(()) => Ok(Delivery::Posted),
        Err(e) => {
            log(&event, Some(&e));
            Err(e)
        }
    }
}

/// The alert as a journal entry at priority err (a line on stderr outside
/// the journal).
fn log(event: &Event, failed: Option<&NotifyError>) {
    let mut text = format!("alert: {}", event.message);
    for a in &event.actions {
        text.push_str(&format!("; {a}"));
    }
    match failed {
        None => error!(
            message_id = message_id::ALERT,
            alert_unit = %event.unit,
            alert_event = %event.event,
            "{text} (no notifier is configured: [notify] in the config)"
        ),
        Some(e) => error!(
            message_id = message_id::ALERT,
            alert_unit = %event.unit,
            alert_event = %event.event,
            "{text} (the notifier failed: {})",
            crate::error::chain(e)
        ),
    }
}

/// The alerts already sent, by incident: see [`INCIDENTS_DIR`]. Holds an
/// exclusive lock on the directory while it lives, so that two alerts
/// (the health timer's and `OnFailure=`'s) do not both send one incident.
///
/// The directory is opened once, with `O_NOFOLLOW`, and must be this
/// user's, writable by no one else; its file is read and written relative
/// to it with `O_NOFOLLOW` (and created with `O_EXCL`), so no link is
/// followed. (Not through [`crate::spool::safe`]: under the units'
/// `RuntimeDirectory=` the directory is a mount point of its own, which
/// that module's `RESOLVE_NO_XDEV` refuses.)
#[derive(Debug)]
pub struct Incidents {
    dir: OwnedFd,
    path: PathBuf,
}

impl Incidents {
    /// Opens (creating it) [`INCIDENTS_DIR`] and locks it.
    pub fn open() -> anyhow::Result<Incidents> {
        Incidents::open_in(Path::new(INCIDENTS_DIR))
    }

    /// Opens (creating it, mode 0700) the directory `path` and locks it.
    /// Its parent is trusted (`/run`: root's).
    pub fn open_in(path: &Path) -> anyhow::Result<Incidents> {
        use rustix::fs::{Mode, OFlags};
        let (parent, name) = match (path.parent(), path.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => anyhow::bail!("{} is not a directory's path", path.display()),
        };
        let ctx = || format!("opening {}", path.display());
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let parent = rustix::fs::open(parent, flags, Mode::empty()).with_context(ctx)?;
        match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).with_context(ctx),
        }
        let dir = rustix::fs::openat(&parent, name, flags | OFlags::NOFOLLOW, Mode::empty())
            .with_context(ctx)?;
        let st = rustix::fs::fstat(&dir).with_context(ctx)?;
        let me = nix::unistd::geteuid().as_raw();
        let mode = st.st_mode & 0o7777;
        anyhow::ensure!(
            st.st_uid == me && mode & 0o022 == 0,
            "{} is owned by uid {} with mode {mode:04o}: it must be uid {me}'s, writable by no one else",
            path.display(),
            st.st_uid,
        );
        rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(Incidents {
            dir,
            path: path.to_owned(),
        })
    }

    /// What was sent; nothing when the file is missing, unreadable, not
    /// a regular file of one link, or not a JSON object of strings.
    fn load(&self) -> BTreeMap<String, String> {
        use rustix::fs::{FileType, Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::openat(&self.dir, INCIDENTS_FILE, flags, Mode::empty()) else {
            return BTreeMap::new();
        };
        let regular = rustix::fs::fstat(&fd).is_ok_and(|st| {
            FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && st.st_nlink == 1
        });
        let mut text = String::new();
        if !regular || std::fs::File::from(fd).read_to_string(&mut text).is_err() {
            return BTreeMap::new();
        }
        serde_json::from_str(&text).unwrap_or_default()
    }

    fn store(&self, map: &BTreeMap<String, String>) -> anyhow::Result<()> {
        use rustix::fs::{AtFlags, Mode, OFlags};
        let tmp = format!(".{INCIDENTS_FILE}.tmp");
        let ctx = |what: &str| format!("{what} {}", self.path.join(&tmp).display());
        match rustix::fs::unlinkat(&self.dir, &tmp, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e).with_context(|| ctx("removing")),
        }
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.dir, &tmp, flags, Mode::from_raw_mode(0o600))
            .with_context(|| ctx("creating"))?;
        let mut f = std::fs::File::from(fd);
        f.write_all(serde_json::to_string(map)?.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| ctx("writing"))?;
        rustix::fs::renameat(&self.dir, &tmp, &self.dir, INCIDENTS_FILE)
            .with_context(|| ctx("renaming"))?;
        Ok(())
    }

    /// Whether the alert for `incident` of `kind` was sent.
    pub fn sent(&self, kind: &str, incident: &str) -> bool {
        self.load().get(kind).is_some_and(|i| i == incident)
    }

    /// Records that the alert for `incident` of `kind` was sent.
    pub fn record(&self, kind: &str, incident: &str) -> anyhow::Result<()> {
        let mut map = self.load();
        map.insert(kind.to_owned(), incident.to_owned());
        self.store(&map)
    }

    /// Forgets the incident of `kind`: it is over, and the next one is told.
    pub fn clear(&self, kind: &str) -> anyhow::Result<()> {
        let mut map = self.load();
        if map.remove(kind).is_some() {
            self.store(&map)?;
        }
        Ok(())
    }
}

/// The incident kind of a failed unit.
pub fn unit_kind(unit: &str) -> String {
    format!("unit:{unit}")
}

/// A failed unit's incident: when it failed (its `InactiveEnterTimestamp`).
pub fn unit_incident(failed_at_usec: u64) -> String {
    format!("failed at {failed_at_usec}")
}

/// The incident kind of a full spool disk.
const DISK_KIND: &str = "spool.disk";

/// What the health timer (`health --fix`) tells of, once per incident:
/// the service left failed by its start limit (the check leaves it so
/// until the configuration or the binary changes; see `service.active`),
/// and a spool disk that is critically full (told again after it was OK).
/// Returns what it did, for people.
pub fn health_incidents(ctx: &Ctx, findings: &[Finding]) -> Vec<String> {
    let service = findings.iter().find(|f| f.id == "service.active");
    let disk = findings.iter().find(|f| f.id == "spool.disk");
    let left_failed = service.filter(|f| f.detail["left_failed"] == true);
    let disk_full = disk.filter(|f| f.level == Level::Critical);
    let over = |f: Option<&Finding>| f.is_some_and(|f| f.level == Level::Ok);
    let (service_over, disk_over) = (over(service), over(disk));
    if left_failed.is_none() && disk_full.is_none() && !service_over && !disk_over {
        return Vec::new();
    }
    let incidents = match Incidents::open() {
        Ok(i) => Some(i),
        Err(e) => {
            eprintln!(
                "alerts: cannot record what was sent, so an alert may be repeated: {}",
                crate::error::chain(e.as_ref())
            );
            None
        }
    };
    let mut done = Vec::new();
    let unit = unit_kind(SERVICE);
    let mut tell = |kind: &str, incident: String, event: Event| {
        if incidents.as_ref().is_some_and(|i| i.sent(kind, &incident)) {
            return;
        }
        let text = event.message.clone();
        match deliver(ctx.config_path.as_deref(), event) {
            Ok(how) => {
                done.push(match how {
                    Delivery::Posted => format!("alerted: {text}"),
                    Delivery::Journal => {
                        format!("alerted in the journal (no notifier configured): {text}")
                    }
                });
                if let Some(Err(e)) = incidents.as_ref().map(|i| i.record(kind, &incident)) {
                    eprintln!(
                        "alerts: recording the alert: {}",
                        crate::error::chain(e.as_ref())
                    );
                }
            }
            Err(e) => done.push(format!(
                "could not send the alert (it is in the journal): {}",
                crate::error::chain(&e)
            )),
        }
    };
    if let Some(f) = left_failed {
        let incident = unit_incident(f.detail["inactive_enter_timestamp"].as_u64().unwrap_or(0));
        tell(
            &unit,
            incident,
            Event {
                unit: SERVICE.into(),
                event: "failed".into(),
                message: f.summary.clone(),
                actions: Vec::new(),
            },
        );
    }
    if let Some(f) = disk_full {
        tell(
            DISK_KIND,
            "critical".into(),
            Event {
                unit: SERVICE.into(),
                event: "disk-full".into(),
                message: format!(
                    "the spool's disk is full: {}: {}",
                    ctx.spool.root().display(),
                    f.summary
                ),
                actions: Vec::new(),
            },
        );
    }
    if let Some(i) = &incidents {
        for (over, kind) in [(service_over, unit.as_str()), (disk_over, DISK_KIND)] {
            if over && let Err(e) = i.clear(kind) {
                eprintln!(
                    "alerts: forgetting the incident {kind}: {}",
                    crate::error::chain(e.as_ref())
                );
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_error_is_the_newest_that_says_why() {
        let journal = [
            r#"{"MESSAGE":"older error"}"#,
            r#"{"MESSAGE":"ai-cmd-executor: /etc/c.toml:3:16: extra `=`"}"#,
            r#"{"MESSAGE":"Failed to start ai-cmd-executor.service.","MESSAGE_ID":"39f53479d3a045ac8e11786248231fbf","JOB_RESULT":"failed"}"#,
            r#"{"MESSAGE":"alert: …","MESSAGE_ID":"33b79da6b9f849f79917cfbd9e654133"}"#,
            "",
        ]
        .join("\n");
        assert_eq!(
            newest_error(&journal).as_deref(),
            Some("ai-cmd-executor: /etc/c.toml:3:16: extra `=`")
        );
        assert_eq!(newest_error(""), None);
        // Bytes that are not UTF-8, and a line break, and a long message.
        let bytes = r#"{"MESSAGE":[98,97,100,255,10,108,105,110,101]}"#;
        assert_eq!(newest_error(bytes).as_deref(), Some("bad\u{fffd} line"));
        let long = format!(r#"{{"MESSAGE":"{}"}}"#, "x".repeat(LAST_ERROR_CHARS + 1));
        let got = newest_error(&long).unwrap();
        assert_eq!(got.chars().count(), LAST_ERROR_CHARS + 1);
        assert!(got.ends_with('…'));
    }

    #[test]
    fn a_failure_is_described_with_its_cause() {
        let mut s = ServiceInfo::default();
        s.unit.active_state = "failed".into();
        s.unit.sub_state = "failed".into();
        s.result = "exit-code".into();
        s.n_restarts = 10;
        s.start_limit_burst = 10;
        s.inactive_enter_timestamp = 1_796_000_000_000_000;
        let m = describe_failure(SERVICE, &s, true, Some("bad config at line 3"));
        assert_eq!(
            m,
            "ai-cmd-executor.service is failed/failed (result exit-code) since 2026-11-30T00:53:20Z, \
             after 10 restart(s): it hit its start limit and systemd gave up; last error: bad config at line 3"
        );
        s.n_restarts = 0;
        let m = describe_failure(SERVICE, &s, false, None);
        assert!(
            m.ends_with(
                "(result exit-code) since 2026-11-30T00:53:20Z; its journal holds no error"
            ),
            "{m}"
        );
    }

    #[test]
    fn incidents_are_recorded_once_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts");
        {
            let i = Incidents::open_in(&path).unwrap();
            assert!(!i.sent("unit:x", "failed at 1"));
            i.record("unit:x", "failed at 1").unwrap();
            i.record(DISK_KIND, "critical").unwrap();
            assert!(i.sent("unit:x", "failed at 1"));
            assert!(!i.sent("unit:x", "failed at 2"), "another incident");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        let i = Incidents::open_in(&path).unwrap();
        assert!(i.sent(DISK_KIND, "critical"), "kept across opens");
        i.clear(DISK_KIND).unwrap();
        assert!(!i.sent(DISK_KIND, "critical"));
        assert!(i.sent("unit:x", "failed at 1"));
    }

    #[test]
    fn the_incidents_directory_must_be_private_and_no_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Incidents::open_in(&open).unwrap_err().to_string();
        assert!(e.contains("writable by no one else"), "{e}");

        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(Incidents::open_in(&link).is_err(), "a link is not followed");

        // A link planted at the file's name is not followed either: the
        // record replaces the link, and its target is left as it was.
        let private = dir.path().join("private");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&victim, private.join(INCIDENTS_FILE)).unwrap();
        let i = Incidents::open_in(&private).unwrap();
        assert!(!i.sent("k", "v"), "a link is not read");
        i.record("k", "v").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(i.sent("k", "v"));
    }
}
