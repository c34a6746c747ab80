//! Tier 3: the binary and the units installed into a booted sandbox, as
//! `install --mode systemd` lays them out, without the package.

use std::path::Path;
use std::time::Duration;

use ai_cmd_executor::systemd::units::{self, RenderOptions};

use super::BIN;
use super::sandbox::Sandbox;

/// The main service.
pub const SERVICE: &str = "ai-cmd-executor.service";
/// Where the binary is installed inside.
pub const BIN_INSIDE: &str = "/usr/local/bin/ai-cmd-executor";
/// The spool.
pub const SPOOL: &str = "/var/lib/ai-cmd-executor";

/// Boots a sandbox with the binary, the service user, an `agent` user in
/// its group, the units and a config (short grace periods), the service
/// and both timers enabled and started. `dropin` is extra `[Service]`
/// text for the service.
pub fn installed(test: &str, dropin: Option<&str>) -> Option<Sandbox> {
    let bin_dir = Path::new(BIN).parent().expect("binary dir");
    let sb = Sandbox::boot(test, &[bin_dir])?;
    sb.ok(&format!(
        "install -m 0755 {BIN} {BIN_INSIDE}
         rm -f /usr/sbin/policy-rc.d
         getent group ai-cmd >/dev/null || groupadd --system ai-cmd
         getent passwd ai-cmd >/dev/null || useradd --system --gid ai-cmd --home-dir {SPOOL} --no-create-home --shell /usr/sbin/nologin ai-cmd
         useradd --create-home --groups ai-cmd --shell /bin/bash agent"
    ));
    let opts = RenderOptions {
        binary: BIN_INSIDE.into(),
        ..RenderOptions::default()
    };
    for (name, text) in units::render(&opts) {
        sb.write(&format!("/etc/systemd/system/{name}"), &text);
    }
    if let Some(d) = dropin {
        sb.write(
            &format!("/etc/systemd/system/{SERVICE}.d/test.conf"),
            &format!("[Service]\n{d}\n"),
        );
    }
    sb.write(
        "/etc/ai-cmd-executor/config.toml",
        &format!("spool = \"{SPOOL}\"\nstop_grace = \"2s\"\nkill_grace = \"1s\"\n"),
    );
    sb.ok(&format!(
        "systemctl daemon-reload && systemctl enable --now {SERVICE} {} {}",
        units::HEALTH_TIMER,
        units::CLEANUP_TIMER
    ));
    sb.wait_until(
        "the service to be active/running",
        Duration::from_secs(60),
        &format!("systemctl show -p ActiveState,SubState {SERVICE}"),
        |s| s.contains("ActiveState=active") && s.contains("SubState=running"),
    );
    Some(sb)
}
