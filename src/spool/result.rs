//! Result records: `completed/<id>.json`.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Exit code 0.
    Succeeded,
    /// Non-zero exit code, killed by a signal, or could not be started.
    Failed,
    /// Ran past its timeout and was killed.
    TimedOut,
    /// The worker stopped or died while it ran.
    Interrupted,
    /// The job file was bad input and never ran.
    Rejected,
    /// The job never ran: it waited in `pending/` longer than
    /// `stale_pending_after` while no worker served the spool, and
    /// maintenance (`cleanup`, `health --fix`) archived it.
    Expired,
    /// Its submitter (or root) cancelled it: withdrawn from `pending/`, or
    /// stopped while it ran (TERM, then KILL after `kill_grace`).
    Cancelled,
}

impl Status {
    /// The name used in the contract.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Interrupted => "interrupted",
            Status::Rejected => "rejected",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A wall-clock time, written as RFC 3339 UTC with microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// The current time, to the microsecond (the precision results keep).
    pub fn now() -> Self {
        let t = SystemTime::now();
        let sub = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        Self(t - Duration::from_nanos(u64::from(sub % 1000)))
    }

    /// A compact form for file names: `20261126T193309.123456Z`. Such names
    /// sort in time order.
    pub fn file_stamp(&self) -> String {
        let s = humantime::format_rfc3339_micros(self.0).to_string();
        // 2026-11-26T19:33:09.123456Z -> 20261126T193309.123456Z
        s.chars().filter(|c| *c != '-' && *c != ':').collect()
    }

    /// Parses the form [`Timestamp::file_stamp`] writes.
    pub fn from_file_stamp(stamp: &str) -> Option<Self> {
        let b = stamp.as_bytes();
        if b.len() != 23 || b[8] != b'T' || b[15] != b'.' || b[22] != b'Z' {
            return None;
        }
        let s = format!(
            "{}-{}-{}T{}:{}:{}",
            &stamp[0..4],
            &stamp[4..6],
            &stamp[6..8],
            &stamp[9..11],
            &stamp[11..13],
            &stamp[13..]
        );
        humantime::parse_rfc3339(&s).ok().map(Self)
    }

    /// Time elapsed from `earlier` to `self`, zero if the clock went back.
    pub fn since(&self, earlier: Timestamp) -> Duration {
        self.0.duration_since(earlier.0).unwrap_or_default()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_micros(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s)
            .map(Timestamp)
            .map_err(serde::de::Error::custom)
    }
}

/// Who submitted a job: the owner of its job file, as the worker found it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Submitter {
    /// The owner's uid.
    pub uid: u32,
    /// The owner's user name; `None` (`null`) when the uid has none.
    #[serde(default)]
    pub name: Option<String>,
}

/// What a run used, as `wait4(2)` reports it for the job's main process and
/// every descendant it waited for (a shell waits for its commands); where
/// the job had a cgroup, the CPU times are its whole tree's (`cpu.stat`),
/// background processes included. Otherwise a process left running in the
/// background is not counted. All `None` for a
/// job that did not run (rejected, expired) or whose end was not seen (a
/// run interrupted by a crash), and in results written before these keys
/// existed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time in user mode, in milliseconds.
    #[serde(default)]
    pub cpu_user_ms: Option<u64>,
    /// CPU time in the kernel on its behalf, in milliseconds.
    #[serde(default)]
    pub cpu_system_ms: Option<u64>,
    /// The largest resident set of any one of those processes, in bytes.
    #[serde(default)]
    pub max_rss_bytes: Option<u64>,
    /// The most memory the job's whole tree held at once (its cgroup's
    /// `memory.peak`), in bytes; only where the job had a cgroup with the
    /// memory controller (the key is absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
}

/// The result record of one run, as the contract defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job id.
    pub id: String,
    /// How it ended.
    pub status: Status,
    /// The exit code, when the process exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended it, e.g. `"SIGKILL"`.
    pub signal: Option<String>,
    /// When it started (or was rejected).
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Timestamp,
    /// Run time in milliseconds.
    pub duration_ms: u64,
    /// The log of this run, relative to the spool root.
    pub log: Option<String>,
    /// Whether output beyond `log_max_bytes` was dropped.
    pub output_truncated: bool,
    /// Why it was rejected, timed out or interrupted.
    pub error: Option<String>,
    /// Which run this was (1 for the first).
    pub attempt: u32,
    /// Who submitted the job (the owner of its job file); `None` when that
    /// is not known: a file that could not be inspected, or a result
    /// written before the field existed (it reads as `None`).
    #[serde(default)]
    pub submitted_by: Option<Submitter>,
    /// What the run used.
    #[serde(flatten)]
    pub usage: Usage,
    /// The resource limits the run had and how each was enforced; absent
    /// when it had none (and in results written before the key existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<super::limits::Applied>,
    /// How the job was submitted (`mcp`, `cli`, `python` or `file`), as its
    /// job file said; `None` when no job file was read (a rejected one)
    /// and in results written before the key existed.
    #[serde(default)]
    pub submitted_via: Option<super::job::SubmittedVia>,
    /// Who cancelled it (a `cancelled` result only): the owner of the
    /// cancel request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<Submitter>,
}

impl JobResult {
    /// The result of a job that did not run (rejected, expired) or whose
    /// run could not be followed: now, no duration, no log, no exit code.
    pub fn not_run(
        id: impl ToString,
        status: Status,
        error: String,
        attempt: u32,
        submitted_by: Option<Submitter>,
    ) -> JobResult {
        let now = Timestamp::now();
        JobResult {
            id: id.to_string(),
            status,
            exit_code: None,
            signal: None,
            started_at: now,
            finished_at: now,
            duration_ms: 0,
            log: None,
            output_truncated: false,
            error: Some(error),
            attempt,
            submitted_by,
            usage: Usage::default(),
            limits: None,
            submitted_via: None,
            cancelled_by: None,
        }
    }

    /// The exit code a shell-like client reports for this result: the job's
    /// own exit code, 128+N for signal N, 124 for a timeout (as timeout(1)),
    /// 126 for rejected input, 130 for an interrupted run and 75 for an
    /// expired job (`EX_TEMPFAIL` of sysexits.h: it did not run, and may be
    /// submitted again).
    pub fn shell_exit_code(&self) -> u8 {
        match self.status {
            Status::TimedOut => 124,
            Status::Expired => 75,
            Status::Rejected => 126,
            Status::Interrupted => 130,
            Status::Cancelled => CANCELLED,
            Status::Succeeded | Status::Failed => match (self.exit_code, &self.signal) {
                (Some(code), _) => u8::try_from(code).unwrap_or(1),
                (None, Some(sig)) => signal_number(sig).map_or(1, |n| 128u8.saturating_add(n)),
                (None, None) => NOT_STARTED,
            },
        }
    }
}

/// The exit code for a cancelled job: 128 + SIGTERM, as a shell reports a
/// command stopped by `kill`; see [`JobResult::shell_exit_code`].
pub const CANCELLED: u8 = 143;

/// The exit code for a job that could not be started: see
/// [`JobResult::shell_exit_code`].
pub const NOT_STARTED: u8 = 127;

fn signal_number(name: &str) -> Option<u8> {
    let sig: nix::sys::signal::Signal = name.parse().ok()?;
    u8::try_from(sig as i32).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stamps_round_trip_and_sort() {
        let t = Timestamp(SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456));
        let stamp = t.file_stamp();
        assert_eq!(stamp.len(), 23, "{stamp}");
        assert_eq!(Timestamp::from_file_stamp(&stamp), Some(t));
        let later = Timestamp(t.0 + Duration::from_micros(1)).file_stamp();
        assert!(later > stamp);
        assert_eq!(Timestamp::from_file_stamp("garbage"), None);
    }

    #[test]
    fn results_serialize_to_the_contract() {
        let t = Timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000));
        let r = JobResult {
            id: "x".into(),
            status: Status::TimedOut,
            exit_code: None,
            signal: Some("SIGTERM".into()),
            started_at: t,
            finished_at: t,
            duration_ms: 0,
            log: Some("logs/x/a.log".into()),
            output_truncated: false,
            error: Some("timed out".into()),
            attempt: 1,
            submitted_by: Some(Submitter {
                uid: 1000,
                name: Some("alice".into()),
            }),
            usage: Usage {
                cpu_user_ms: Some(12),
                cpu_system_ms: Some(3),
                max_rss_bytes: Some(4 << 20),
                memory_peak_bytes: None,
            },
            limits: Some(crate::spool::limits::Applied {
                memory_max: Some(crate::spool::limits::Bytes::new(64 << 20).unwrap()),
                enforced_by: [(
                    "memory_max".to_owned(),
                    "RLIMIT_DATA per process".to_owned(),
                )]
                .into(),
                ..Default::default()
            }),
            submitted_via: Some(crate::spool::job::SubmittedVia::Mcp),
            cancelled_by: None,
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        let mut want = vec![
            "attempt",
            "cpu_system_ms",
            "cpu_user_ms",
            "duration_ms",
            "error",
            "exit_code",
            "finished_at",
            "id",
            "limits",
            "log",
            "max_rss_bytes",
            "output_truncated",
            "signal",
            "started_at",
            "status",
            "submitted_by",
            "submitted_via",
        ];
        want.sort();
        let mut got = keys.clone();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(v["status"], "timed_out");
        assert_eq!(v["submitted_via"], "mcp");
        assert_eq!(
            v["limits"],
            serde_json::json!({"memory_max": 67108864, "enforced_by": {"memory_max": "RLIMIT_DATA per process"}})
        );
        assert_eq!(v["started_at"], "2026-11-18T11:06:40.000000Z");
        assert_eq!(
            v["submitted_by"],
            serde_json::json!({"uid": 1000, "name": "alice"})
        );
        let back: JobResult = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.shell_exit_code(), 124);
    }

    #[test]
    fn shell_exit_codes() {
        let t = Timestamp::now();
        let mk = |status, exit_code, signal: Option<&str>| JobResult {
            id: "x".into(),
            status,
            exit_code,
            signal: signal.map(String::from),
            started_at: t,
            finished_at: t,
            duration_ms: 0,
            log: None,
            output_truncated: false,
            error: None,
            attempt: 1,
            submitted_by: None,
            usage: Usage::default(),
            limits: None,
            submitted_via: None,
            cancelled_by: None,
        };
        assert_eq!(mk(Status::Succeeded, Some(0), None).shell_exit_code(), 0);
        assert_eq!(mk(Status::Failed, Some(3), None).shell_exit_code(), 3);
        assert_eq!(
            mk(Status::Failed, None, Some("SIGKILL")).shell_exit_code(),
            137
        );
        assert_eq!(mk(Status::Rejected, None, None).shell_exit_code(), 126);
        assert_eq!(mk(Status::Interrupted, None, None).shell_exit_code(), 130);
        assert_eq!(mk(Status::Expired, None, None).shell_exit_code(), 75);
        assert_eq!(
            mk(Status::Failed, None, None).shell_exit_code(),
            NOT_STARTED
        );
    }

    #[test]
    fn expired_is_written_and_read_by_its_contract_name() {
        assert_eq!(
            serde_json::to_value(Status::Expired).unwrap(),
            serde_json::json!("expired")
        );
        assert_eq!(Status::Expired.to_string(), "expired");
        let back: Status = serde_json::from_str("\"expired\"").unwrap();
        assert_eq!(back, Status::Expired);
    }

    /// A result written before `submitted_by` existed (this is one, as
    /// written then) still reads, with no submitter; an unknown name reads
    /// as `null` or as an absent key.
    #[test]
    fn results_without_a_submitter_still_load() {
        let old = r#"{
  "id": "build-7",
  "status": "succeeded",
  "exit_code": 0,
  "signal": null,
  "started_at": "2026-11-26T19:33:09.123456Z",
  "finished_at": "2026-11-26T19:33:10.123456Z",
  "duration_ms": 1000,
  "log": "logs/87/build-7@20261126T193309.123456Z.log",
  "output_truncated": false,
  "error": null,
  "attempt": 1
}"#;
        let r: JobResult = serde_json::from_str(old).unwrap();
        assert_eq!(r.submitted_by, None);
        assert_eq!(r.usage, Usage::default(), "no usage keys: unknown");
        assert_eq!(r.shell_exit_code(), 0);

        for submitter in [r#"{"uid": 65534, "name": null}"#, r#"{"uid": 65534}"#] {
            let text = old.replace(
                "\"attempt\": 1",
                &format!("\"attempt\": 1, \"submitted_by\": {submitter}"),
            );
            let r: JobResult = serde_json::from_str(&text).unwrap();
            assert_eq!(
                r.submitted_by,
                Some(Submitter {
                    uid: 65534,
                    name: None
                })
            );
        }
        let r = JobResult {
            submitted_by: Some(Submitter {
                uid: 65534,
                name: None,
            }),
            ..r
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v["submitted_by"],
            serde_json::json!({"uid": 65534, "name": null}),
            "an unknown name is written as null, so the keys never vary"
        );
        for key in ["cpu_user_ms", "cpu_system_ms", "max_rss_bytes"] {
            assert_eq!(v[key], serde_json::Value::Null, "{key}: unknown is null");
        }
    }
}
