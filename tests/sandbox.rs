//! Tier 3: the sandbox the system tests boot is self-contained. It boots
//! its own minimal target, not what the host enabled (this image enables
//! PostgreSQL, whose start never finished in a sandbox that shared the
//! host's network and found its port taken), in a network namespace of its
//! own, on a root without the project's leftovers on the host.

mod common;

use std::net::TcpListener;

use common::sandbox::Sandbox;

#[test]
fn the_sandbox_boots_alone_whatever_the_host_runs() {
    // A port a service the host enabled would take, taken on the host (or
    // already taken by the host's own server: the same for the sandbox).
    let _held = TcpListener::bind("127.0.0.1:5432").ok();
    let Some(sb) = Sandbox::boot("isolation", &[]) else {
        return;
    };
    // Booted (Sandbox::boot waits for running or degraded) to its own
    // target, with nothing the host enabled for multi-user.target.
    assert_eq!(sb.ok("systemctl get-default"), "aice-sandbox.target");
    assert_eq!(sb.prop("multi-user.target", "ActiveState"), "inactive");
    // Its own network: loopback only.
    let links = sb.ok("ls /sys/class/net");
    assert_eq!(links, "lo", "{links}");
    // No leftover of an install on the host.
    sb.ok("test ! -e /etc/cron.d/ai-cmd-executor && test ! -e /etc/ai-cmd-executor");
    // Where the host has PostgreSQL enabled, it did not start at boot, and
    // started by hand it gets its port, taken on the host.
    let enabled = sb.sh("systemctl is-enabled postgresql.service");
    if String::from_utf8_lossy(&enabled.stdout).trim() == "enabled" {
        assert_eq!(sb.prop("postgresql.service", "ActiveState"), "inactive");
        sb.ok("systemctl start postgresql.service");
        sb.wait_until(
            "PostgreSQL to listen in the sandbox",
            std::time::Duration::from_secs(60),
            "ss -ltnH 'sport = :5432'",
            |s| !s.is_empty(),
        );
    }
}
