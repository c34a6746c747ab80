//! Logging: structured journal entries under journald, readable lines on
//! stderr elsewhere.
//!
//! Why `tracing` + `tracing-journald` rather than `systemd-journal-logger`:
//! the worker is instrumented with `tracing` (structured fields on every
//! event), and `tracing-journald` sends each event as one native journal
//! entry with those fields as journal fields. `systemd-journal-logger` sits
//! on the `log` facade, whose key-value support would need a second set of
//! macros. `tracing-journald` prefixes event fields with `F_` unless told
//! otherwise, so the layer is built with `with_field_prefix(None)`: the
//! event field `cmd_id` becomes the journal field `CMD_ID`, and
//! `journalctl CMD_ID=x` works as written.

use std::borrow::Cow;
use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Stable `MESSAGE_ID`s, one per kind of event, so that
/// `journalctl MESSAGE_ID=…` finds every event of a kind.
pub mod message_id {
    /// A job was claimed and started.
    pub const JOB_STARTED: &str = "f78d71b3c99f4d3091108b40969e993c";
    /// A job's result was recorded (any status but rejected).
    pub const JOB_FINISHED: &str = "f5ce453e05554bb3b407715bab1d43c1";
    /// A job file was rejected as bad input.
    pub const JOB_REJECTED: &str = "e731a17994664d788f01efcf801c5f21";
    /// The worker withheld a watchdog ping because a self-check failed.
    pub const HEARTBEAT_WITHHELD: &str = "e66db1f6debc47899f3c183609b85250";
    /// The worker finished start-up and is serving.
    pub const WORKER_READY: &str = "c5928de1160f44d3b4781b2bd42e1e4c";
    /// The worker is stopping.
    pub const WORKER_STOPPING: &str = "6d9dc82b228d4dd6889568ee5e1bcd0a";
    /// The worker hands over to a replaced binary (an upgrade); its jobs run on.
    pub const WORKER_HANDOVER: &str = "1ba935c23dad45bbb37d67da76a4423a";
    /// The worker runs jobs with less isolation than the strongest there
    /// is (`isolation = "auto"` on a kernel without what it needs).
    pub const ISOLATION_LIMITED: &str = "a7c8adaac2274f2da292100641fb0448";
    /// How jobs are contained, said once at start: a cgroup each (and
    /// which controllers limit them), or their process group.
    pub const CONTAINMENT: &str = "a5fffbdfc6b8401d8ed2eaf7f5b19141";
    /// An alert (a unit failed, the spool's disk is full) with no
    /// notifier to send it to, or whose notifier failed: this entry, at
    /// priority err, is the alert.
    pub const ALERT: &str = "33b79da6b9f849f79917cfbd9e654133";
}

/// A program's fatal error, `program: cause: root cause`, on stderr at
/// priority err (see [`eprint_err`]): what each binary's `main` prints.
pub fn eprint_failure(program: &str, e: &anyhow::Error) {
    let root: &(dyn std::error::Error + 'static) = e.as_ref();
    eprint_err(&format!("{program}: {}", crate::error::chain(root)));
}

/// Writes `text` to stderr. When stderr is the journal (systemd connected
/// it: `JOURNAL_STREAM` names it), each line carries the `<3>` prefix
/// journald reads as priority err, so `journalctl -p err` and `systemctl
/// status` show it as the error it is.
pub fn eprint_err(text: &str) {
    use std::io::Write;
    let journal = stderr_is_journal();
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.lines() {
        if journal {
            out.push_str("<3>");
        }
        out.push_str(line);
        out.push('\n');
    }
    let _ = std::io::stderr().lock().write_all(out.as_bytes());
}

/// Whether stderr is the journal stream systemd gave this process
/// (`JOURNAL_STREAM` is `device:inode` of it, and a child whose stderr
/// was redirected still inherits the variable).
fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// How many bytes of a command the journal entries of its job quote
/// ([`CommandDigest::excerpt`]).
pub const CMD_EXCERPT_BYTES: usize = 200;

/// What the journal entries of a job say about its command (a JSON job's
/// `command`, or a `.sh` job's whole script): the `CMD` and `CMD_SHA256`
/// fields of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandDigest {
    /// The first [`CMD_EXCERPT_BYTES`] bytes of the command, cut at a
    /// character boundary, on one line: control characters (and the
    /// Unicode controls that reorder text) are escaped as in a Rust string
    /// literal (`\n`, `\t`, `\u{1b}`), and so is the backslash, so that
    /// the escapes are unambiguous. `…` follows when the command is longer.
    pub excerpt: String,
    /// The SHA-256 of the whole command's bytes, in lower-case hex: the same
    /// command always has the same hash (`journalctl CMD_SHA256=…`).
    pub sha256: String,
}

impl CommandDigest {
    /// The digest of a command's bytes.
    pub fn of(command: &[u8]) -> Self {
        use sha2::Digest;
        CommandDigest {
            excerpt: excerpt(command, CMD_EXCERPT_BYTES),
            sha256: hex(&sha2::Sha256::digest(command)),
        }
    }
}

/// The first `max` bytes of `command` (fewer, to end on a character
/// boundary), escaped, with `…` if something was left out.
fn excerpt(command: &[u8], max: usize) -> String {
    let head = &command[..command.len().min(max)];
    let text: Cow<'_, str> = match std::str::from_utf8(head) {
        Ok(s) => s.into(),
        // The cut fell inside a character: end before it.
        Err(e) if e.error_len().is_none() => String::from_utf8_lossy(&head[..e.valid_up_to()]),
        // Not UTF-8 (never so for a job the worker runs).
        Err(_) => String::from_utf8_lossy(head),
    };
    let mut out = String::with_capacity(text.len() + 3);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || reorders_text(c) => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    if head.len() < command.len() {
        out.push('…');
    }
    out
}

/// The Unicode bidirectional controls, which make text display in an
/// order other than the one it is read in ("Trojan Source").
fn reorders_text(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogTarget {
    /// The journal when started by systemd with its output connected to
    /// journald (`JOURNAL_STREAM` set), stderr otherwise.
    #[default]
    Auto,
    /// Native journal entries with structured fields.
    Journal,
    /// Readable lines on stderr.
    Stderr,
}

/// Sets up the global subscriber. `default` is the level used when
/// `RUST_LOG` does not say otherwise.
pub fn init(default: &str, target: LogTarget) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let want_journal = match target {
        LogTarget::Journal => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("ai-cmd-executor".into());
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .init();
                return;
            }
            Err(e) => {
                eprintln!("ai-cmd-executor: journald is not reachable ({e}); logging to stderr")
            }
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // Still under systemd: its journal stamps lines itself.
        builder.without_time().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_hashes_are_sha256_in_hex() {
        // The FIPS 180-2 examples.
        assert_eq!(
            CommandDigest::of(b"").sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            CommandDigest::of(b"abc").sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // The hash covers the whole command, not the excerpt.
        let long = "x".repeat(1000);
        let longer = format!("{long}y");
        assert_eq!(
            CommandDigest::of(long.as_bytes()).excerpt,
            CommandDigest::of(longer.as_bytes()).excerpt
        );
        assert_ne!(
            CommandDigest::of(long.as_bytes()).sha256,
            CommandDigest::of(longer.as_bytes()).sha256
        );
    }

    #[test]
    fn short_commands_are_quoted_whole() {
        let d = CommandDigest::of(b"cargo build --release");
        assert_eq!(d.excerpt, "cargo build --release");
        let exact = "a".repeat(CMD_EXCERPT_BYTES);
        assert_eq!(CommandDigest::of(exact.as_bytes()).excerpt, exact);
    }

    #[test]
    fn long_commands_are_cut_at_200_bytes_on_a_character_boundary() {
        let long = "a".repeat(CMD_EXCERPT_BYTES + 1);
        let d = CommandDigest::of(long.as_bytes());
        assert_eq!(d.excerpt, format!("{}…", "a".repeat(CMD_EXCERPT_BYTES)));

        // "é" is two bytes: byte 200 falls inside the hundredth one, which
        // is left out whole.
        let accents = format!("a{}", "é".repeat(150));
        let d = CommandDigest::of(accents.as_bytes());
        assert_eq!(d.excerpt, format!("a{}…", "é".repeat(99)));
        // A four-byte character straddling the cut.
        let emoji = format!("{}🦀🦀", "a".repeat(CMD_EXCERPT_BYTES - 2));
        let d = CommandDigest::of(emoji.as_bytes());
        assert_eq!(d.excerpt, format!("{}…", "a".repeat(CMD_EXCERPT_BYTES - 2)));
    }

    #[test]
    fn control_characters_are_escaped() {
        let d = CommandDigest::of(b"echo a\tb\r\nprintf '\x1b[31m\\n' \x7f");
        assert_eq!(d.excerpt, r"echo a\tb\r\nprintf '\u{1b}[31m\\n' \u{7f}");
        assert!(!d.excerpt.chars().any(char::is_control), "{}", d.excerpt);
        // Text-reordering controls too; other non-ASCII text is kept.
        let d = CommandDigest::of("echo \u{202e}ʇxǝʇ \u{2066}ok\u{2069} ünïcode".as_bytes());
        assert_eq!(d.excerpt, r"echo \u{202e}ʇxǝʇ \u{2066}ok\u{2069} ünïcode");
        // The cut is made on the command, before escaping: 200 bytes of
        // newlines are quoted whole, as 400 bytes of escapes.
        let newlines = "\n".repeat(CMD_EXCERPT_BYTES);
        assert_eq!(
            CommandDigest::of(newlines.as_bytes()).excerpt,
            r"\n".repeat(CMD_EXCERPT_BYTES)
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_do_not_panic() {
        let d = CommandDigest::of(b"echo \xff\xfe");
        assert_eq!(d.excerpt, "echo \u{fffd}\u{fffd}");
        assert_eq!(d.sha256.len(), 64);
    }
}
