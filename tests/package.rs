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
/// The journal's MESSAGE_ID of a hand-over to a new binary.
const HANDOVER_ID: &str = "1ba935c23dad45bbb37d67da76a4423a";

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
        "ai-cmd:ai-cmd 3770"
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
    // An agent's MCP session, as the member: `mcp` starts the server
    // installed beside the binary, and the worker runs the command.
    sb.write("/tmp/mcp-probe.py", MCP_PROBE);
    assert_eq!(
        sb.ok(&format!(
            "runuser -u agent -- python3 /tmp/mcp-probe.py {bin}"
        )),
        "succeeded ai-cmd mcp"
    );
}

/// One `run_command` over stdio, as an MCP client sends it; prints the
/// result's status, output and `submitted_via`.
const MCP_PROBE: &str = r#"
import json, subprocess, sys
p = subprocess.Popen([sys.argv[1], "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
def send(m):
    p.stdin.write((json.dumps(m) + "\n").encode())
    p.stdin.flush()
send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}}})
assert b'"serverInfo"' in p.stdout.readline()
send({"jsonrpc": "2.0", "method": "notifications/initialized"})
send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "run_command", "arguments": {"command": "id -un", "wait_secs": 60}}})
r = json.loads(p.stdout.readline())["result"]["structuredContent"]
p.stdin.close()
p.wait(timeout=30)
print(r["status"], r["output"].strip(), r["submitted_via"])
"#;

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
    //    The package carries md5sums (not the conffiles'), which verify.
    let sums = sb.ok(&format!("dpkg-deb --info {} md5sums", deb1.display()));
    assert!(sums.contains("  usr/bin/ai-cmd-executor\n"), "{sums}");
    assert!(!sums.contains("etc/"), "conffiles are not listed: {sums}");
    sb.ok(&format!("dpkg -i {}", deb1.display()));
    sb.ok("dpkg --verify ai-cmd-executor");
    // The manual: the tool's page and the protocol's, and the completions.
    sb.ok("test -s /usr/share/man/man1/ai-cmd-executor.1.gz && test -s /usr/share/man/man7/ai-cmd-executor-protocol.7.gz");
    sb.ok("zcat /usr/share/man/man1/ai-cmd-executor.1.gz | grep -q '^.SH \"EXIT STATUS\"'");
    assert_installed_and_working(&sb, "/usr/bin/ai-cmd-executor", "install");
    assert_eq!(
        sb.ok("ai-cmd-executor config check | sed -n 1p"),
        "# configuration OK: /etc/ai-cmd-executor/config.toml"
    );

    // 2. Upgrade: the operator changed the conffile; a job runs across the
    //    upgrade and more wait in the queue. The worker hands over to the
    //    new binary (same pid), the job carries on and succeeds, and dpkg
    //    returns long before it ends.
    sb.ok("sed -i 's/^#stop_grace = \"20s\"/stop_grace = \"2s\"/; s/^#max_parallel = .*/max_parallel = 1/' /etc/ai-cmd-executor/config.toml && systemctl reload ai-cmd-executor");
    sb.ok("runuser -u agent -- ai-cmd-executor submit --id across -- 'echo start; sleep 20; echo done'");
    sb.wait_until(
        "the job to run",
        DEADLINE,
        &format!("ls {SPOOL}/running"),
        |s| s.contains("across.json"),
    );
    for i in 0..5 {
        sb.ok(&format!(
            "runuser -u agent -- ai-cmd-executor submit --id queued-{i} -- 'echo {i}'"
        ));
    }
    let pid = sb.prop(SERVICE, "MainPID");
    let began = std::time::Instant::now();
    sb.ok(&format!("dpkg -i {}", deb2.display()));
    let took = began.elapsed();
    let new_version = sb.ok("dpkg-query -W -f '${Version}' ai-cmd-executor");
    assert_ne!(
        new_version, "0.1.0-1",
        "the upgrade package has a higher version"
    );
    assert!(
        took < Duration::from_secs(12),
        "dpkg -i took {took:?}: it waited for the job"
    );
    wait_active(&sb, SERVICE);
    assert_eq!(
        sb.prop(SERVICE, "MainPID"),
        pid,
        "the worker was not restarted"
    );
    sb.wait_until(
        "the worker to run the new binary",
        DEADLINE,
        &format!("readlink /proc/{pid}/exe"),
        |s| s == "/usr/bin/ai-cmd-executor",
    );
    sb.wait_until(
        "the hand-over in the journal",
        DEADLINE,
        &format!("journalctl -u {SERVICE} -o cat MESSAGE_ID={HANDOVER_ID}"),
        |s| s.contains("handing 1 running job(s) over to the new binary"),
    );
    assert!(
        sb.ok("cat /etc/ai-cmd-executor/config.toml")
            .contains("\nstop_grace = \"2s\""),
        "the changed conffile is kept"
    );
    let across = sb.wait_until(
        "the job across the upgrade to finish",
        DEADLINE,
        &format!("cat {SPOOL}/completed/across.json"),
        |_| true,
    );
    assert!(across.contains("\"status\": \"succeeded\""), "{across}");
    assert_eq!(
        sb.ok("runuser -u agent -- ai-cmd-executor log across"),
        "start\ndone"
    );
    for i in 0..5 {
        let r = sb.wait_until(
            &format!("queued-{i} to finish"),
            DEADLINE,
            &format!("cat {SPOOL}/completed/queued-{i}.json"),
            |_| true,
        );
        assert!(r.contains("\"status\": \"succeeded\""), "queued-{i}: {r}");
    }

    // A deliberately stopped worker stays stopped across an upgrade (a
    // reinstall of the same package here).
    sb.ok("ai-cmd-executor stop");
    sb.ok(&format!("dpkg -i {}", deb2.display()));
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "inactive");
    sb.ok("ai-cmd-executor start");
    wait_active(&sb, SERVICE);

    // 3. Remove stops everything: a job running then is recorded
    //    interrupted. Purge leaves nothing behind.
    let gate = "/var/tmp/remove-gate";
    sb.ok(&format!("runuser -u agent -- ai-cmd-executor submit --id at-remove -- 'while [ ! -e {gate} ]; do sleep 0.05; done'"));
    sb.wait_until(
        "the job to run",
        DEADLINE,
        &format!("ls {SPOOL}/running"),
        |s| s.contains("at-remove.json"),
    );
    sb.ok("dpkg -r ai-cmd-executor");
    let removed = sb.ok(&format!("cat {SPOOL}/completed/at-remove.json"));
    assert!(
        removed.contains("\"status\": \"interrupted\""),
        "the job running at the removal is recorded: {removed}"
    );
    assert_ne!(sb.prop(SERVICE, "ActiveState"), "active");
    sb.ok("test ! -e /etc/systemd/system/multi-user.target.wants/ai-cmd-executor.service");
    sb.ok("test ! -e /etc/systemd/system/timers.target.wants/ai-cmd-executor-health.timer");
    sb.ok("test -e /etc/ai-cmd-executor/config.toml && test -d /var/lib/ai-cmd-executor");
    // The daily timer has run once (its stamp, as systemd leaves it).
    sb.ok("touch /var/lib/systemd/timers/stamp-ai-cmd-executor-cleanup.timer");
    sb.ok("dpkg -P ai-cmd-executor");
    let left = sb.sh(
        "ls -d /lib/systemd/system/ai-cmd-executor* /usr/lib/systemd/system/ai-cmd-executor* /etc/systemd/system/*/ai-cmd-executor* \
         /etc/ai-cmd-executor /etc/cron.d/ai-cmd-executor /var/lib/ai-cmd-executor /usr/bin/ai-cmd-executor \
         /var/lib/systemd/timers/stamp-ai-cmd-executor* 2>/dev/null",
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

    // A job (here: the service user) replaces tmp/ with a link to a
    // root-owned directory: install names it and leaves the target alone.
    sb.ok("mkdir -m 0755 /srv/victim && touch -d '400 days ago' /srv/victim");
    let before = sb.ok("stat -c '%u %g %a %Y %Z' /srv/victim");
    sb.ok(&format!(
        "runuser -u ai-cmd -- sh -c 'cd {SPOOL} && mv tmp tmp.real && ln -s /srv/victim tmp'"
    ));
    let out = sb.sh(&format!("{BIN} install --mode systemd 2>&1"));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("tmp is a symbolic link to /srv/victim"),
        "{said}"
    );
    assert_eq!(sb.ok("stat -c '%u %g %a %Y %Z' /srv/victim"), before);
    sb.ok(&format!("cd {SPOOL} && rm tmp && mv tmp.real tmp"));

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

/// What must not change however root's tools are tricked: the owner,
/// group and mode of /etc and its account files (other parts of /etc
/// change as the tools install and remove their own files), and all of
/// /srv/victim: owner, mode, inode, times, content and listing.
fn fingerprint(sb: &Sandbox) -> String {
    sb.ok("stat -c '%n %u %g %a' /etc /etc/passwd /etc/shadow; \
           for p in /srv/victim /srv/victim/secret; do stat -c '%n %u %g %a %i %Y %Z' \"$p\"; done; \
           md5sum /srv/victim/secret; ls -la --time-style=+%s /srv/victim")
}

#[test]
fn root_follows_no_link_that_a_job_or_member_planted() {
    let Some(deb1) = deb("AI_CMD_EXECUTOR_DEB", "trust") else {
        return;
    };
    let Some(sb) = sandbox("trust", &[deb1.parent().unwrap()]) else {
        return;
    };
    sb.ok(&format!("dpkg -i {}", deb1.display()));
    wait_active(&sb, SERVICE);
    sb.ok("usermod -aG ai-cmd agent");
    // A root-owned directory with a secret: what the links point at,
    // besides /etc itself.
    sb.ok("mkdir -m 0755 /srv/victim && echo secret > /srv/victim/secret && chmod 0600 /srv/victim/secret \
           && touch -d '400 days ago' /srv/victim/secret /srv/victim");
    let before = fingerprint(&sb);
    // 0. On a healthy install the hardened health and cleanup units do
    //    their work and succeed.
    sb.ok("systemctl start ai-cmd-executor-health.service ai-cmd-executor-cleanup.service");
    let said = sb.ok("journalctl --no-pager -o cat -u ai-cmd-executor-health");
    assert!(said.contains("overall: ok"), "{said}");
    let agent = |cmd: &str| {
        sb.ok(&format!(
            "runuser -u agent -- ai-cmd-executor submit --wait --wait-timeout 60 -- '{cmd}'"
        ))
    };

    // Members: a queued job (with a secret in its environment) is its
    // submitter's alone; a job queued through the Python client runs too.
    sb.ok("useradd --create-home --groups ai-cmd --shell /bin/bash agent2");
    sb.ok(&format!("systemctl stop {SERVICE}"));
    sb.ok("runuser -u agent -- ai-cmd-executor submit --id secret-job --env TOKEN=hunter2 -- 'echo $TOKEN'");
    sb.ok("runuser -u agent -- python3 -c \"import sys; sys.path.insert(0, '/usr/share/ai-cmd-executor'); \
           import ai_cmd_executor as a; a.create_bash_command('echo from python', 'py-job', spool='/var/lib/ai-cmd-executor')\"");
    let job = format!("{SPOOL}/pending/secret-job.json");
    for attack in [
        format!("cat {job}"),
        format!("rm -f {job} && test ! -e {job}"),
        format!("mv {job} {SPOOL}/tmp/mine.json"),
        format!("cp /etc/hostname {SPOOL}/tmp/x.json && mv -f {SPOOL}/tmp/x.json {job}"),
    ] {
        // The same command works for the job's owner (here only cat is
        // tried, as it leaves the job in place): refusals are the
        // permissions', not the shell's.
        let out = sb.sh(&format!("runuser -u agent2 -- sh -c '{attack}'"));
        assert!(!out.status.success(), "agent2: `{attack}` worked");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("hunter2"),
            "{attack}"
        );
    }
    let own = sb.ok(&format!("runuser -u agent -- sh -c 'cat {job}'"));
    assert!(own.contains("hunter2"), "the submitter reads it: {own}");
    sb.ok(&format!("systemctl start {SERVICE}"));
    let log = sb.ok(
        "runuser -u agent -- ai-cmd-executor wait secret-job --timeout 60 >/dev/null; runuser -u agent -- ai-cmd-executor log secret-job",
    );
    assert_eq!(log, "hunter2");
    let py = sb.ok("runuser -u agent -- ai-cmd-executor wait py-job --timeout 60");
    assert!(py.contains("succeeded"), "{py}");

    // 1. The reported escalation: a member's job makes tmp/ a link to /etc;
    //    the health timer's service runs `health --fix` as root. At the
    //    package's default isolation (full) the kernel refuses the job ...
    let plant = format!("cd {SPOOL} && mv tmp tmp.old && ln -s /etc tmp");
    let refused = sb.sh(&format!(
        "runuser -u agent -- ai-cmd-executor submit --wait --wait-timeout 60 -- '{plant}'"
    ));
    let said = String::from_utf8_lossy(&refused.stdout);
    assert!(said.contains("status:    failed"), "{said}");
    sb.ok(&format!(
        "test -d {SPOOL}/tmp && test ! -L {SPOOL}/tmp && test ! -e {SPOOL}/tmp.old"
    ));
    // ... but root's tools must not rely on that (a kernel without Landlock
    // ABI 6 gives none): from here on, jobs run at isolation "process".
    sb.ok("sed -i 's/^#isolation = \"auto\"/isolation = \"process\"/' /etc/ai-cmd-executor/config.toml");
    sb.ok(&format!("systemctl restart {SERVICE}"));
    wait_active(&sb, SERVICE);
    let out = agent(&plant);
    assert!(out.contains("succeeded"), "{out}");
    let since = sb.ok("date +%s");
    sb.sh("systemctl start ai-cmd-executor-health.service");
    let said = sb.ok(&format!(
        "journalctl --no-pager -o cat -u ai-cmd-executor-health --since @{since}"
    ));
    assert!(
        said.contains("tmp is a symbolic link to /etc"),
        "the health check names the link:\n{said}"
    );
    assert_eq!(fingerprint(&sb), before, "health --fix followed the link");

    // 2. The administrator's tools, as root, on the same spool: each names
    //    the link and leaves its target alone.
    let repair = sb.sh("ai-cmd-executor repair");
    let repair = String::from_utf8_lossy(&repair.stdout).into_owned();
    assert!(
        repair.contains("tmp is a symbolic link to /etc"),
        "{repair}"
    );
    // `install` on the package's host changes nothing and says so (it is
    // tried on a planted spool without the package in the installer test).
    let install = sb.ok("ai-cmd-executor install --no-start 2>&1");
    assert!(
        install.contains("package is installed") && !install.contains("write "),
        "{install}"
    );
    sb.ok("test ! -e /etc/systemd/system/ai-cmd-executor.service");
    let tmpfiles = sb.sh("systemd-tmpfiles --create ai-cmd-executor.conf 2>&1");
    assert!(
        String::from_utf8_lossy(&tmpfiles.stdout).contains("tmp"),
        "the maintainer scripts' tool names it too"
    );
    sb.ok("dpkg-reconfigure ai-cmd-executor");
    assert_eq!(fingerprint(&sb), before, "a root tool followed the link");

    // 3. Links in place of archive/, pending/ and a log shard, and of a
    //    stale job and an old log: cleanup (the timer's, and root's by
    //    hand) and the health fix that archives stale jobs.
    sb.ok(&format!(
        "cd {SPOOL} && rm tmp && mv tmp.old tmp && systemctl restart {SERVICE}"
    ));
    sb.write(
        "/etc/ai-cmd-executor/config.toml",
        &format!(
            "spool = \"{SPOOL}\"\nstale_pending_after = \"1s\"\nlog_retention_days = 1\nisolation = \"process\"\n"
        ),
    );
    agent(&format!(
        "cd {SPOOL} && mkdir -p logs/00 && ln -s /srv/victim/secret logs/00/x@20200101T000000.000000Z.log \
         && ln -s /srv/victim logs/01 && mv archive archive.old && ln -s /srv/victim archive"
    ));
    let out = sb.sh("ai-cmd-executor cleanup 2>&1");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("working as ai-cmd"), "{said}");
    assert!(
        said.contains("archive is a symbolic link to /srv/victim"),
        "{said}"
    );
    sb.sh("systemctl start ai-cmd-executor-cleanup.service");
    sb.ok(&format!(
        "cd {SPOOL} && rm archive && mv archive.old archive"
    ));
    // pending/ as a link: planted with the worker stopped, which would
    // otherwise re-create pending/ between the `mv` and the `ln`. The
    // worker, started again, refuses to serve a linked pending/.
    sb.ok(&format!(
        "systemctl stop {SERVICE} && runuser -u ai-cmd -- sh -c 'cd {SPOOL} && mv pending pending.old && ln -s /srv/victim pending'"
    ));
    sb.sh(&format!("systemctl start {SERVICE}"));
    sb.sh("systemctl start ai-cmd-executor-health.service");
    sb.sh("ai-cmd-executor cleanup");
    assert_eq!(fingerprint(&sb), before, "cleanup followed a link");
    let said = sb.ok(&format!("journalctl --no-pager -o cat -u {SERVICE} -n 30"));
    assert!(said.contains("pending is a symbolic link"), "{said}");
    sb.ok(&format!(
        "cd {SPOOL} && rm pending && mv pending.old pending && systemctl reset-failed {SERVICE} && systemctl restart {SERVICE}"
    ));
    let out = sb.sh("ai-cmd-executor cleanup 2>&1");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("refused logs/01"), "{said}");
    assert!(said.contains("refused logs/00/x@"), "{said}");
    assert_eq!(fingerprint(&sb), before, "cleanup followed a link");

    // Each directory of the spool in turn a link to the victim, planted
    // with the worker stopped: the health timer's service, `install` and
    // `cleanup` as root leave it alone and name it.
    sb.ok(&format!("systemctl stop {SERVICE}"));
    for name in ["tmp", "pending", "running", "completed", "logs", "archive"] {
        sb.ok(&format!(
            "runuser -u ai-cmd -- sh -c 'cd {SPOOL} && mv {name} {name}.real && ln -s /srv/victim {name}'"
        ));
        // (Started back to back here, so its start-rate limit is reset.)
        sb.sh("systemctl reset-failed ai-cmd-executor-health.service; systemctl start ai-cmd-executor-health.service");
        let said = sb.ok("journalctl --no-pager -o cat -u ai-cmd-executor-health -n 40");
        assert!(
            said.contains(&format!("{name} is a symbolic link to /srv/victim")),
            "{name}: {said}"
        );
        sb.sh("ai-cmd-executor cleanup");
        sb.sh(&format!("systemctl stop {SERVICE}"));
        assert_eq!(
            fingerprint(&sb),
            before,
            "{name}: a root tool followed the link"
        );
        sb.ok(&format!("cd {SPOOL} && rm {name} && mv {name}.real {name}"));
    }
    sb.ok(&format!(
        "systemctl reset-failed {SERVICE}; systemctl start {SERVICE}"
    ));

    // The links gone, `repair` (whose probe job is submitted and read as
    //    ai-cmd) finds all well end to end.
    let out = sb.ok("ai-cmd-executor repair");
    assert!(out.contains("a probe job ran end to end"), "{out}");

    // 4. Every shipped service unit's exposure, reported.
    for unit in [
        SERVICE,
        "ai-cmd-executor-health.service",
        "ai-cmd-executor-cleanup.service",
        "ai-cmd-executor-alert@x.service",
    ] {
        let line = sb.ok(&format!(
            "systemd-analyze security --no-pager {unit} | tail -n 1"
        ));
        let _ = writeln!(std::io::stderr(), "systemd-analyze security: {line}");
        let exposure: f64 = line
            .split("service: ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in {line:?}"));
        assert!(exposure <= 3.5, "{line}");
    }

    // 5. `uninstall` leaves the package's files and service alone; the
    //    package's purge deletes the spool, links and all, and nothing
    //    they point to.
    agent(&format!("ln -s /srv/victim {SPOOL}/logs/02"));
    let out = sb.sh("ai-cmd-executor uninstall --purge 2>&1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("apt purge"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = sb.ok("ai-cmd-executor uninstall");
    assert!(out.contains("kept /etc/cron.d/ai-cmd-executor"), "{out}");
    sb.ok("test -e /etc/cron.d/ai-cmd-executor && test -e /usr/bin/ai-cmd-executor");
    assert_eq!(sb.prop(SERVICE, "ActiveState"), "active");
    sb.ok("dpkg -P ai-cmd-executor");
    sb.ok(&format!("test ! -e {SPOOL}"));
    assert_eq!(fingerprint(&sb), before, "purge followed a link");
}
