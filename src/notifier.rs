//! The one notifier: Slack incoming webhooks or a generic JSON webhook, with
//! bounded timeouts and retries. The URL is a secret: it comes from a
//! systemd credential (`$CREDENTIALS_DIRECTORY/webhook`) or from a file
//! that only its owner may read, never from the world-readable config.
//!
//! A failing notifier is reported to the caller and never blocks for long:
//! at most `attempts × timeout` plus short pauses.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, NotifyConfig, NotifyKind};

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// No `[notify]` table in the configuration.
    #[error("no notifier is configured ([notify] in the config)")]
    NotConfigured,
    /// Neither a credential nor a `url_file` gives the URL.
    #[error(
        "the webhook URL is missing: give the unit a credential named webhook, or set notify.url_file"
    )]
    NoUrl,
    /// The URL file is readable by others than its owner.
    #[error("{} is readable by group or others (mode {mode:04o}); the webhook URL is a secret: chmod 600 it", path.display())]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The URL file cannot be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Every attempt failed.
    #[error("posting to the webhook failed after {attempts} attempt(s): {last}")]
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
}

/// Something worth telling a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// The unit concerned, e.g. `ai-cmd-executor.service`.
    pub unit: String,
    /// What happened: `failed`, `repair`, `health`, ...
    pub event: String,
    /// One sentence.
    pub message: String,
    /// What was done about it.
    pub actions: Vec<String>,
}

/// A configured notifier.
#[derive(Debug, Clone)]
pub struct Notifier {
    kind: NotifyKind,
    url: String,
    timeout: Duration,
    attempts: u32,
}

/// The generic webhook's body.
#[derive(Serialize)]
struct WebhookBody<'a> {
    host: &'a str,
    unit: &'a str,
    event: &'a str,
    message: &'a str,
    actions: &'a [String],
    time: String,
}

impl Notifier {
    /// The notifier the configuration describes, `Err(NotConfigured)` if
    /// none.
    pub fn from_config(config: &Config) -> Result<Notifier, NotifyError> {
        Notifier::new(config.notify.as_ref().ok_or(NotifyError::NotConfigured)?)
    }

    /// The notifier a `[notify]` table describes.
    pub fn new(n: &NotifyConfig) -> Result<Notifier, NotifyError> {
        let url = read_url(n.url_file.as_deref())?;
        Ok(Notifier {
            kind: n.kind,
            url,
            timeout: n.timeout.get(),
            attempts: n.attempts.get(),
        })
    }

    /// The notifier of the systemd credential `webhook` alone, for when
    /// the configuration cannot be read: the kind is `slack` for a Slack
    /// incoming webhook (`https://hooks.slack.com/…`), `webhook` (generic
    /// JSON) otherwise; the default timeout and attempts. `Ok(None)` when
    /// there is no such credential.
    pub fn from_credential() -> Result<Option<Notifier>, NotifyError> {
        let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
            return Ok(None);
        };
        let cred = Path::new(&dir).join("webhook");
        if !cred.exists() {
            return Ok(None);
        }
        let url = read_secret(&cred, false)?;
        let kind = if url.starts_with("https://hooks.slack.com/") {
            NotifyKind::Slack
        } else {
            NotifyKind::Webhook
        };
        Ok(Some(Notifier {
            kind,
            url,
            timeout: crate::config::default_notify_timeout().get(),
            attempts: crate::config::default_notify_attempts().get(),
        }))
    }

    /// The request body for `event`.
    pub fn body(&self, event: &Event) -> String {
        let host = hostname();
        match self.kind {
            NotifyKind::Slack => {
                let mut text = format!(
                    "*ai-cmd-executor* on `{host}`: `{}` {}\n{}",
                    event.unit, event.event, event.message
                );
                for a in &event.actions {
                    text.push_str(&format!("\n• {a}"));
                }
                serde_json::json!({ "text": text }).to_string()
            }
            NotifyKind::Webhook => serde_json::to_string(&WebhookBody {
                host: &host,
                unit: &event.unit,
                event: &event.event,
                message: &event.message,
                actions: &event.actions,
                time: crate::spool::Timestamp::now().to_string(),
            })
            .expect("the body always serializes"),
        }
    }

    /// Posts `event`, retrying with a short pause; gives up after the
    /// configured attempts.
    pub fn send(&self, event: &Event) -> Result<(), NotifyError> {
        let body = self.body(event);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .build()
            .into();
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            match agent
                .post(&self.url)
                .header("Content-Type", "application/json")
                .send(body.as_bytes())
            {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            if attempt < self.attempts {
                std::thread::sleep(Duration::from_millis(500) * attempt);
            }
        }
        Err(NotifyError::Failed {
            attempts: self.attempts,
            last,
        })
    }
}

/// The URL from `$CREDENTIALS_DIRECTORY/webhook`, else from `url_file`,
/// which must not be readable by group or others.
fn read_url(url_file: Option<&Path>) -> Result<String, NotifyError> {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let cred = Path::new(&dir).join("webhook");
        if cred.exists() {
            return read_secret(&cred, false);
        }
    }
    match url_file {
        Some(p) => read_secret(p, true),
        None => Err(NotifyError::NoUrl),
    }
}

fn read_secret(path: &Path, check_mode: bool) -> Result<String, NotifyError> {
    let err = |source| NotifyError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    let mode = meta.mode() & 0o7777;
    if check_mode && mode & 0o077 != 0 {
        return Err(NotifyError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(err)?;
    let url = text.trim().to_owned();
    if url.is_empty() {
        return Err(NotifyError::NoUrl);
    }
    Ok(url)
}

/// This host's name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config_with(file: &Path, kind: &str) -> Config {
        Config::parse(
            &format!(
                "[notify]\nkind = \"{kind}\"\nurl_file = {:?}\n",
                file.to_str().unwrap()
            ),
            Path::new("t"),
        )
        .unwrap()
    }

    #[test]
    fn a_world_readable_url_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("webhook");
        std::fs::write(&f, "http://127.0.0.1:9/x\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Notifier::from_config(&config_with(&f, "slack")).unwrap_err();
        assert!(
            matches!(err, NotifyError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let n = Notifier::from_config(&config_with(&f, "slack")).unwrap();
        assert_eq!(n.url, "http://127.0.0.1:9/x");
    }

    #[test]
    fn bodies() {
        let n = Notifier {
            kind: NotifyKind::Slack,
            url: String::new(),
            timeout: Duration::from_secs(1),
            attempts: 1,
        };
        let ev = Event {
            unit: "ai-cmd-executor.service".into(),
            event: "failed".into(),
            message: "it stopped".into(),
            actions: vec!["restarted it".into()],
        };
        let v: serde_json::Value = serde_json::from_str(&n.body(&ev)).unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains("`ai-cmd-executor.service` failed") && text.contains("• restarted it"),
            "{text}"
        );
        let w = Notifier {
            kind: NotifyKind::Webhook,
            ..n
        };
        let v: serde_json::Value = serde_json::from_str(&w.body(&ev)).unwrap();
        assert_eq!(v["event"], "failed");
        assert_eq!(v["actions"][0], "restarted it");
        assert!(v["host"].is_string() && v["time"].is_string());
    }

    #[test]
    fn an_unreachable_webhook_fails_within_its_bounds() {
        let n = Notifier {
            kind: NotifyKind::Webhook,
            // Port 9 (discard) on loopback: refused at once.
            url: "http://127.0.0.1:9/hook".into(),
            timeout: Duration::from_secs(1),
            attempts: 2,
        };
        let err = n.send(&Event {
            unit: "u".into(),
            event: "e".into(),
            message: "m".into(),
            actions: vec![],
        });
        assert!(
            matches!(err, Err(NotifyError::Failed { attempts: 2, .. })),
            "{err:?}"
        );
    }
}
