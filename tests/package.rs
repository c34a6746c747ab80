//! Tier 3: the .deb and the installer under a real systemd, and the cron
//! fallback in a namespace without one. The packages come from
//! `scripts/build-deb.sh` (`scripts/test.sh` builds them and sets
//! `AI_CMD_EXECUTOR_DEB` and `AI_CMD_EXECUTOR_DEB_UPGRADE`).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::BIN;
use common::sandbox::{self, Sandbox};

const SERVICE: &str = "ai-cmd-executor.service";
const TIMERS: &str = "ai-cmd-executor-health.timer ai-cmd-executor-cleanup.timer";
const SPOOL: &str = "/var/lib/ai-cmd-executor";
const DEADLINE: Duration = Duration::from_secs(90);

/// The package under test, or `None` (skip notice; a failure in CI).
fn deb(var: &str, test: &str) -> Option<PathBuf> {
    match std::env::var_os(var).map(PathBuf::from) {
        Some(p) if p.is_file() => Some(std::fs::canonicalize(p).unwrap()),
        _ => {
            assert!(
                !sandbox::required(),
                "{var} must name a built .deb in CI (scripts/test.sh builds it)"
            );
            // Past the harness's capture, so it is always seen.
            let _ = writeln!(
                std::io::stderr(),
                "NOTICE: package test {test} SKIPPED: {var} is not set (run scripts/build-deb.sh)"
            );
            None
        }
    }
}

/// A sandbox where the package can be installed: policy-rc.d removed (the
/// image's Docker-style one forbids starting services) and an `agent` user
/// to join the group once it exists.
fn sandbox(test: &str, binds: &[&Path]) -> Option<Sandbox> {
    let sb = Sandbox::boot(test, binds)?;
    sb.ok("rm -f /usr/sbin/policy-rc.d && useradd --create-home --shell /bin/bash agent");
    Some(sb)
}

fn wait_active(sb: &Sandbox, unit: &str) {
    sb.wait_until(
        &format!("{unit} to be active"),
        DEADLINE,
        &format!("systemctl show -p ActiveState --value {unit}"),
        |s| s == "active",
    );
}

/// Asserts the end state both the .deb and `install --mode systemd` reach.
fn assert_installed_and_working(sb: &Sandbox, bin: &str, tag: &str) {
    wait_active(sb, SERVICE);
    assert_eq!(sb.ok(&format!("systemctl is-enabled {SERVICE}")), "enabled");
    for t in TIMERS.split(' ') {
        wait_active(sb, t);
        assert_eq!(
            sb.ok(&format!("systemctl is-enabled {t}")),
            "enabled",
            "{t}"
        );
    }
    assert_eq!(
        sb.ok(&format!("stat -c '%U:%G %a' {SPOOL}/pending")),
        "ai-cmd:ai-cmd 2770"
    );
    sb.ok("usermod -a -G ai-cmd agent");
    let out = sb.ok(&format!(
        "runuser -u agent -- {bin} submit --id probe-{tag} --wait -- 'id -un'"
    ));
    assert!(out.contains("succeeded"), "{out}");
    assert_eq!(
        sb.ok(&format!("runuser -u agent -- {bin} log probe-{tag}")),
        "ai-cmd"
    );
}

#[test]
fn deb_install_upgrade_remove_purge() {
    let (Some(deb1), Some(deb2)) = (
        deb("AI_CMD_EXECUTOR_DEB", "deb"),
        deb("AI_CMD_EXECUTOR_DEB_UPGRADE", "deb"),
    ) else {
        return;
    };
    let dirs: Vec<&Path> = vec![deb1.parent().unwrap(), deb2.parent().unwrap()];
    let Some(sb) = sandbox("deb", &dirs) else {
        return;
    };

    // 1. Install: enabled and active, timers active, a group member's job runs.
    sb.ok(&format!("dpkg -i {}", deb1.display()));
    assert_installed_and_working(&sb, "/usr/bin/ai-cmd-executor", "install");
    assert_eq!(
        sb.ok("ai-cmd-executor config check | sed -n 1p"),
        "# configuration OK: /etc/ai-cmd-executor/config.toml"
    );

    // 2. Upgrade: the operator changed the conffile; jobs wait in the queue
    //    behind a running one.
    sb.ok("sed -i 's/^#stop_grace = \"20s\"/stop_grace = \"2s\"/' /etc/ai-cmd-executor/config.toml && systemctl reload ai-cmd-executor");
    let gate = "/var/tmp/upgrade-gate";
    sb.ok(&format!("runuser -u agent -- ai-cmd-executor submit --id blocker -- 'while [ ! -e {gate} ]; do sleep 0.05; done'"));
    sb.wait_until(
        "the blocker to run",
        DEADLINE,
        &format!("ls {SPOOL}/running"),
        |s| s.contains("blocker.json"),
    );
    for i in 0..5 {
        sb.ok(&format!(
            "runuser -u agent -- ai-cmd-executor submit --id queued-{i} -- 'echo {i}'"
        ));
    }
    let pid = sb.prop(SERVICE, "MainPID");
    sb.ok(&format!("dpkg -i {}", deb2.display()));
    let new_version = sb.ok("dpkg-query -W -f '${Version}' ai-cmd-executor");
    assert_ne!(
        new_version, "0.1.0-1",
        "the upgrade package has a higher version"
    );
    wait_active(&sb, SERVICE);
    let new_pid = sb.prop(SERVICE, "MainPID");
    assert_ne!(new_pid, pid, "the service was restarted");
    assert!(
        sb.ok("cat /etc/ai-cmd-executor/config.toml")
            .contains("\nstop_grace = \"2s\""),
        "the changed conffile is kept"
    );
    sb.ok(&format!("touch {gate}"));
    for i in 0..5 {
        let r = sb.wait_until(
            &format!("queued-{i} to finish"),
            DEADLINE,
            &format!("cat {SPOOL}/completed/queued-{i}.json"),
            |_| true,
        );
        assert!(r.contains("\"status\": \"succeeded\""), "queued-{i}: {r}");
    }
    let blocker = sb.ok(&format!("cat {SPOOL}/completed/blocker.json"));
    assert!(
        blocker.contains("\"status\": \"interrupted\""),
        "the job running at the upgrade is recorded: {blocker}"
    );

    // 3. Remove stops and disables; purge leaves nothing behind.
    sb.ok("dpkg -r ai-cmd-executor");
    assert_ne!(sb.prop(SERVICE, "ActiveState"), "active");
    sb.ok("test ! -e /etc/systemd/system/multi-user.target.wants/ai-cmd-executor.service");
    sb.ok("test ! -e /etc/systemd/system/timers.target.wants/ai-cmd-executor-health.timer");
    sb.ok("test -e /etc/ai-cmd-executor/config.toml && test -d /var/lib/ai-cmd-executor");
    sb.ok("dpkg -P ai-cmd-executor");
    let left = sb.sh(
        "ls -d /lib/systemd/system/ai-cmd-executor* /usr/lib/systemd/system/ai-cmd-executor* /etc/systemd/system/*/ai-cmd-executor* \
         /etc/ai-cmd-executor /etc/cron.d/ai-cmd-executor /var/lib/ai-cmd-executor /usr/bin/ai-cmd-executor 2>/dev/null",
    );
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "",
        "purge left files behind"
    );
}

#[test]
fn installer_in_systemd_mode_matches_the_package_and_is_idempotent() {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let Some(sb) = sandbox("installer", &[bin_dir]) else {
        return;
    };
    let first = sb.ok(&format!("{BIN} install --mode systemd"));
    assert!(
        first.contains("write /etc/systemd/system/ai-cmd-executor.service"),
        "{first}"
    );
    assert!(
        first.contains("create system user and group ai-cmd"),
        "{first}"
    );
    assert_installed_and_working(&sb, "/usr/local/bin/ai-cmd-executor", "installer");
    let again = sb.ok(&format!("{BIN} install --mode systemd"));
    assert!(
        again.contains("install: no changes"),
        "a second run changes nothing:\n{again}"
    );

    let dry = sb.ok(&format!("{BIN} uninstall --dry-run"));
    assert!(
        dry.contains("would remove /etc/systemd/system/ai-cmd-executor.service"),
        "{dry}"
    );
    let out = sb.ok(&format!("{BIN} uninstall --purge"));
    assert!(
        out.contains("purge: deleting /var/lib/ai-cmd-executor"),
        "{out}"
    );
    assert_ne!(sb.prop(SERVICE, "ActiveState"), "active");
    sb.ok("test ! -e /etc/systemd/system/ai-cmd-executor.service && test ! -e /var/lib/ai-cmd-executor && test ! -e /etc/ai-cmd-executor");
}

#[test]
fn cron_mode_without_systemd_keeps_exactly_one_worker() {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let script = format!(
        r#"set -eu
        test ! -d /run/systemd/system   # no systemd here
        {BIN} install --mode auto --no-start | tee /tmp/install.out
        grep -q 'write /etc/cron.d/ai-cmd-executor' /tmp/install.out
        stat -c '%U %a' /etc/cron.d/ai-cmd-executor
        # Debian's cron reads the file and runs its @reboot line.
        rm -f /run/crond.reboot /run/crond.pid
        cron
        for i in $(seq 1 400); do
            if [ -e {SPOOL}/.worker.lock ] && ! flock -n {SPOOL}/.worker.lock true; then break; fi
            sleep 0.05
        done
        if flock -n {SPOOL}/.worker.lock true; then echo "cron did not start a worker"; exit 1; fi
        echo "cron started worker $(cat {SPOOL}/.worker.lock)"
        # Many ensure-running calls at once: still exactly one worker.
        for i in $(seq 1 12); do runuser -u ai-cmd -- /usr/local/bin/ai-cmd-executor ensure-running & done
        wait
        n=0
        for p in /proc/[0-9]*; do
            [ "$(cat $p/comm 2>/dev/null)" = ai-cmd-executor ] || continue
            if tr '\0' ' ' < $p/cmdline | grep -q -- ' run --lock-file'; then n=$((n+1)); fi
        done
        echo "workers=$n"
        useradd --create-home --groups ai-cmd agent
        runuser -u agent -- /usr/local/bin/ai-cmd-executor submit --id cron-probe --wait --wait-timeout 60 -- 'id -un'
        {BIN} install --mode cron | tail -n 1
        "#
    );
    let Some(out) = sandbox::run_without_systemd("cron", &[bin_dir], &script) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cron scenario failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("root 644"), "{stdout}");
    assert!(stdout.contains("cron started worker"), "{stdout}");
    assert!(
        stdout.contains("workers=1\n"),
        "exactly one worker:\n{stdout}"
    );
    assert!(stdout.contains("status:    succeeded"), "{stdout}");
    assert!(stdout.contains("install: no changes"), "{stdout}");
}
