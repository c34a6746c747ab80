//! `health --format nagios` as a monitoring plugin, run by an unprivileged
//! monitoring user.
//!
//! Tier 2: the real binary, as another uid, against a spool owned by the
//! service user (in a private mount namespace whose passwd, group and
//! cron.d name them): without read access every fact it cannot read is
//! UNKNOWN (exit 3), never CRITICAL; in the spool's group, or with the read
//! ACL the README documents, a healthy worker is OK (exit 0).
//!
//! Tier 3: Debian's nagios4 runs `/usr/bin/ai-cmd-executor health --format
//! nagios` unchanged as a service check, as its own `nagios` user, against
//! the installed package under a real systemd; its status file holds the
//! state, the output and the performance data it parsed.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::sandbox::{self, Sandbox};
use common::{BIN, Spool};

/// The service user and group inside the test's namespace.
const SERVICE_ID: u32 = 60_010;
/// The monitoring user.
const MONITOR: u32 = 60_001;

fn as_root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root, and CI runs as root"
    );
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE: {test} SKIPPED: it runs the check as other users, which needs root"
    );
    false
}

/// Plugin output split by the guidelines: the status line, the long output
/// and the performance data (`label=value...` items).
struct Plugin {
    code: i32,
    status: String,
    long: Vec<String>,
    perf: Vec<String>,
}

fn plugin(out: &Output) -> Plugin {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.matches('|').count(),
        1,
        "`|` only before the performance data:\n{text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let (status, perf) = first.split_once(" | ").expect("perfdata on line 1");
    Plugin {
        code: out.status.code().expect("an exit code"),
        status: status.to_owned(),
        long: lines.map(str::to_owned).collect(),
        perf: perf.split(' ').map(str::to_owned).collect(),
    }
}

impl Plugin {
    fn metric(&self, label: &str) -> Option<&str> {
        let prefix = format!("'{label}'=");
        self.perf
            .iter()
            .find_map(|p| p.strip_prefix(prefix.as_str()))
    }
}

/// A worker as cron's `ensure-running` starts it: as the service user,
/// holding the spool's `.worker.lock`. Killed when dropped.
struct CronWorker(std::process::Child);

impl CronWorker {
    fn start(spool: &Spool) -> CronWorker {
        use std::os::unix::process::CommandExt;
        let root = spool.root();
        let log = spool.scratch("worker.stderr");
        let child = Command::new(BIN)
            .args(["--log-target", "stderr", "run", "--spool"])
            .arg(&root)
            .arg("--lock-file")
            .arg(root.join(".worker.lock"))
            .env_remove("NOTIFY_SOCKET")
            .env_remove("AI_CMD_EXECUTOR_SPOOL")
            .env("AI_CMD_EXECUTOR_CONFIG", "/dev/null")
            .uid(SERVICE_ID)
            .gid(SERVICE_ID)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&log).expect("the worker's log"))
            .spawn()
            .expect("start the worker");
        let w = CronWorker(child);
        let start = std::time::Instant::now();
        while !matches!(
            ai_cmd_executor::install::ensure::running_worker(&root),
            Ok(Some(_))
        ) {
            assert!(
                start.elapsed() < common::DEADLINE,
                "the worker did not take its lock: {:?}\n{}",
                ai_cmd_executor::install::ensure::running_worker(&root),
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Ready once it has run a job.
        common::wait_for("the spool's layout", common::DEADLINE, || {
            (root.join("tmp").is_dir() && root.join("pending").is_dir()).then_some(())
        });
        spool.submit("ready", "true");
        spool.wait_result("ready");
        w
    }
}

impl Drop for CronWorker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A host as a monitoring user sees it: a spool owned by the service
/// user `ai-cmd` (uid and gid [`SERVICE_ID`]) served by a live worker,
/// the cron fallback's file naming that user, and a user `monitor`
/// ([`MONITOR`]). The names exist only in the mount namespace in which
/// [`Host::check`] runs the plugin.
struct Host {
    spool: Spool,
    _worker: CronWorker,
    etc: PathBuf,
    config: PathBuf,
}

impl Host {
    fn new() -> Host {
        let spool = Spool::new();
        spool.open_to_all();
        // The worker lays out the rest, with the queue's ACL naming it.
        let root = spool.root();
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::chown(&root, Some(SERVICE_ID), Some(SERVICE_ID)).unwrap();
        let worker = CronWorker::start(&spool);
        let etc = spool.scratch("etc");
        fs::create_dir_all(etc.join("cron.d")).unwrap();
        let passwd = fs::read_to_string("/etc/passwd").unwrap();
        let group = fs::read_to_string("/etc/group").unwrap();
        fs::write(
            etc.join("passwd"),
            format!(
                "{passwd}ai-cmd:x:{SERVICE_ID}:{SERVICE_ID}::/nonexistent:/usr/sbin/nologin\n\
                 monitor:x:{MONITOR}:{MONITOR}::/nonexistent:/usr/sbin/nologin\n"
            ),
        )
        .unwrap();
        fs::write(
            etc.join("group"),
            format!("{group}ai-cmd:x:{SERVICE_ID}:\nmonitor:x:{MONITOR}:\n"),
        )
        .unwrap();
        fs::write(
            etc.join("cron.d/ai-cmd-executor"),
            "*/5 * * * *  ai-cmd /usr/bin/ai-cmd-executor ensure-running\n",
        )
        .unwrap();
        let config = spool.scratch("monitor.toml");
        fs::write(&config, format!("spool = \"{}\"\n", root.display())).unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
        Host {
            spool,
            _worker: worker,
            etc,
            config,
        }
    }

    /// Runs the plugin as `monitor`, with `groups` (`--clear-groups` or
    /// `--groups=N`), in a private mount namespace where `/etc/passwd`,
    /// `/etc/group` and `/etc/cron.d` are the host's of [`Host::new`].
    fn check(&self, groups: &str) -> Plugin {
        let etc = self.etc.display();
        let script = format!(
            "set -e
             mount --bind {etc}/passwd /etc/passwd
             mount --bind {etc}/group /etc/group
             mount --bind {etc}/cron.d /etc/cron.d
             exec setpriv --reuid={MONITOR} --regid={MONITOR} {groups} -- \
                 env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/ LANG=C.UTF-8 \
                 {BIN} --config {} health --format nagios",
            self.config.display()
        );
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .output()
            .expect("unshare");
        plugin(&out)
    }
}

#[test]
fn without_read_access_the_check_is_unknown_never_critical() {
    if !as_root("without_read_access_the_check_is_unknown_never_critical") {
        return;
    }
    let host = Host::new();
    let p = host.check("--clear-groups");
    let all = format!("{}\n{}", p.status, p.long.join("\n"));
    eprintln!("DEBUG {all}\n{:?}", p.perf);
    assert_eq!(p.code, 3, "UNKNOWN:\n{all}");
    assert!(p.status.starts_with("AI-CMD-EXECUTOR UNKNOWN - "), "{all}");
    assert!(
        !p.long
            .iter()
            .any(|l| l.starts_with("CRITICAL") || l.starts_with("WARNING")),
        "nothing is worse than unknown for a healthy worker:\n{all}"
    );
    for id in [
        "spool.layout",
        "spool.stale",
        "spool.orphans",
        "cron.fallback",
    ] {
        let line = p
            .long
            .iter()
            .find(|l| l.starts_with(&format!("UNKNOWN {id}: ")))
            .unwrap_or_else(|| panic!("{id} is unknown:\n{all}"));
        assert!(
            line.contains(&format!("as uid {MONITOR} (monitor)"))
                && line.contains("Permission denied")
                && line.contains("group ai-cmd")
                && line.contains("README"),
            "{line}"
        );
    }
    // What it can read is still measured; the queue is not, and is left
    // out rather than reported as empty.
    assert!(p.metric("spool_free").is_some(), "{:?}", p.perf);
    assert_eq!(p.metric("pending"), None, "{:?}", p.perf);
}

#[test]
fn in_the_spools_group_or_with_the_read_acl_a_healthy_worker_is_ok() {
    if !as_root("in_the_spools_group_or_with_the_read_acl_a_healthy_worker_is_ok") {
        return;
    }
    let host = Host::new();
    host.spool.submit_json(
        "queued",
        serde_json::json!({"command": "sleep 30", "timeout_secs": 60}),
    );
    let p = host.check(&format!("--groups={SERVICE_ID}"));
    let all = format!("{}\n{}", p.status, p.long.join("\n"));
    assert_eq!(p.code, 0, "OK in the group:\n{all}");
    assert!(p.status.starts_with("AI-CMD-EXECUTOR OK - "), "{all}");
    for label in ["pending", "running", "oldest_pending", "spool_free"] {
        assert!(p.metric(label).is_some(), "{label} in {:?}", p.perf);
    }

    // The read ACL instead, as the README gives it: the directories
    // `health` lists, and the worker's lock files (README, "Monitoring").
    let s = host.spool.root();
    let s = s.display();
    let acl = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -e
             setfacl -m u:{MONITOR}:rx {s} {s}/tmp {s}/pending {s}/running {s}/cancel
             setfacl -d -m u:{MONITOR}:r {s}
             find {s} -maxdepth 1 -type f -name '.*.lock' -exec setfacl -m u:{MONITOR}:r {{}} +"
        ))
        .status()
        .unwrap();
    assert!(acl.success());
    let p = host.check("--clear-groups");
    let all = format!("{}\n{}", p.status, p.long.join("\n"));
    assert_eq!(p.code, 0, "OK with the read ACL:\n{all}");
    assert!(p.metric("pending").is_some(), "{:?}", p.perf);
}

// ---- tier 3: nagios4 -------------------------------------------------------

const SPOOL: &str = "/var/lib/ai-cmd-executor";
const SERVICE: &str = "ai-cmd-executor.service";
const DEADLINE: Duration = Duration::from_secs(90);
/// Where the test's nagios keeps its configuration and state.
const NAGIOS: &str = "/var/tmp/aice-nagios";

/// The package under test, or `None` (a notice; a failure in CI).
fn deb(test: &str) -> Option<PathBuf> {
    match std::env::var_os("AI_CMD_EXECUTOR_DEB").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(fs::canonicalize(p).unwrap()),
        _ => {
            assert!(
                !sandbox::required(),
                "AI_CMD_EXECUTOR_DEB must name a built .deb in CI (scripts/test.sh builds it)"
            );
            let _ = writeln!(
                std::io::stderr(),
                "NOTICE: monitoring test {test} SKIPPED: AI_CMD_EXECUTOR_DEB is not set (run scripts/build-deb.sh)"
            );
            None
        }
    }
}

/// nagios4, when it is installed on the host (the sandbox's lower layer).
fn nagios_installed(test: &str) -> bool {
    if Path::new("/usr/sbin/nagios4").exists() {
        return true;
    }
    assert!(
        !sandbox::required(),
        "nagios4 must be installed in CI (scripts/test.sh installs nagios4-core)"
    );
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE: monitoring test {test} SKIPPED: /usr/sbin/nagios4 is missing (apt-get install --no-install-recommends nagios4-core)"
    );
    false
}

/// A minimal nagios: one host, one service whose check command is the
/// plugin, unchanged, checked every 5 s (`interval_length=1`).
fn nagios_config() -> (String, String) {
    let main = format!(
        "log_file={NAGIOS}/nagios.log
cfg_file={NAGIOS}/objects.cfg
object_cache_file={NAGIOS}/objects.cache
precached_object_file={NAGIOS}/objects.precache
status_file={NAGIOS}/status.dat
status_update_interval=1
nagios_user=nagios
nagios_group=nagios
check_external_commands=1
command_file={NAGIOS}/rw/nagios.cmd
lock_file={NAGIOS}/nagios.pid
temp_file={NAGIOS}/nagios.tmp
temp_path={NAGIOS}
check_result_path={NAGIOS}/checkresults
check_result_reaper_frequency=1
retain_state_information=0
interval_length=1
use_syslog=0
enable_notifications=0
enable_flap_detection=0
check_for_updates=0
max_service_check_spread=1
max_host_check_spread=1
"
    );
    let objects = "define timeperiod {
    timeperiod_name always
    alias           always
    sunday          00:00-24:00
    monday          00:00-24:00
    tuesday         00:00-24:00
    wednesday       00:00-24:00
    thursday        00:00-24:00
    friday          00:00-24:00
    saturday        00:00-24:00
}
define contact {
    contact_name                  nobody
    host_notifications_enabled    0
    service_notifications_enabled 0
    host_notification_period      always
    service_notification_period   always
    host_notification_options     n
    service_notification_options  n
    host_notification_commands    noop
    service_notification_commands noop
}
define command {
    command_name noop
    command_line /bin/true
}
define command {
    command_name ai-cmd-executor-health
    command_line /usr/bin/ai-cmd-executor health --format nagios
}
define host {
    host_name             sandbox
    address               127.0.0.1
    check_command         noop
    max_check_attempts    1
    check_interval        60
    check_period          always
    notification_period   always
    contacts              nobody
}
define service {
    host_name             sandbox
    service_description   ai-cmd-executor
    check_command         ai-cmd-executor-health
    max_check_attempts    1
    check_interval        5
    retry_interval        5
    check_period          always
    notification_period   always
    contacts              nobody
}
"
    .to_owned();
    (main, objects)
}

/// The `servicestatus` block of the plugin's service in nagios's status
/// file, as `key=value` pairs.
fn service_status(sb: &Sandbox) -> Option<Vec<(String, String)>> {
    let out = sb.sh(&format!("cat {NAGIOS}/status.dat"));
    let text = String::from_utf8_lossy(&out.stdout);
    let block = text
        .split("servicestatus {")
        .skip(1)
        .map(|b| b.split('}').next().unwrap_or_default())
        .find(|b| b.contains("service_description=ai-cmd-executor\n"))?;
    Some(
        block
            .lines()
            .filter_map(|l| l.trim().split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

fn field<'a>(status: &'a [(String, String)], key: &str) -> &'a str {
    status
        .iter()
        .find(|(k, _)| k == key)
        .map_or("", |(_, v)| v.as_str())
}

/// (Re)starts nagios (it takes the `nagios` user's groups at start),
/// forces a check of the plugin's service and returns its status once
/// nagios has a result newer than the start.
fn nagios_check(sb: &Sandbox) -> Vec<(String, String)> {
    sb.ok(&format!(
        "if [ -e {NAGIOS}/nagios.pid ]; then kill $(cat {NAGIOS}/nagios.pid) 2>/dev/null || true; fi
         while pgrep -x nagios4 >/dev/null; do sleep 0.1; done
         rm -f {NAGIOS}/status.dat {NAGIOS}/rw/nagios.cmd
         /usr/sbin/nagios4 -d {NAGIOS}/nagios.cfg"
    ));
    let since: u64 = sb.ok("date +%s").parse().unwrap();
    sb.wait_until(
        "nagios's command file",
        DEADLINE,
        &format!("test -p {NAGIOS}/rw/nagios.cmd && echo ok"),
        |s| s == "ok",
    );
    sb.ok(&format!(
        "now=$(date +%s); printf '[%s] SCHEDULE_FORCED_SVC_CHECK;sandbox;ai-cmd-executor;%s\\n' $now $now > {NAGIOS}/rw/nagios.cmd"
    ));
    common::wait_for("nagios to check the service", DEADLINE, || {
        let s = service_status(sb)?;
        let checked: u64 = field(&s, "last_check").parse().ok()?;
        (field(&s, "has_been_checked") == "1" && checked >= since).then_some(s)
    })
}

#[test]
fn nagios4_runs_the_plugin_unchanged_as_its_own_user() {
    let test = "nagios4";
    let Some(deb) = deb(test) else {
        return;
    };
    if !sandbox::available(test) || !nagios_installed(test) {
        return;
    }
    let Some(sb) = Sandbox::boot(test, &[deb.parent().unwrap()]) else {
        return;
    };
    sb.ok("rm -f /usr/sbin/policy-rc.d");
    sb.ok(&format!("dpkg -i {}", deb.display()));
    sb.wait_until(
        "the service to be active",
        DEADLINE,
        &format!("systemctl show -p ActiveState --value {SERVICE}"),
        |s| s == "active",
    );
    // The package's own nagios daemon is not what runs here.
    sb.sh("systemctl stop nagios4.service");
    let (main, objects) = nagios_config();
    sb.write(&format!("{NAGIOS}/nagios.cfg"), &main);
    sb.write(&format!("{NAGIOS}/objects.cfg"), &objects);
    sb.ok(&format!(
        "mkdir -p {NAGIOS}/rw {NAGIOS}/checkresults
         chown -R nagios:nagios {NAGIOS}
         /usr/sbin/nagios4 -v {NAGIOS}/nagios.cfg"
    ));
    // A job waiting in the queue, for the queue's metrics.
    sb.ok("useradd --create-home --groups ai-cmd agent
         runuser -u agent -- ai-cmd-executor submit --id long -- 'sleep 600'");
    sb.wait_until(
        "the job to run",
        DEADLINE,
        &format!("ls {SPOOL}/running"),
        |s| s.contains("long.json"),
    );

    // 1. `nagios` is no member of ai-cmd: what it cannot read is unknown.
    let s = nagios_check(&sb);
    let output = field(&s, "plugin_output");
    let long = field(&s, "long_plugin_output");
    assert_eq!(
        field(&s, "current_state"),
        "3",
        "UNKNOWN, not CRITICAL: {output}\n{long}"
    );
    assert!(
        output.starts_with("AI-CMD-EXECUTOR UNKNOWN - ") && output.contains("as uid"),
        "{output}"
    );
    assert!(
        !long.contains("CRITICAL") && !long.contains("WARNING"),
        "{long}"
    );
    assert!(long.contains("(nagios)"), "as nagios's own user: {long}");

    // 2. In the group (the README's way): OK, with the queue's metrics in
    //    the performance data nagios split off.
    sb.ok("adduser --quiet nagios ai-cmd");
    let s = nagios_check(&sb);
    let output = field(&s, "plugin_output");
    let perf = field(&s, "performance_data");
    assert_eq!(
        field(&s, "current_state"),
        "0",
        "OK: {output}\n{}",
        field(&s, "long_plugin_output")
    );
    assert!(output.starts_with("AI-CMD-EXECUTOR OK - "), "{output}");
    assert!(
        !output.contains('|'),
        "nagios took the perfdata off: {output}"
    );
    for metric in [
        "'pending'=0;;;0",
        "'running'=1;;;0;1",
        "'oldest_pending'=0s;1800;;0",
        "'n_restarts'=0c;;;0",
    ] {
        assert!(perf.contains(metric), "{metric} in {perf}");
    }
    assert!(perf.contains("'spool_free'="), "{perf}");

    // 3. The read ACL instead of the group, as the README gives it; it
    //    outlasts systemd-tmpfiles (what the package runs on upgrade) and
    //    a restart of the worker.
    sb.ok(&format!(
        "deluser --quiet nagios ai-cmd
         setfacl -m u:nagios:rx {SPOOL} {SPOOL}/tmp {SPOOL}/pending {SPOOL}/running {SPOOL}/cancel
         setfacl -d -m u:nagios:r {SPOOL}
         find {SPOOL} -maxdepth 1 -type f -name '.*.lock' -exec setfacl -m u:nagios:r {{}} +
         systemd-tmpfiles --create ai-cmd-executor.conf
         systemctl restart {SERVICE}"
    ));
    sb.wait_until(
        "the service to be active again",
        DEADLINE,
        &format!("systemctl show -p ActiveState --value {SERVICE}"),
        |s| s == "active",
    );
    let s = nagios_check(&sb);
    assert_eq!(
        field(&s, "current_state"),
        "0",
        "OK with the ACL: {}\n{}",
        field(&s, "plugin_output"),
        field(&s, "long_plugin_output")
    );
    sb.sh(&format!("kill $(cat {NAGIOS}/nagios.pid)"));
}
