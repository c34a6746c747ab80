//! Job files: what an agent asks the worker to run.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::id::JobKind;
use super::limits::Limits;

/// The longest `command` a JSON job may hold, in bytes. It is passed to
/// `bash -c` as one argument, and Linux refuses a single argument longer
/// than 128 KiB (`MAX_ARG_STRLEN`); longer scripts go in a `.sh` job.
pub const MAX_COMMAND_BYTES: usize = 128 * 1024 - 1;

/// The longest `timeout_secs` a job may ask for: 100 years of 365 days
/// (3 153 600 000 seconds). No real job needs more, it still admits the
/// usual "practically for ever" values (`2147483647`, `999999999`), and
/// it keeps every deadline the worker computes from it far from the limits
/// of its clock arithmetic (a timeout near `u64::MAX` seconds overflows
/// `Instant + Duration`).
pub const MAX_TIMEOUT_SECS: u64 = 100 * 365 * 86_400;

/// The highest `attempt` a job file may carry, and so the highest
/// `max_attempts` the configuration may set: a job re-queued after every
/// interruption runs at most this many times.
pub const MAX_ATTEMPTS: u32 = 100;

/// What to do with a job that was running when the worker stopped or died.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInterrupt {
    /// Record it `interrupted` and never run it again (the default).
    #[default]
    Fail,
    /// Put it back in `pending/` (up to `max_attempts` runs in all).
    Retry,
}

/// How a job was submitted, as the job file says (`submitted_via`): by a
/// client that names itself, or by hand (`file`, also every script job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmittedVia {
    /// `ai-cmd-executor mcp`.
    Mcp,
    /// The CLI (`ai-cmd-executor submit`).
    Cli,
    /// The Python client.
    Python,
    /// A job file written directly.
    File,
}

/// A JSON job file, `pending/<id>.json`, as the contract defines it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The shell command, run with `bash -c`.
    pub command: String,
    /// Seconds before the job is killed, from 1 to [`MAX_TIMEOUT_SECS`];
    /// the configured default when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_timeout_secs"
    )]
    pub timeout_secs: Option<NonZeroU64>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Absolute directory to run in; the worker's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// What happens when the worker stops or dies mid-run.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_interrupt: OnInterrupt,
    /// Which run this is, from 1 to [`MAX_ATTEMPTS`]; set by the worker
    /// when it re-queues a job.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_attempt"
    )]
    pub attempt: Option<NonZeroU32>,
    /// Resource limits, each at most the configured ceiling; the
    /// configured defaults for those absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::limits::de_job_limits"
    )]
    pub limits: Option<Limits>,
    /// The client that wrote the file, if it says; `file` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_via: Option<SubmittedVia>,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

/// A numeric job field: its name in the contract, its largest value, and
/// what follows that value in a refusal (the unit).
struct Bound {
    field: &'static str,
    max: u64,
    unit: &'static str,
}

const TIMEOUT: Bound = Bound {
    field: "timeout_secs",
    max: MAX_TIMEOUT_SECS,
    unit: " seconds (100 years)",
};

const ATTEMPT: Bound = Bound {
    field: "attempt",
    max: MAX_ATTEMPTS as u64,
    unit: "",
};

impl Bound {
    /// Why `value` is not allowed in this field.
    fn refusal(&self, value: &str) -> String {
        format!(
            "\"{}\" must be a whole number from 1 to {}{}, not {value}",
            self.field, self.max, self.unit
        )
    }

    /// `n`, if it lies in `1..=max`.
    fn check(&self, n: u64) -> Result<u64, String> {
        if (1..=self.max).contains(&n) {
            Ok(n)
        } else {
            Err(self.refusal(&n.to_string()))
        }
    }

    /// Reads the field as any JSON value, so that a negative, fractional,
    /// huge or non-numeric value gets a refusal that names the field and
    /// its range rather than serde's generic one. `null` is the same as
    /// leaving the field out.
    fn read<'de, D: Deserializer<'de>>(&self, d: D) -> Result<Option<u64>, D::Error> {
        let value = Value::deserialize(d)?;
        if value.is_null() {
            return Ok(None);
        }
        match value.as_u64() {
            Some(n) => self.check(n).map(Some),
            None => Err(self.refusal(&describe(&value))),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// A short description of a JSON value for an error message.
fn describe(value: &Value) -> String {
    const SHOWN: usize = 40;
    match value {
        Value::String(s) if s.chars().count() > SHOWN => {
            let head: String = s.chars().take(SHOWN).collect();
            format!("the string {head:?}...")
        }
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
        other => other.to_string(),
    }
}

fn de_timeout_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NonZeroU64>, D::Error> {
    Ok(TIMEOUT.read(d)?.and_then(NonZeroU64::new))
}

fn de_attempt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NonZeroU32>, D::Error> {
    Ok(ATTEMPT
        .read(d)?
        .and_then(|n| u32::try_from(n).ok())
        .and_then(NonZeroU32::new))
}

/// How the worker starts a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobBody {
    /// `bash -c <command>`.
    Command(String),
    /// `bash <running file>`: the job file itself is the script.
    Script,
}

/// A parsed and checked job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// What to run.
    pub body: JobBody,
    /// Seconds before it is killed (at most [`MAX_TIMEOUT_SECS`]), if the
    /// job set it.
    pub timeout_secs: Option<NonZeroU64>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Directory to run in.
    pub cwd: Option<PathBuf>,
    /// What happens when the worker stops or dies mid-run.
    pub on_interrupt: OnInterrupt,
    /// Which run this is (1 for the first, at most [`MAX_ATTEMPTS`]).
    pub attempt: u32,
    /// The limits the job asked for, if any.
    pub limits: Option<Limits>,
    /// How it was submitted.
    pub submitted_via: SubmittedVia,
}

/// Why a job file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Zero bytes.
    #[error("the job file is empty")]
    Empty,
    /// Bigger than `max_job_bytes`.
    #[error("the job file is {size} bytes; at most {max} are allowed (max_job_bytes)")]
    TooBig {
        /// Its size.
        size: u64,
        /// The configured limit.
        max: u64,
    },
    /// Not UTF-8.
    #[error("the job file is not valid UTF-8 (first bad byte at offset {0})")]
    NotUtf8(usize),
    /// Bad JSON or a contract violation that serde catches (unknown key,
    /// missing `command`, wrong type).
    #[error("invalid job JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field has a value the contract does not allow.
    #[error("invalid job: {0}")]
    Invalid(String),
}

impl Job {
    /// What stands for a job whose file can no longer be read (its result
    /// must still be recorded): a script with no settings, a first run
    /// that is not retried.
    pub fn placeholder() -> Job {
        Job {
            body: JobBody::Script,
            timeout_secs: None,
            env: BTreeMap::new(),
            cwd: None,
            on_interrupt: OnInterrupt::Fail,
            attempt: 1,
            limits: None,
            submitted_via: SubmittedVia::File,
        }
    }

    /// Parses the bytes of a job file of the given kind.
    pub fn parse(kind: JobKind, bytes: &[u8]) -> Result<Job, JobError> {
        if bytes.is_empty() {
            return Err(JobError::Empty);
        }
        let text = std::str::from_utf8(bytes).map_err(|e| JobError::NotUtf8(e.valid_up_to()))?;
        match kind {
            JobKind::Script => {
                if text.contains('\0') {
                    return Err(JobError::Invalid("the script contains a NUL byte".into()));
                }
                Ok(Job {
                    body: JobBody::Script,
                    timeout_secs: None,
                    env: BTreeMap::new(),
                    cwd: None,
                    on_interrupt: OnInterrupt::Fail,
                    attempt: 1,
                    limits: None,
                    submitted_via: SubmittedVia::File,
                })
            }
            JobKind::Json => {
                // serde would also fill a struct from a JSON array.
                if !text.trim_start().starts_with('{') {
                    return Err(JobError::Invalid(
                        "a JSON job must be an object ({\"command\": ...})".into(),
                    ));
                }
                Job::from_spec(serde_json::from_str(text)?)
            }
        }
    }

    /// Checks a [`JobSpec`] against the rules serde cannot express.
    pub fn from_spec(spec: JobSpec) -> Result<Job, JobError> {
        let invalid = |s: String| Err(JobError::Invalid(s));
        if spec.command.trim().is_empty() {
            return invalid("\"command\" is empty".into());
        }
        if spec.command.contains('\0') {
            return invalid("\"command\" contains a NUL byte".into());
        }
        if spec.command.len() > MAX_COMMAND_BYTES {
            return invalid(format!(
                "\"command\" is {} bytes; at most {MAX_COMMAND_BYTES} fit in one argument (submit a .sh job instead)",
                spec.command.len()
            ));
        }
        for (k, v) in &spec.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return invalid(format!("\"env\" has a bad variable name {k:?}"));
            }
            if v.contains('\0') {
                return invalid(format!("\"env\" value of {k:?} contains a NUL byte"));
            }
        }
        if let Some(cwd) = &spec.cwd
            && !cwd.is_absolute()
        {
            return invalid(format!("\"cwd\" must be an absolute path, not {cwd:?}"));
        }
        // The parser checks these already; a spec built in code (the
        // client's) is checked here.
        if let Some(t) = spec.timeout_secs {
            TIMEOUT.check(t.get()).map_err(JobError::Invalid)?;
        }
        if let Some(a) = spec.attempt {
            ATTEMPT
                .check(u64::from(a.get()))
                .map_err(JobError::Invalid)?;
        }
        Ok(Job {
            body: JobBody::Command(spec.command),
            timeout_secs: spec.timeout_secs,
            env: spec.env,
            cwd: spec.cwd,
            on_interrupt: spec.on_interrupt,
            attempt: spec.attempt.map_or(1, NonZeroU32::get),
            limits: spec.limits,
            submitted_via: spec.submitted_via.unwrap_or(SubmittedVia::File),
        })
    }

    /// The JSON form of this job, for re-queueing it with another attempt
    /// number. `None` for scripts, which cannot carry fields.
    pub fn to_spec(&self) -> Option<JobSpec> {
        match &self.body {
            JobBody::Script => None,
            JobBody::Command(command) => Some(JobSpec {
                command: command.clone(),
                timeout_secs: self.timeout_secs,
                env: self.env.clone(),
                cwd: self.cwd.clone(),
                on_interrupt: self.on_interrupt,
                attempt: NonZeroU32::new(self.attempt),
                limits: self.limits,
                submitted_via: (self.submitted_via != SubmittedVia::File)
                    .then_some(self.submitted_via),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Result<Job, JobError> {
        Job::parse(JobKind::Json, s.as_bytes())
    }

    #[test]
    fn parses_a_full_job() {
        let job = json(
            r#"{"command":"echo hi","timeout_secs":5,"env":{"A":"1"},"cwd":"/tmp","on_interrupt":"retry","limits":{"memory_max":"64M","tasks_max":16,"cpu_max":0.5},"submitted_via":"mcp"}"#,
        )
        .unwrap();
        assert_eq!(
            job.limits.unwrap().to_string(),
            "memory_max 64M, tasks_max 16, cpu_max 50%"
        );
        assert_eq!(job.body, JobBody::Command("echo hi".into()));
        assert_eq!(job.timeout_secs.unwrap().get(), 5);
        assert_eq!(job.env["A"], "1");
        assert_eq!(job.on_interrupt, OnInterrupt::Retry);
        assert_eq!(job.attempt, 1);
        assert_eq!(job.submitted_via, SubmittedVia::Mcp);
        let plain = json(r#"{"command":"x"}"#).unwrap();
        assert_eq!(plain.submitted_via, SubmittedVia::File);
    }

    #[test]
    fn rejects_contract_violations() {
        let cases = [
            ("", "empty"),
            ("{not json", "invalid job JSON"),
            (
                r#"{"command":"x","colour":"red"}"#,
                "unknown field `colour`",
            ),
            (r#"{"timeout_secs":3}"#, "missing field `command`"),
            (r#"{"command":"x","timeout_secs":0}"#, "invalid job JSON"),
            (r#"{"command":"x","timeout_secs":-1}"#, "invalid job JSON"),
            (r#"{"command":"  "}"#, "\"command\" is empty"),
            (r#"{"command":"x","cwd":"rel/dir"}"#, "absolute"),
            (r#"{"command":"x","env":{"A=B":"1"}}"#, "bad variable name"),
            (
                r#"{"command":"x","on_interrupt":"maybe"}"#,
                "unknown variant",
            ),
            (r#"["command"]"#, "must be an object"),
            (
                r#"{"command":"x","limits":{"memory_max":"lots"}}"#,
                "\"memory_max\" must be",
            ),
            (
                r#"{"command":"x","limits":{"cpu":1}}"#,
                "unknown field `cpu`",
            ),
            (r#"{"command":"x","limits":[]}"#, "must be an object"),
            (
                r#"{"command":"x","submitted_via":"fax"}"#,
                "unknown variant",
            ),
        ];
        for (input, want) in cases {
            let err = json(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
        let long = format!(r#"{{"command":"{}"}}"#, "x".repeat(MAX_COMMAND_BYTES + 1));
        assert!(json(&long).unwrap_err().to_string().contains(".sh job"));
    }

    #[test]
    fn numeric_fields_are_bounded_and_refusals_name_field_and_range() {
        let bad = [
            "0",
            "-1",
            "1.5",
            "5.0",
            "1e300",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775808",
            "-9223372036854775808",
            "\"5\"",
            "true",
            "[1]",
            "{\"n\":1}",
        ];
        for (field, max) in [
            ("timeout_secs", MAX_TIMEOUT_SECS),
            ("attempt", u64::from(MAX_ATTEMPTS)),
        ] {
            let range = format!("from 1 to {max}");
            for value in bad.iter().copied().chain([(max + 1).to_string().as_str()]) {
                let input = format!(r#"{{"command":"x","{field}":{value}}}"#);
                let err = json(&input).unwrap_err().to_string();
                assert!(
                    err.contains(&format!("\"{field}\" must be")) && err.contains(&range),
                    "{input}: {err}"
                );
            }
            let input = format!(r#"{{"command":"x","{field}":{max}}}"#);
            json(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            let input = format!(r#"{{"command":"x","{field}":null}}"#);
            json(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
        }
        let long = format!(r#"{{"command":"x","timeout_secs":"{}"}}"#, "9".repeat(500));
        let err = json(&long).unwrap_err().to_string();
        assert!(err.len() < 300, "the value is shortened: {err}");
    }

    #[test]
    fn specs_built_in_code_are_bounded_too() {
        let spec = JobSpec {
            command: "x".into(),
            timeout_secs: NonZeroU64::new(MAX_TIMEOUT_SECS + 1),
            ..JobSpec::default()
        };
        let err = Job::from_spec(spec).unwrap_err().to_string();
        assert!(err.contains("\"timeout_secs\" must be"), "{err}");
        let spec = JobSpec {
            command: "x".into(),
            attempt: NonZeroU32::new(MAX_ATTEMPTS + 1),
            ..JobSpec::default()
        };
        let err = Job::from_spec(spec).unwrap_err().to_string();
        assert!(err.contains("\"attempt\" must be"), "{err}");
    }

    #[test]
    fn rejects_non_utf8() {
        let err = Job::parse(JobKind::Script, b"echo \xff\xfe").unwrap_err();
        assert!(matches!(err, JobError::NotUtf8(5)), "{err}");
    }

    #[test]
    fn scripts_are_taken_whole() {
        let job = Job::parse(JobKind::Script, b"#!/bin/bash\necho hi\n").unwrap();
        assert_eq!(job.body, JobBody::Script);
        assert!(job.to_spec().is_none());
    }

    #[test]
    fn requeue_form_round_trips() {
        let mut job =
            json(r#"{"command":"x","on_interrupt":"retry","limits":{"memory_max":"1G"}}"#).unwrap();
        job.attempt = 2;
        let text = serde_json::to_string(&job.to_spec().unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"command":"x","on_interrupt":"retry","attempt":2,"limits":{"memory_max":1073741824}}"#
        );
        assert_eq!(json(&text).unwrap(), job);
    }
}
