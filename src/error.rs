//! Printing error chains once.

use std::error::Error;

/// An error and its causes on one line, `outer: cause: root cause`, each
/// cause written once even when a message already quotes its source (as
/// `thiserror` messages with `{source}` do). Never captures a backtrace.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let s = src.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = src.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading x: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("loading")]
    struct Outer(#[source] Quoting);

    #[test]
    fn each_cause_once() {
        let e = Outer(Quoting(std::io::Error::other("disk on fire")));
        assert_eq!(chain(&e), "loading: reading x: disk on fire");
    }
}
