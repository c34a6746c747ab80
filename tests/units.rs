//! The unit files: every one passes `systemd-analyze verify` once rendered
//! with this build's binary, and the stop timeout leaves room for the
//! worker's own grace periods.

mod common;

use std::process::Command;

use ai_cmd_executor::config::Config;
use ai_cmd_executor::systemd::units::{self, RenderOptions};
use common::BIN;

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            !common::sandbox::required(),
            "systemd-analyze is required in CI (package systemd)"
        );
        eprintln!("NOTICE: systemd-analyze not installed; unit verification SKIPPED");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = RenderOptions {
        binary: BIN.into(),
        ..RenderOptions::default()
    };
    let mut paths = Vec::new();
    for (name, text) in units::render(&opts) {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

fn service_setting(key: &str) -> String {
    units::UNITS[0]
        .1
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} not set"))
        .to_owned()
}

#[test]
fn stop_timeout_exceeds_the_job_grace_periods() {
    let c = Config::default();
    let stop = humantime::parse_duration(&service_setting("TimeoutStopSec")).unwrap();
    assert!(
        stop > c.stop_grace.get() + c.kill_grace.get(),
        "TimeoutStopSec {stop:?} must exceed stop_grace + kill_grace"
    );
    let watchdog = humantime::parse_duration(&service_setting("WatchdogSec")).unwrap();
    assert!(
        watchdog < c.rescan_interval.get(),
        "the heartbeat, not the rescan, is the idle wake-up"
    );
}
