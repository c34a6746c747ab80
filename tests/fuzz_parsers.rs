//! Property-based fuzzing of what agents control: job file names, ids and
//! job file contents. cargo-fuzz needs a nightly toolchain, which this
//! project's machines do not have; proptest runs on stable, is bounded (a
//! fixed number of cases per property, `PROPTEST_CASES` to change it) and
//! keeps any failure it finds in `proptest-regressions/`, where it is
//! replayed first on every later run.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use ai_cmd_executor::spool::JobId;
use ai_cmd_executor::spool::id::{JobKind, MAX_ID_LEN, parse_job_file_name};
use ai_cmd_executor::spool::job::{Job, JobBody};
use proptest::prelude::*;

fn valid_id_rule(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

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
