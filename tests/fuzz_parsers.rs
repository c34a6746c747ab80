//! Property-based fuzzing of what agents control: job file names, ids and
//! job file contents. cargo-fuzz needs a nightly toolchain, which this
//! project's machines do not have; proptest runs on stable, is bounded (a
//! fixed number of cases per property, `PROPTEST_CASES` to change it) and
//! keeps any failure it finds in `proptest-regressions/`, where it is
//! replayed first on every later run. The property that feeds job files
//! through a running worker, from `pending/` to the result, is in
//! `tests/numbers.rs`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use ai_cmd_executor::spool::JobId;
use ai_cmd_executor::spool::id::{JobKind, MAX_ID_LEN, parse_job_file_name};
use ai_cmd_executor::spool::job::{Job, JobBody, MAX_ATTEMPTS, MAX_TIMEOUT_SECS};
use proptest::prelude::*;

fn valid_id_rule(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A JSON number (or other value) as text, and the integer it is, if it
/// is a JSON integer that fits an `i128`.
fn numeric_literal() -> impl Strategy<Value = (String, Option<i128>)> {
    prop_oneof![
        (0u64..200).prop_map(|n| (n.to_string(), Some(i128::from(n)))),
        (MAX_TIMEOUT_SECS - 5..MAX_TIMEOUT_SECS + 5)
            .prop_map(|n| (n.to_string(), Some(i128::from(n)))),
        any::<u64>().prop_map(|n| (n.to_string(), Some(i128::from(n)))),
        any::<i64>().prop_map(|n| (n.to_string(), Some(i128::from(n)))),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| (format!("{f:?}"), None)),
        "[1-9][0-9]{20,40}".prop_map(|s| (s, None)),
        "[0-9]{1,5}".prop_map(|s| (format!("{s:?}"), None)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn numeric_fields_take_exactly_the_whole_numbers_in_their_range(
        field in prop::sample::select(vec![
            ("timeout_secs", i128::from(MAX_TIMEOUT_SECS)),
            ("attempt", i128::from(MAX_ATTEMPTS)),
        ]),
        (literal, n) in numeric_literal(),
    ) {
        let (name, max) = field;
        let text = format!(r#"{{"command":"x","{name}":{literal}}}"#);
        match Job::parse(JobKind::Json, text.as_bytes()) {
            Ok(job) => {
                let n = n.filter(|n| (1..=max).contains(n));
                prop_assert!(n.is_some(), "{} was accepted", text);
                let got = match name {
                    "timeout_secs" => job.timeout_secs.map(|t| i128::from(t.get())),
                    _ => Some(i128::from(job.attempt)),
                };
                prop_assert_eq!(got, n);
            }
            Err(e) => {
                prop_assert!(n.is_none_or(|n| !(1..=max).contains(&n)), "{}: {}", text, e);
                let want = format!("\"{name}\" must be a whole number from 1 to {max}");
                prop_assert!(e.to_string().contains(&want), "{}: {}", text, e);
            }
        }
    }

    #[test]
    fn ids_are_accepted_exactly_by_the_rule(s in "\\PC{0,140}|[A-Za-z0-9._-]{0,140}") {
        prop_assert_eq!(JobId::new(&s).is_ok(), valid_id_rule(&s));
    }

    #[test]
    fn file_names_never_panic_and_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let name = OsStr::from_bytes(&bytes);
        if let Ok((id, kind)) = parse_job_file_name(name) {
            prop_assert!(valid_id_rule(id.as_str()));
            let back = format!("{}.{}", id, kind.extension());
            prop_assert_eq!(back.as_bytes(), &bytes[..]);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Job::parse(JobKind::Json, &bytes);
        let _ = Job::parse(JobKind::Script, &bytes);
    }

    #[test]
    fn json_objects_with_random_keys_parse_or_explain(
        command in "\\PC{0,40}",
        extra in proptest::option::of("[a-z_]{1,12}"),
        timeout in proptest::option::of(-5i64..100_000),
        retry in any::<bool>(),
    ) {
        let mut obj = serde_json::json!({"command": command});
        if let Some(k) = &extra {
            obj[k] = serde_json::json!(1);
        }
        if let Some(t) = timeout {
            obj["timeout_secs"] = serde_json::json!(t);
        }
        if retry {
            obj["on_interrupt"] = serde_json::json!("retry");
        }
        let known = ["command", "timeout_secs", "env", "cwd", "on_interrupt", "attempt"];
        match Job::parse(JobKind::Json, obj.to_string().as_bytes()) {
            Ok(job) => {
                prop_assert_eq!(job.body, JobBody::Command(command.clone()));
                prop_assert!(extra.as_deref().is_none_or(|k| known.contains(&k)));
                prop_assert!(timeout.is_none_or(|t| t > 0));
                prop_assert!(!command.trim().is_empty());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
