//! The unit files in `units/`, the single source for the package and the
//! installer. They are compiled in and rendered with local values
//! substituted (the binary's path, the service user).

/// The path of the binary the shipped units name.
pub const SHIPPED_BINARY: &str = "/usr/bin/ai-cmd-executor";

/// The service user and group the shipped units name.
pub const SHIPPED_USER: &str = "ai-cmd";

/// The main service.
pub const SERVICE: &str = "ai-cmd-executor.service";
/// The health-check timer.
pub const HEALTH_TIMER: &str = "ai-cmd-executor-health.timer";
/// The maintenance timer.
pub const CLEANUP_TIMER: &str = "ai-cmd-executor-cleanup.timer";

/// Every unit file, by name, as shipped.
pub const UNITS: [(&str, &str); 6] = [
    (SERVICE, include_str!("../../units/ai-cmd-executor.service")),
    (
        "ai-cmd-executor-health.service",
        include_str!("../../units/ai-cmd-executor-health.service"),
    ),
    (
        HEALTH_TIMER,
        include_str!("../../units/ai-cmd-executor-health.timer"),
    ),
    (
        "ai-cmd-executor-cleanup.service",
        include_str!("../../units/ai-cmd-executor-cleanup.service"),
    ),
    (
        CLEANUP_TIMER,
        include_str!("../../units/ai-cmd-executor-cleanup.timer"),
    ),
    (
        "ai-cmd-executor-alert@.service",
        include_str!("../../units/ai-cmd-executor-alert@.service"),
    ),
];

/// Local values to put in the units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// Absolute path of the installed binary.
    pub binary: String,
    /// Service user (its group has the same name).
    pub user: String,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            binary: SHIPPED_BINARY.into(),
            user: SHIPPED_USER.into(),
        }
    }
}

/// Every unit with the local values in place of the shipped ones.
pub fn render(opts: &RenderOptions) -> Vec<(&'static str, String)> {
    UNITS
        .iter()
        .map(|(name, text)| (*name, render_one(text, opts)))
        .collect()
}

fn render_one(text: &str, opts: &RenderOptions) -> String {
    text.lines()
        .map(|line| {
            let line = line.replace(SHIPPED_BINARY, &opts.binary);
            match line.split_once('=') {
                Some(("User", _)) => format!("User={}", opts.user),
                Some(("Group", _)) => format!("Group={}", opts.user),
                _ => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rendering_is_the_shipped_text() {
        for ((name, shipped), (rname, rendered)) in
            UNITS.iter().zip(render(&RenderOptions::default()))
        {
            assert_eq!(*name, rname);
            assert_eq!(*shipped, rendered, "{name} drifts from units/");
        }
    }

    #[test]
    fn local_values_are_substituted() {
        let opts = RenderOptions {
            binary: "/opt/x/bin/ai-cmd-executor".into(),
            user: "agent-runner".into(),
        };
        let units = render(&opts);
        let service = &units.iter().find(|(n, _)| *n == SERVICE).unwrap().1;
        assert!(service.contains("ExecStart=/opt/x/bin/ai-cmd-executor run\n"));
        assert!(service.contains("\nUser=agent-runner\nGroup=agent-runner\n"));
        assert!(!service.contains(SHIPPED_BINARY));
    }

    #[test]
    fn service_has_the_supervision_settings() {
        let service = UNITS[0].1;
        for line in [
            "Type=notify",
            "WatchdogSec=30s",
            "Restart=on-failure",
            "StartLimitBurst=10",
            "OnFailure=ai-cmd-executor-alert@%n.service",
            "ExecReload=/usr/bin/ai-cmd-executor config check --quiet",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "StateDirectory=ai-cmd-executor",
            "KillMode=mixed",
        ] {
            assert!(service.lines().any(|l| l == line), "missing {line}");
        }
    }
}
