//! `install` / `uninstall`: persistence across reboots. systemd mode writes
//! the units (rendered from `units/`) and drives systemd over D-Bus; cron
//! mode writes `/etc/cron.d/ai-cmd-executor`, whose `ensure-running` keeps a
//! detached worker alive. Both create the service user and the spool and
//! install the default configuration if there is none.
//!
//! Every step is reported as it is taken (or, with `--dry-run`, as it would
//! be); a second run finds nothing to change and says so.

pub mod ensure;
pub mod files;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::ValueEnum;
use nix::unistd::{Gid, Group, Uid, User};

use crate::spool::safe::SafeDir;
use crate::spool::{LAYOUT, ROOT_MODE};
use crate::systemd::bus::{Systemd, block_on};
use crate::systemd::units::{CLEANUP_TIMER, HEALTH_TIMER, SERVICE};
use files::{Local, under};

/// Where the installer puts a binary it copies.
pub const LOCAL_BINARY: &str = "/usr/local/bin/ai-cmd-executor";
/// The MCP server `install` copies beside [`LOCAL_BINARY`].
pub const LOCAL_MCP_SERVER: &str = "/usr/local/bin/ai-cmd-executor-mcp";
/// The cron file.
pub const CRON_FILE: &str = "/etc/cron.d/ai-cmd-executor";
/// The configuration file.
pub const CONFIG_FILE: &str = crate::config::DEFAULT_CONFIG_PATH;
/// Unit files the installer writes go here (the package uses /lib).
pub const UNIT_DIR: &str = "/etc/systemd/system";
/// The sysusers.d entry the installer writes.
pub const SYSUSERS_FILE: &str = "/etc/sysusers.d/ai-cmd-executor.conf";
/// The tmpfiles.d entry the installer writes.
pub const TMPFILES_FILE: &str = "/etc/tmpfiles.d/ai-cmd-executor.conf";

/// How the worker is kept running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// systemd when it is PID 1, cron otherwise.
    Auto,
    /// The systemd service and timers.
    Systemd,
    /// The cron fallback.
    Cron,
}

/// What `install` was asked to do.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// systemd, cron, or pick.
    pub mode: Mode,
    /// Write the tree under this directory and take no live action.
    pub root: Option<PathBuf>,
    /// Only say what would be done.
    pub dry_run: bool,
    /// The service user (and group).
    pub user: String,
    /// The spool.
    pub spool: PathBuf,
    /// Do not start anything.
    pub no_start: bool,
}

/// Says what is done (or would be), and counts the changes.
pub struct Report {
    dry_run: bool,
    changes: usize,
}

impl Report {
    pub(crate) fn new(dry_run: bool) -> Self {
        Report {
            dry_run,
            changes: 0,
        }
    }

    /// A change, made or (in a dry run) to be made.
    fn change(&mut self, what: &str) {
        self.changes += 1;
        if self.dry_run {
            println!("would {what}");
        } else {
            println!("{what}");
        }
    }

    /// Something already as it should be.
    fn same(&self, what: &str) {
        println!("unchanged: {what}");
    }

    fn finish(&self, verb: &str) {
        match (self.changes, self.dry_run) {
            (0, _) => println!("{verb}: no changes; everything is already in place"),
            (n, true) => println!("{verb}: dry run, {n} change(s) would be made"),
            (n, false) => println!("{verb}: {n} change(s) made"),
        }
    }
}

/// Picks the mode `auto` stands for, or explains what is missing.
pub fn resolve_mode(mode: Mode) -> anyhow::Result<Mode> {
    match mode {
        Mode::Auto if crate::systemd::booted() => Ok(Mode::Systemd),
        Mode::Auto if cron_available() => Ok(Mode::Cron),
        Mode::Auto => bail!(
            "neither systemd (PID 1) nor cron is available to keep the worker running: \
             boot with systemd, or install cron (apt-get install cron) and run `install --mode cron`"
        ),
        m => Ok(m),
    }
}

fn cron_available() -> bool {
    Path::new("/etc/cron.d").is_dir()
        && ["/usr/sbin/cron", "/usr/sbin/crond", "/sbin/cron"]
            .iter()
            .any(|p| Path::new(p).exists())
}

/// Writes `content` to `path` unless it already holds exactly that.
pub(crate) fn write_file(
    report: &mut Report,
    path: &Path,
    content: &[u8],
    mode: u32,
) -> anyhow::Result<bool> {
    let shown = path.display();
    match fs::read(path) {
        Ok(old) if old == content => {
            let perm_ok = fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
            if perm_ok {
                report.same(&format!("{shown}"));
                return Ok(false);
            }
            report.change(&format!("set mode {mode:04o} on {shown}"));
        }
        Ok(_) => report.change(&format!("update {shown}")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => report.change(&format!("write {shown}")),
        Err(e) => return Err(e).with_context(|| format!("reading {shown}")),
    }
    if !report.dry_run {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("ai-cmd-executor-new");
        fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming into {shown}"))?;
    }
    Ok(true)
}

/// The Debian package's name.
pub const PACKAGE: &str = "ai-cmd-executor";

/// Whether the Debian package is installed here (its units, cron file and
/// spool set-up are dpkg's), from `dpkg-query`. A package removed but not
/// purged (`config-files`), or no dpkg at all, counts as not installed.
pub fn package_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status}", PACKAGE])
        .output()
        .is_ok_and(|o| {
            let state = String::from_utf8_lossy(&o.stdout);
            o.status.success() && !matches!(state.trim(), "" | "not-installed" | "config-files")
        })
}

/// Whether dpkg counts `path` as a file of an installed (or removed but
/// not purged) package, conffiles included.
fn dpkg_owned(path: &Path) -> bool {
    Command::new("dpkg-query")
        .arg("-S")
        .arg(path)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs. Returns the number of changes.
///
/// Where the package is installed, it owns the units, the cron file and
/// the spool's set-up, and `install` would shadow its units with copies in
/// `/etc/systemd/system`: then it does nothing and says so.
pub fn install(opts: &InstallOptions) -> anyhow::Result<usize> {
    if opts.root.is_none() && package_installed() {
        println!(
            "the {PACKAGE} package is installed: its units, cron file and spool are managed by dpkg, \
             so install changes nothing (`dpkg-reconfigure {PACKAGE}` re-runs the package's set-up; \
             `ai-cmd-executor repair` fixes a broken installation)"
        );
        return Ok(0);
    }
    let mode = resolve_mode(opts.mode)?;
    let live = opts.root.is_none() && !opts.dry_run;
    if live && !Uid::effective().is_root() {
        bail!(
            "install needs root (it writes /etc and creates a system user); use --root DIR or --dry-run to try it"
        );
    }
    let root = opts.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let spool = opts
        .spool
        .to_str()
        .context("the spool path must be UTF-8")?
        .to_owned();
    let mut report = Report::new(opts.dry_run);
    println!(
        "installing ai-cmd-executor ({} mode) into {}{}",
        if mode == Mode::Systemd {
            "systemd"
        } else {
            "cron"
        },
        root.display(),
        if opts.dry_run { " (dry run)" } else { "" }
    );

    let binary = install_binary(&mut report, &root)?;
    let local = Local {
        binary,
        user: opts.user.clone(),
        spool,
    };

    write_config(&mut report, &root, &local)?;
    if mode == Mode::Systemd {
        for (name, text) in local.units() {
            write_file(
                &mut report,
                &under(&root, &format!("{UNIT_DIR}/{name}")),
                text.as_bytes(),
                0o644,
            )?;
        }
        write_file(
            &mut report,
            &under(&root, SYSUSERS_FILE),
            local.sysusers().as_bytes(),
            0o644,
        )?;
        write_file(
            &mut report,
            &under(&root, TMPFILES_FILE),
            local.tmpfiles().as_bytes(),
            0o644,
        )?;
    } else {
        write_file(
            &mut report,
            &under(&root, CRON_FILE),
            local.cron().as_bytes(),
            0o644,
        )?;
    }

    if opts.root.is_some() {
        println!("(--root: no user, spool or service actions are taken)");
    } else {
        ensure_user(&mut report, &local)?;
        ensure_spool(&mut report, &opts.spool, &local.user)?;
        if mode == Mode::Systemd {
            systemd_actions(&mut report, opts.no_start)?;
        } else if !opts.no_start {
            cron_start(&mut report, &local)?;
        }
    }
    report.finish("install");
    Ok(report.changes)
}

/// The binary the units name: the packaged one if this is it, else a copy
/// in /usr/local/bin (a build tree is often not reachable by the service
/// user).
fn install_binary(report: &mut Report, root: &Path) -> anyhow::Result<String> {
    let me = std::env::current_exe().context("finding this program's path")?;
    let me = fs::canonicalize(&me).unwrap_or(me);
    if root == Path::new("/")
        && (me == Path::new(crate::systemd::units::SHIPPED_BINARY) || me == Path::new(LOCAL_BINARY))
    {
        report.same(&format!("{} (the installed binary)", me.display()));
        return Ok(me.to_string_lossy().into_owned());
    }
    let bytes = fs::read(&me).with_context(|| format!("reading {}", me.display()))?;
    write_file(report, &under(root, LOCAL_BINARY), &bytes, 0o755)?;
    // `ai-cmd-executor mcp` starts the server found beside the binary.
    let server = me.with_file_name(crate::cli::commands::mcp::SERVER);
    match fs::read(&server) {
        Ok(bytes) => {
            write_file(report, &under(root, LOCAL_MCP_SERVER), &bytes, 0o755)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!(
            "note: {} is not there, so `ai-cmd-executor mcp` will not work (cargo build --release builds it)",
            server.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", server.display())),
    }
    Ok(LOCAL_BINARY.to_owned())
}

fn write_config(report: &mut Report, root: &Path, local: &Local) -> anyhow::Result<()> {
    let path = under(root, CONFIG_FILE);
    if path.exists() {
        // Never overwrite an operator's configuration.
        report.same(&format!("{} (existing configuration kept)", path.display()));
        return Ok(());
    }
    write_file(report, &path, local.config().as_bytes(), 0o644)?;
    Ok(())
}

fn ensure_user(report: &mut Report, local: &Local) -> anyhow::Result<()> {
    if User::from_name(&local.user)?.is_some() {
        report.same(&format!("user {}", local.user));
        return Ok(());
    }
    report.change(&format!("create system user and group {}", local.user));
    if report.dry_run {
        return Ok(());
    }
    run(Command::new("useradd").args([
        "--system",
        "--user-group",
        "--home-dir",
        &local.spool,
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "--comment",
        "ai-cmd-executor worker",
        &local.user,
    ]))
}

/// Creates the spool with the layout's modes, owned by the service user,
/// and sets the owner and mode of its directories that have others.
///
/// Root does this in a directory that the service user (every job) and
/// the spool's group can write, so no path is trusted: the spool root is
/// opened without following a link, each directory of the layout relative
/// to it with no link followed anywhere (see [`crate::spool::safe`]), and
/// owners and modes are set on the opened directories. A link where a
/// directory belongs is refused and named; the other directories are still
/// put right, and the refusal is the error returned.
pub(crate) fn ensure_spool(report: &mut Report, spool: &Path, user: &str) -> anyhow::Result<()> {
    let (uid, gid) = match (User::from_name(user)?, Group::from_name(user)?) {
        (Some(u), Some(g)) => (u.uid, g.gid),
        _ if report.dry_run => (Uid::from_raw(0), Gid::from_raw(0)),
        _ => bail!("user or group {user} does not exist"),
    };
    let shown = spool.display();
    let root = match SafeDir::open(spool) {
        Ok(d) => Some(d),
        Err(e) if e.is_not_found() => {
            report.change(&format!("create {shown} (mode {ROOT_MODE:04o})"));
            if report.dry_run {
                None
            } else {
                let parent = spool
                    .parent()
                    .with_context(|| format!("{shown} has no parent directory"))?;
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
                let name = spool
                    .file_name()
                    .with_context(|| format!("{shown} has no final name"))?;
                let (dir, _) = SafeDir::open(parent)?.ensure_dir(name, ROOT_MODE)?;
                dir.set_owner(uid.as_raw(), gid.as_raw())?;
                Some(dir)
            }
        }
        Err(e) => return Err(e).with_context(|| format!("opening the spool {shown}")),
    };
    let Some(root) = root else {
        for (name, mode) in LAYOUT {
            report.change(&format!(
                "create {} (mode {mode:04o})",
                spool.join(name).display()
            ));
        }
        return Ok(());
    };
    set_owner_mode(report, &root, ROOT_MODE, uid, gid)?;
    let mut refused = Vec::new();
    for (name, mode) in LAYOUT {
        let dir = if report.dry_run {
            match root.dir(name) {
                Ok(d) => d,
                Err(e) if e.is_not_found() => {
                    report.change(&format!(
                        "create {} (mode {mode:04o})",
                        root.join(name).display()
                    ));
                    continue;
                }
                Err(e) => {
                    refused.push(e.to_string());
                    continue;
                }
            }
        } else {
            match root.ensure_dir(name, mode) {
                Ok((d, created)) => {
                    if created {
                        report.change(&format!("create {} (mode {mode:04o})", d.path().display()));
                    }
                    d
                }
                Err(e) => {
                    refused.push(e.to_string());
                    continue;
                }
            }
        };
        set_owner_mode(report, &dir, mode, uid, gid)?;
        if crate::spool::acl::QUEUE_DIRS.contains(&name) {
            queue_acl(report, &dir, uid)?;
        }
    }
    if !refused.is_empty() {
        bail!("{}", refused.join("; "));
    }
    Ok(())
}

/// Gives a queue directory the default ACL that keeps members' queued jobs
/// apart (see [`crate::spool::acl`]).
fn queue_acl(report: &mut Report, dir: &SafeDir, uid: Uid) -> anyhow::Result<()> {
    use crate::spool::acl::{self, AclState};
    let shown = dir.path().display();
    match acl::state(dir, uid.as_raw()).with_context(|| format!("reading the ACL of {shown}"))? {
        AclState::Private => report.same(&format!("{shown} default ACL")),
        AclState::Unsupported => println!(
            "warning: {shown} is on a file system without POSIX ACLs: members can read each other's queued jobs"
        ),
        AclState::Missing => {
            report.change(&format!(
                "set the default ACL of {shown} (queued jobs readable by their submitter and the worker only)"
            ));
            if !report.dry_run {
                acl::set(dir, uid.as_raw())
                    .with_context(|| format!("setting the default ACL of {shown}"))?;
            }
        }
    }
    Ok(())
}

/// Gives an opened spool directory its owner and mode, on its fd.
fn set_owner_mode(
    report: &mut Report,
    dir: &SafeDir,
    mode: u32,
    uid: Uid,
    gid: Gid,
) -> anyhow::Result<()> {
    let m = dir.meta()?;
    if m.uid == uid.as_raw() && m.gid == gid.as_raw() && m.perm() == mode {
        report.same(&format!("{}", dir.path().display()));
        return Ok(());
    }
    report.change(&format!(
        "set owner and mode {mode:04o} of {}",
        dir.path().display()
    ));
    if !report.dry_run {
        dir.set_owner(uid.as_raw(), gid.as_raw())?;
        // After the owner: chown clears the set-group-id bit.
        dir.set_mode(mode)?;
    }
    Ok(())
}

/// Reload, enable and start over D-Bus, waiting for each start job.
fn systemd_actions(report: &mut Report, no_start: bool) -> anyhow::Result<()> {
    let dry = report.dry_run;
    block_on(async {
        if dry {
            // Say what would happen; look at the live state if we can.
            report.change("reload systemd (Reload over D-Bus)");
            report.change(&format!(
                "enable {SERVICE} {HEALTH_TIMER} {CLEANUP_TIMER} (EnableUnitFiles)"
            ));
            if !no_start {
                report.change(&format!("start {SERVICE} {HEALTH_TIMER} {CLEANUP_TIMER} (StartUnit, waiting for each job)"));
            }
            return Ok(());
        }
        let bus = Systemd::connect().await?;
        // Anything written so far (units, binary, config) needs a reload
        // and, for a running service, a restart.
        let files_changed = report.changes > 0;
        if files_changed {
            bus.reload().await?;
            report.change("reload systemd");
        }
        let units = [SERVICE, HEALTH_TIMER, CLEANUP_TIMER];
        let mut to_enable = Vec::new();
        for u in units {
            let st = bus.unit_state(u).await?;
            if st.load_state != "loaded" {
                bail!(
                    "systemd cannot load {u} ({}); see `journalctl -b`",
                    st.load_state
                );
            }
            if st.unit_file_state == "enabled" {
                report.same(&format!("{u} enabled"));
            } else {
                to_enable.push(u);
            }
        }
        if !to_enable.is_empty() {
            bus.enable(&to_enable).await?;
            bus.reload().await?;
            report.change(&format!("enable {}", to_enable.join(" ")));
        }
        if no_start {
            return Ok(());
        }
        for u in units {
            let st = bus.unit_state(u).await?;
            if st.active_state == "active" {
                if u == SERVICE && files_changed {
                    bus.restart(u).await?;
                    report.change(&format!("restart {u} to use the new files"));
                } else {
                    report.same(&format!("{u} active"));
                }
                continue;
            }
            bus.start(u).await?;
            report.change(&format!("start {u}"));
        }
        Ok(())
    })
}

fn cron_start(report: &mut Report, local: &Local) -> anyhow::Result<()> {
    if report.dry_run {
        report.change(&format!(
            "start a worker now with `{} ensure-running` as {}",
            local.binary, local.user
        ));
        return Ok(());
    }
    let user = User::from_name(&local.user)?
        .with_context(|| format!("user {} does not exist", local.user))?;
    let out = Command::new(&local.binary)
        .args(["ensure-running", "--spool", &local.spool])
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .output()
        .context("running ensure-running")?;
    if !out.status.success() {
        bail!(
            "ensure-running failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let said = String::from_utf8_lossy(&out.stdout);
    if said.contains("started") {
        report.change(&format!("start the worker ({})", said.trim()));
    } else {
        report.same("the worker is running");
    }
    Ok(())
}

/// What `uninstall` was asked to do.
#[derive(Debug, Clone)]
pub struct UninstallOptions {
    /// Work on this tree; no live action.
    pub root: Option<PathBuf>,
    /// Only say what would be done.
    pub dry_run: bool,
    /// Also delete the spool and the configuration.
    pub purge: bool,
    /// The spool (for --purge and to stop a cron worker).
    pub spool: PathBuf,
}

/// Stops, disables and removes what `install` added; with `purge`, also the
/// spool and configuration (after saying what will go).
pub fn uninstall(opts: &UninstallOptions) -> anyhow::Result<usize> {
    let live = opts.root.is_none() && !opts.dry_run;
    if live && !Uid::effective().is_root() {
        bail!("uninstall needs root; use --root DIR or --dry-run to try it");
    }
    let root = opts.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let mut report = Report::new(opts.dry_run);
    // With the package installed, its service and spool stay: only what
    // `install` itself wrote (copies of the units that shadow the
    // package's, say) goes.
    let packaged = opts.root.is_none() && package_installed();
    if packaged && opts.purge {
        bail!(
            "the {PACKAGE} package is installed: its configuration and spool are dpkg's; \
             purge them with `apt purge {PACKAGE}`"
        );
    }
    let unit_files: Vec<PathBuf> = crate::systemd::units::UNITS
        .iter()
        .map(|(n, _)| under(&root, &format!("{UNIT_DIR}/{n}")))
        .filter(|p| p.exists())
        .collect();
    if packaged {
        println!(
            "the {PACKAGE} package is installed: its service keeps running (apt remove stops it)"
        );
    }
    if !packaged && !unit_files.is_empty() && opts.root.is_none() && crate::systemd::booted() {
        let dry = opts.dry_run;
        block_on(async {
            if dry {
                report.change(&format!(
                    "stop and disable {SERVICE} {HEALTH_TIMER} {CLEANUP_TIMER}"
                ));
                return Ok(());
            }
            let bus = Systemd::connect().await?;
            for u in [HEALTH_TIMER, CLEANUP_TIMER, SERVICE] {
                if bus.unit_state(u).await?.active_state != "inactive" {
                    bus.stop(u).await?;
                    report.change(&format!("stop {u}"));
                }
            }
            let removed = bus.disable(&[SERVICE, HEALTH_TIMER, CLEANUP_TIMER]).await?;
            if !removed.is_empty() {
                report.change(&format!("disable {SERVICE} {HEALTH_TIMER} {CLEANUP_TIMER}"));
            }
            Ok(())
        })?;
    }
    if under(&root, CRON_FILE).exists() && opts.root.is_none() && !packaged {
        if opts.dry_run {
            report.change("stop the cron-started worker");
        } else if let Some(pid) = ensure::stop_worker(&opts.spool)? {
            report.change(&format!("stop the cron-started worker (pid {pid})"));
        }
    }
    let mut remove = unit_files;
    for f in [
        CRON_FILE,
        SYSUSERS_FILE,
        TMPFILES_FILE,
        LOCAL_BINARY,
        LOCAL_MCP_SERVER,
    ] {
        remove.push(under(&root, f));
    }
    for p in remove {
        // The package's files (the cron file is one of its conffiles) are
        // dpkg's to remove.
        if opts.root.is_none() && fs::symlink_metadata(&p).is_ok() && dpkg_owned(&p) {
            println!(
                "kept {}: it belongs to the {PACKAGE} package (apt remove or purge it)",
                p.display()
            );
            continue;
        }
        remove_path(&mut report, &p)?;
    }
    if opts.root.is_none() && !opts.dry_run && crate::systemd::booted() {
        block_on(async {
            Systemd::connect()
                .await?
                .reload()
                .await
                .map_err(anyhow::Error::from)
        })?;
    }
    if opts.purge {
        let config_dir = under(&root, "/etc/ai-cmd-executor");
        let spool = if opts.root.is_some() {
            under(&root, opts.spool.to_str().unwrap_or("/"))
        } else {
            opts.spool.clone()
        };
        for dir in [&spool, &config_dir] {
            if dir.exists() {
                let n = walk_count(dir);
                println!(
                    "purge: deleting {} ({n} files and directories)",
                    dir.display()
                );
                report.change(&format!("delete {}", dir.display()));
                if !opts.dry_run {
                    fs::remove_dir_all(dir)
                        .with_context(|| format!("deleting {}", dir.display()))?;
                }
            }
        }
        println!("purge: the system user is kept (Debian policy: removing it could orphan files)");
    }
    report.finish("uninstall");
    Ok(report.changes)
}

fn remove_path(report: &mut Report, p: &Path) -> anyhow::Result<()> {
    if fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    report.change(&format!("remove {}", p.display()));
    if !report.dry_run {
        fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

fn walk_count(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    1 + if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk_count(&e.path())
                    } else {
                        0
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    #[test]
    fn the_spool_is_put_right_but_a_planted_link_is_refused() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: setting owners needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("etc");
        fs::create_dir(&victim).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o755)).unwrap();
        let spool = d.path().join("spool");
        fs::create_dir(&spool).unwrap();
        fs::set_permissions(&spool, fs::Permissions::from_mode(0o777)).unwrap();
        symlink(&victim, spool.join("tmp")).unwrap();
        fs::create_dir(spool.join("pending")).unwrap();
        let mut report = Report::new(false);
        let err = ensure_spool(&mut report, &spool, "root").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("tmp is a symbolic link to"), "{text}");
        let v = fs::metadata(&victim).unwrap();
        assert_eq!(v.mode() & 0o7777, 0o755, "the target keeps its mode");
        // Everything else was put right, on the real directories.
        assert_eq!(fs::metadata(&spool).unwrap().mode() & 0o7777, ROOT_MODE);
        for (name, mode) in LAYOUT.iter().filter(|(n, _)| *n != "tmp") {
            let m = fs::symlink_metadata(spool.join(name)).unwrap();
            assert!(m.is_dir(), "{name}");
            assert_eq!(m.mode() & 0o7777, *mode, "{name}");
        }
        assert!(
            fs::symlink_metadata(spool.join("tmp"))
                .unwrap()
                .is_symlink()
        );
        // A link in place of the spool root itself.
        let alias = d.path().join("alias");
        symlink(&victim, &alias).unwrap();
        let err = ensure_spool(&mut Report::new(false), &alias, "root").unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o755);
    }
}
