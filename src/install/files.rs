//! The files the installer writes, rendered from the same sources the .deb
//! ships (`units/` and `packaging/`), with local values substituted.

use std::path::Path;

use crate::systemd::units::{self, RenderOptions, SHIPPED_BINARY, SHIPPED_USER};

/// The default configuration (a conffile in the package).
pub const CONFIG: &str = include_str!("../../packaging/etc/ai-cmd-executor/config.toml");
/// The cron fallback.
pub const CRON: &str = include_str!("../../packaging/etc/cron.d/ai-cmd-executor");
/// The sysusers.d entry for the service user.
pub const SYSUSERS: &str = include_str!("../../packaging/usr/lib/sysusers.d/ai-cmd-executor.conf");
/// The tmpfiles.d entries for the spool.
pub const TMPFILES: &str = include_str!("../../packaging/usr/lib/tmpfiles.d/ai-cmd-executor.conf");

/// The spool the shipped files name.
pub const SHIPPED_SPOOL: &str = "/var/lib/ai-cmd-executor";

/// Local values for every rendered file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// The binary's installed path.
    pub binary: String,
    /// The service user (and group).
    pub user: String,
    /// The spool.
    pub spool: String,
}

impl Local {
    /// The unit files.
    pub fn units(&self) -> Vec<(&'static str, String)> {
        units::render(&RenderOptions {
            binary: self.binary.clone(),
            user: self.user.clone(),
        })
    }

    /// The default configuration, naming this spool.
    pub fn config(&self) -> String {
        CONFIG.replace(
            &format!("spool = \"{SHIPPED_SPOOL}\""),
            &format!("spool = {:?}", self.spool),
        )
    }

    /// The cron file: binary and user substituted in each job line, the
    /// layout of the shipped file kept.
    pub fn cron(&self) -> String {
        let mut out = String::new();
        for line in CRON.lines() {
            let job = !line.starts_with('#') && !line.contains('=') && !line.trim().is_empty();
            let mut line = line.to_owned();
            if job {
                // `@reboot user cmd…` or `m h dom mon dow user cmd…`
                let user_at = if line.starts_with('@') { 1 } else { 5 };
                if let Some((start, end)) = field_span(&line, user_at)
                    && &line[start..end] == SHIPPED_USER
                {
                    line.replace_range(start..end, &self.user);
                }
                line = line.replace(SHIPPED_BINARY, &self.binary);
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// The sysusers.d entry.
    pub fn sysusers(&self) -> String {
        SYSUSERS
            .replace(&format!("u {SHIPPED_USER} "), &format!("u {} ", self.user))
            .replace(SHIPPED_SPOOL, &self.spool)
    }

    /// The tmpfiles.d entries.
    pub fn tmpfiles(&self) -> String {
        TMPFILES
            .replace(
                &format!(" {SHIPPED_USER} {SHIPPED_USER} "),
                &format!(" {} {} ", self.user, self.user),
            )
            .replace(
                &format!(":u:{SHIPPED_USER}:"),
                &format!(":u:{}:", self.user),
            )
            .replace(SHIPPED_SPOOL, &self.spool)
    }
}

/// The byte range of the `n`th whitespace-separated field of `line`.
fn field_span(line: &str, n: usize) -> Option<(usize, usize)> {
    let mut fields = 0;
    let mut start = None;
    for (i, c) in line.char_indices() {
        match (c.is_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                if fields == n {
                    return Some((s, i));
                }
                fields += 1;
                start = None;
            }
            _ => {}
        }
    }
    start.filter(|_| fields == n).map(|s| (s, line.len()))
}

/// `path` under `root` (`/etc/x` under `/tmp/r` is `/tmp/r/etc/x`).
pub fn under(root: &Path, path: &str) -> std::path::PathBuf {
    root.join(path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Local {
        Local {
            binary: SHIPPED_BINARY.into(),
            user: SHIPPED_USER.into(),
            spool: SHIPPED_SPOOL.into(),
        }
    }

    #[test]
    fn shipped_values_render_the_shipped_text() {
        let l = shipped();
        assert_eq!(l.config(), CONFIG);
        assert_eq!(l.cron(), CRON);
        assert_eq!(l.sysusers(), SYSUSERS);
        assert_eq!(l.tmpfiles(), TMPFILES);
    }

    #[test]
    fn local_values_are_substituted() {
        let l = Local {
            binary: "/usr/local/bin/ai-cmd-executor".into(),
            user: "runner".into(),
            spool: "/srv/spool".into(),
        };
        let cron = l.cron();
        assert!(
            cron.contains("*/5 * * * *  runner [ -d /run/systemd/system ] || [ ! -x /usr/local/bin/ai-cmd-executor ] || /usr/local/bin/ai-cmd-executor ensure-running"),
            "{cron}"
        );
        assert!(cron.contains("@reboot      runner "), "{cron}");
        assert!(!cron.contains(" ai-cmd "), "{cron}");
        assert!(l.config().contains("spool = \"/srv/spool\""));
        crate::config::Config::parse(&l.config(), Path::new("x")).unwrap();
        assert!(
            l.tmpfiles()
                .contains("d /srv/spool/pending    3770 runner runner -"),
            "{}",
            l.tmpfiles()
        );
        assert!(
            l.tmpfiles()
                .contains("a /srv/spool/pending    -    -      -      - d:u::rwx,d:u:runner:r-x,"),
            "{}",
            l.tmpfiles()
        );
        assert!(!l.tmpfiles().contains("ai-cmd:"), "{}", l.tmpfiles());
        assert!(l.sysusers().starts_with("#") && l.sysusers().contains("u runner - "));
    }

    #[test]
    fn shipped_config_parses_to_the_defaults_but_the_spool() {
        let c = crate::config::Config::parse(CONFIG, Path::new("config.toml")).unwrap();
        let want = crate::config::Config {
            spool: Some(SHIPPED_SPOOL.into()),
            ..Default::default()
        };
        assert_eq!(c, want);
    }

    #[test]
    fn cron_lines_are_guarded_against_running_beside_systemd() {
        for line in CRON.lines().filter(|l| l.contains(SHIPPED_BINARY)) {
            assert!(line.contains("[ -d /run/systemd/system ] ||"), "{line}");
        }
    }

    /// After `apt remove` (the conffile stays) or with the binary gone,
    /// every job line exits 0 rather than 127 (Debian Policy 9.5): each
    /// line's command, run by sh as cron would, with the binary missing.
    #[test]
    fn cron_lines_exit_0_when_the_program_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let local = Local {
            binary: d.path().join("gone").display().to_string(),
            user: "runner".into(),
            spool: "/srv/spool".into(),
        };
        let mut n = 0;
        for line in local.cron().lines().filter(|l| l.contains(&local.binary)) {
            // The command is what follows the user field.
            let user_at = if line.starts_with('@') { 1 } else { 5 };
            let (_, end) = field_span(line, user_at).unwrap();
            // Without the systemd guard, so the binary's is what is tried
            // on any host.
            let command = line[end..].replace("[ -d /run/systemd/system ] ||", "");
            let status = std::process::Command::new("sh")
                .args(["-c", &command])
                .status()
                .unwrap();
            assert!(status.success(), "`{command}`: {status}");
            n += 1;
        }
        assert_eq!(n, 3);
    }
}
