//! Maintenance (`cleanup`, what the daily timer runs): archive stale
//! pending files with the reason, pack old logs into dated `.tar.gz`
//! archives, delete archives past their retention, remove temporary files
//! a crash left in `completed/`.
//!
//! Jobs and members can write parts of the spool, so every step goes
//! through [`crate::spool::safe`]: directories are opened without following
//! links, files are read only when they are regular files of their own,
//! new files are created with `O_EXCL`. A planted link is refused and
//! reported as one line of the result, and the rest of the work goes on.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;

use crate::config::Config;
use crate::spool::safe::{Entry, SafeDir, SafeError};
use crate::spool::{Spool, Timestamp};

/// `archive/stale/`: pending files nobody ran in time.
pub fn stale_dir(spool: &Spool) -> PathBuf {
    spool.archive().join("stale")
}

/// `archive/logs/`: packed logs.
pub fn log_archive_dir(spool: &Spool) -> PathBuf {
    spool.archive().join("logs")
}

/// How long a temporary file of the result writer may sit in `completed/`
/// before it is taken for a crash's leftover: a live write takes
/// milliseconds.
pub const STALE_TEMP_AFTER: Duration = Duration::from_secs(3600);

fn open(spool: &Spool, sub: &str) -> Result<(SafeDir, SafeDir), SafeError> {
    let root = SafeDir::open(spool.root())?;
    let dir = root.dir(sub)?;
    Ok((root, dir))
}

fn older_than(t: SystemTime, age: Duration) -> bool {
    SystemTime::now().duration_since(t).unwrap_or_default() > age
}

fn stale_entries(pending: &SafeDir, older: Duration) -> Result<Vec<Entry>, SafeError> {
    Ok(pending
        .entries()?
        .into_iter()
        .filter(|e| older_than(e.meta.ctime, older))
        .collect())
}

/// Files in `pending/` that arrived more than `older_than` ago.
pub fn stale_pending(spool: &Spool, older_than: Duration) -> Result<Vec<PathBuf>, SafeError> {
    let (_root, pending) = open(spool, "pending")?;
    Ok(stale_entries(&pending, older_than)?
        .into_iter()
        .map(|e| pending.join(e.name))
        .collect())
}

/// Why root (or anyone) leaves an item alone: a link where a file of its
/// own was expected.
fn planted(e: &Entry) -> Option<String> {
    if e.meta.is_symlink() {
        Some("a symbolic link".into())
    } else if !e.meta.is_dir() && e.meta.nlink > 1 {
        Some(format!("a file with {} hard links", e.meta.nlink))
    } else {
        None
    }
}

/// Moves stale pending files to `archive/stale/`, each with a `.reason`
/// file beside it. Returns what was (or would be) moved, and what was
/// refused.
pub fn archive_stale(
    spool: &Spool,
    older_than: Duration,
    dry_run: bool,
) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let reason = format!(
        "archived by ai-cmd-executor cleanup at {}: waited in pending/ longer than {} (stale_pending_after) without being run",
        Timestamp::now(),
        humantime::format_duration(older_than)
    );
    let (root, pending) = open(spool, "pending").context("opening pending/")?;
    let stale = stale_entries(&pending, older_than).context("listing pending/")?;
    if stale.is_empty() {
        return Ok(done);
    }
    let name_of = |e: &Entry| e.name.to_string_lossy().into_owned();
    if dry_run {
        for e in &stale {
            done.push(format!("would archive pending/{} (stale)", name_of(e)));
        }
        return Ok(done);
    }
    let archive = root.dir("archive").context("opening archive/")?;
    let (to, _) = archive
        .ensure_dir("stale", 0o2750)
        .context("opening archive/stale/")?;
    let stamp = Timestamp::now().file_stamp();
    for e in &stale {
        let name = name_of(e);
        if let Some(what) = planted(e) {
            done.push(format!(
                "refused pending/{name}: it is {what}, left where it is"
            ));
            continue;
        }
        match pending.move_into(&e.name, &to, &stamp) {
            Ok(dest) => {
                let mut reason_name = dest.clone();
                reason_name.push(".reason");
                let mut f = to
                    .create_new(&reason_name, 0o640)
                    .with_context(|| format!("writing the reason for {}", name))?;
                f.write_all(format!("{reason}\n").as_bytes())
                    .with_context(|| format!("writing the reason for {}", name))?;
                done.push(format!(
                    "archived pending/{name} as archive/stale/{}",
                    dest.to_string_lossy()
                ));
            }
            Err(SafeError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("archiving pending/{name}")),
        }
    }
    Ok(done)
}

/// Old logs by the day their run started.
type ByDay = BTreeMap<String, Vec<OldLog>>;
/// The open shard directories of `logs/`, by name.
type Shards = BTreeMap<OsString, SafeDir>;
/// A named step of [`cleanup`].
type Step<'a> = (&'a str, &'a dyn Fn() -> anyhow::Result<Vec<String>>);

/// One old log: its shard and its name there.
struct OldLog {
    shard: OsString,
    name: OsString,
}

/// Logs (`logs/<shard>/<id>@<stamp>.log`) whose run started more than
/// `days` ago, grouped by the UTC day they started, with the open shard
/// directories. Links in place of shards are reported in `refused`.
fn old_logs(
    logs: &SafeDir,
    days: u32,
    refused: &mut Vec<String>,
) -> Result<(ByDay, Shards), SafeError> {
    let cutoff = SystemTime::now() - Duration::from_secs(u64::from(days) * 86_400);
    let mut by_day: BTreeMap<String, Vec<OldLog>> = BTreeMap::new();
    let mut shards = BTreeMap::new();
    for shard in logs.entries()? {
        if shard.meta.is_symlink() {
            refused.push(format!(
                "refused logs/{}: it is a symbolic link, left where it is",
                shard.name.to_string_lossy()
            ));
            continue;
        }
        if !shard.meta.is_dir() {
            continue;
        }
        let dir = match logs.dir(&shard.name) {
            Ok(d) => d,
            Err(e) if e.is_planted() => {
                refused.push(e.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        for log in dir.entries()? {
            let name = log.name.to_string_lossy();
            let Some((_, started)) = crate::spool::log_name_parts(&name) else {
                continue;
            };
            if started.0 < cutoff {
                by_day
                    .entry(started.file_stamp()[..8].to_owned())
                    .or_default()
                    .push(OldLog {
                        shard: shard.name.clone(),
                        name: log.name.clone(),
                    });
            }
        }
        shards.insert(shard.name, dir);
    }
    Ok((by_day, shards))
}

/// Packs logs older than `days` into `archive/logs/logs-<YYYYMMDD>.tar.gz`
/// (one archive per day the runs started; members keep their
/// `logs/<shard>/<id>@<stamp>.log` path), then deletes the packed files.
/// A log that is a link is left out and reported.
pub fn pack_old_logs(spool: &Spool, days: u32, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let (root, logs) = open(spool, "logs").context("opening logs/")?;
    let (by_day, shards) = old_logs(&logs, days, &mut done).context("listing logs/")?;
    if by_day.is_empty() {
        return Ok(done);
    }
    let archive = root.dir("archive").context("opening archive/")?;
    let out_dir = if dry_run {
        None
    } else {
        Some(
            archive
                .ensure_dir("logs", 0o2750)
                .context("opening archive/logs/")?
                .0,
        )
    };
    for (day, files) in by_day {
        let taken = |name: &str| match &out_dir {
            Some(d) => d.lstat(name).map(|m| m.is_some()).unwrap_or(true),
            None => archive
                .dir("logs")
                .ok()
                .and_then(|d| d.lstat(name).ok().flatten())
                .is_some(),
        };
        let mut target = format!("logs-{day}.tar.gz");
        let mut n = 1;
        while taken(&target) {
            target = format!("logs-{day}.{n}.tar.gz");
            n += 1;
        }
        let Some(out_dir) = &out_dir else {
            done.push(format!(
                "would pack {} log(s) from {day} into archive/logs/{target}",
                files.len()
            ));
            continue;
        };
        let tmp = format!(".{target}.{}.tmp", std::process::id());
        let _ = out_dir.remove_file(&tmp);
        let out = out_dir
            .create_new(&tmp, 0o640)
            .with_context(|| format!("creating archive/logs/{tmp}"))?;
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mut packed = Vec::new();
        for f in &files {
            let shard = &shards[&f.shard];
            let rel = Path::new("logs").join(&f.shard).join(&f.name);
            let mut file = match shard.open_file(&f.name) {
                Ok(file) => file,
                Err(e) if e.is_planted() => {
                    done.push(format!("refused {}: {e}", rel.display()));
                    continue;
                }
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", rel.display()));
                }
            };
            let meta = file
                .metadata()
                .with_context(|| format!("reading {}", rel.display()))?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata(&meta);
            tar.append_data(&mut header, &rel, &mut file)
                .with_context(|| format!("adding {}", rel.display()))?;
            packed.push(f);
        }
        let gz = tar.into_inner().context("finishing the tar stream")?;
        let out = gz.finish().context("finishing the gzip stream")?;
        out.sync_all().context("syncing the archive")?;
        drop(out);
        if packed.is_empty() {
            let _ = out_dir.remove_file(&tmp);
            continue;
        }
        if !out_dir
            .rename_noreplace(&tmp, out_dir, &target)
            .with_context(|| format!("renaming into archive/logs/{target}"))?
        {
            let _ = out_dir.remove_file(&tmp);
            anyhow::bail!("archive/logs/{target} appeared while it was being written");
        }
        for f in &packed {
            let shard = &shards[&f.shard];
            let _ = shard.remove_file(&f.name);
        }
        for name in packed.iter().map(|f| &f.shard) {
            // Empty shard directories go too (the worker makes them again
            // when needed); a busy one stays.
            let _ = logs.remove_dir(name);
        }
        done.push(format!(
            "packed {} log(s) from {day} into archive/logs/{target}",
            packed.len()
        ));
    }
    Ok(done)
}

/// Deletes archives (anything under `archive/`) last changed more than
/// `days` ago. Links are left and reported.
pub fn prune_archives(spool: &Spool, days: u32, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let age = Duration::from_secs(u64::from(days) * 86_400);
    let mut done = Vec::new();
    let (_root, archive) = open(spool, "archive").context("opening archive/")?;
    let mut stack = vec![(archive, PathBuf::from("archive"))];
    while let Some((dir, at)) = stack.pop() {
        let entries = dir
            .entries()
            .with_context(|| format!("listing {}", at.display()))?;
        for e in entries {
            let shown = at.join(&e.name);
            if e.meta.is_dir() {
                match dir.dir(&e.name) {
                    Ok(sub) => stack.push((sub, shown)),
                    Err(err) if err.is_planted() => done.push(format!("refused {err}")),
                    Err(_) => {}
                }
                continue;
            }
            if e.meta.is_symlink() {
                // Nothing here is ever a link: whoever made it is told,
                // old or new.
                done.push(format!(
                    "refused {}: it is a symbolic link, left where it is",
                    shown.display()
                ));
                continue;
            }
            if !older_than(e.meta.mtime, age) {
                continue;
            }
            if let Some(what) = planted(&e) {
                done.push(format!(
                    "refused {}: it is {what}, left where it is",
                    shown.display()
                ));
                continue;
            }
            if dry_run {
                done.push(format!(
                    "would delete {} (older than {days} days)",
                    shown.display()
                ));
            } else {
                dir.remove_file(&e.name)
                    .with_context(|| format!("deleting {}", shown.display()))?;
                done.push(format!(
                    "deleted {} (older than {days} days)",
                    shown.display()
                ));
            }
        }
    }
    done.sort();
    Ok(done)
}

/// Removes the result writer's temporary files (`completed/.<id>.json.<pid>.<n>.tmp`)
/// older than [`STALE_TEMP_AFTER`]: a crash between the write and the
/// rename leaves them.
pub fn remove_stale_temps(spool: &Spool, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let (_root, completed) = open(spool, "completed").context("opening completed/")?;
    for e in completed.entries().context("listing completed/")? {
        let name = e.name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(".tmp"))
            || e.meta.is_dir()
            || !older_than(e.meta.mtime, STALE_TEMP_AFTER)
        {
            continue;
        }
        if dry_run {
            done.push(format!(
                "would delete completed/{name} (a crash's leftover)"
            ));
        } else {
            // Only the name goes, link or not: nothing is followed.
            completed
                .remove_file(&e.name)
                .with_context(|| format!("deleting completed/{name}"))?;
            done.push(format!("deleted completed/{name} (a crash's leftover)"));
        }
    }
    Ok(done)
}

/// What [`cleanup`] did, and the steps that could not be done.
#[derive(Debug, Default)]
pub struct Done {
    /// One line per action (or refusal of a planted link).
    pub actions: Vec<String>,
    /// One line per step that failed; the other steps still ran.
    pub failed: Vec<String>,
}

/// The whole cleanup. Each step runs even when another failed (a link in
/// place of `archive/` stops the archiving, not the removal of temporary
/// files).
pub fn cleanup(spool: &Spool, config: &Config, dry_run: bool) -> Done {
    let mut done = Done::default();
    let steps: [Step; 4] = [
        ("archiving stale pending files", &|| {
            archive_stale(spool, config.stale_pending_after.get(), dry_run)
        }),
        ("packing old logs", &|| {
            pack_old_logs(spool, config.log_retention_days.get(), dry_run)
        }),
        ("deleting old archives", &|| {
            prune_archives(spool, config.archive_retention_days.get(), dry_run)
        }),
        ("removing stale temporary results", &|| {
            remove_stale_temps(spool, dry_run)
        }),
    ];
    for (what, step) in steps {
        match step() {
            Ok(lines) => done.actions.extend(lines),
            Err(e) => done
                .failed
                .push(format!("{what}: {}", crate::error::chain(e.as_ref()))),
        }
    }
    done
}

/// Lists the members of a `.tar.gz` archive (for checks and tests).
pub fn list_archive(path: &Path) -> anyhow::Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut names = Vec::new();
    for entry in tar.entries()? {
        names.push(entry?.path()?.to_string_lossy().into_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn spool() -> (tempfile::TempDir, Spool) {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::new(d.path().join("s"));
        s.ensure_layout().unwrap();
        (d, s)
    }

    #[test]
    fn old_logs_are_packed_by_day_and_list_back() {
        let (_d, s) = spool();
        let old = Timestamp(SystemTime::now() - Duration::from_secs(40 * 86_400));
        let new = Timestamp::now();
        let log = |id: &str, t| s.log_path(&crate::spool::JobId::new(id).unwrap(), t);
        for (id, t) in [("a", old), ("b", old), ("c", new)] {
            fs::create_dir_all(log(id, t).parent().unwrap()).unwrap();
            fs::write(log(id, t), format!("output of {id}\n")).unwrap();
        }
        let dry = pack_old_logs(&s, 30, true).unwrap();
        assert_eq!(dry.len(), 1, "{dry:?}");
        assert!(log("a", old).exists(), "a dry run changes nothing");
        let done = pack_old_logs(&s, 30, false).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        let archives: Vec<_> = fs::read_dir(log_archive_dir(&s))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(archives.len(), 1);
        let mut names = list_archive(&archives[0]).unwrap();
        names.sort();
        let day = &old.file_stamp()[..8];
        assert!(
            archives[0]
                .to_string_lossy()
                .contains(&format!("logs-{day}.tar.gz"))
        );
        let mut want = [s.relative(&log("a", old)), s.relative(&log("b", old))];
        want.sort();
        assert_eq!(names, want);
        assert!(!log("a", old).exists() && log("c", new).exists());
    }

    #[test]
    fn fresh_pending_files_are_not_stale() {
        let (_d, s) = spool();
        fs::write(s.pending().join("x.json"), "{}").unwrap();
        assert!(
            stale_pending(&s, Duration::from_secs(60))
                .unwrap()
                .is_empty()
        );
        assert_eq!(stale_pending(&s, Duration::ZERO).unwrap().len(), 1);
        let done = archive_stale(&s, Duration::ZERO, false).unwrap();
        assert_eq!(done.len(), 1);
        let kept: Vec<_> = fs::read_dir(stale_dir(&s))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(kept.len(), 2, "the file and its reason");
    }

    fn age(path: &Path, days: u64) {
        let t = SystemTime::now() - Duration::from_secs(days * 86_400);
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_times(fs::FileTimes::new().set_modified(t)).unwrap();
    }

    #[test]
    fn linked_directories_are_refused_and_their_targets_untouched() {
        let (d, s) = spool();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let victim = outside.join("victim");
        fs::write(&victim, "precious").unwrap();
        age(&victim, 400);
        let before = fs::metadata(&victim).unwrap();
        // archive/ and pending/ replaced by links to the outside.
        fs::rename(s.archive(), d.path().join("archive.old")).unwrap();
        symlink(&outside, s.archive()).unwrap();
        let err = prune_archives(&s, 1, false).unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        fs::rename(s.pending(), d.path().join("pending.old")).unwrap();
        symlink(&outside, s.pending()).unwrap();
        let err = archive_stale(&s, Duration::ZERO, false).unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        let after = fs::metadata(&victim).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(
            (before.ino(), before.mode(), before.uid()),
            (after.ino(), after.mode(), after.uid())
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn linked_files_are_reported_and_left() {
        let (d, s) = spool();
        let secret = d.path().join("secret");
        fs::write(&secret, "not for the archive").unwrap();
        // A stale pending link, a planted .reason name, an old linked log,
        // and a hard-linked archive file.
        symlink(&secret, s.pending().join("x.json")).unwrap();
        let old = Timestamp(SystemTime::now() - Duration::from_secs(40 * 86_400));
        let log = s.log_path(&crate::spool::JobId::new("a").unwrap(), old);
        fs::create_dir_all(log.parent().unwrap()).unwrap();
        symlink(&secret, &log).unwrap();
        fs::create_dir_all(s.archive().join("rejected")).unwrap();
        let mine = s.archive().join("rejected").join("old");
        fs::write(&mine, "x").unwrap();
        age(&mine, 400);
        fs::hard_link(&mine, d.path().join("second-name")).unwrap();
        let done = cleanup(&s, &Config::default(), false);
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        let text = done.actions.join("\n");
        assert!(text.contains("refused logs/"), "{text}");
        assert!(text.contains("refused archive/rejected/old"), "{text}");
        assert!(fs::symlink_metadata(&log).unwrap().is_symlink(), "left");
        assert!(mine.exists(), "a hard-linked file is left");
        assert_eq!(fs::read_to_string(&secret).unwrap(), "not for the archive");
        assert!(
            !fs::read_dir(s.archive())
                .unwrap()
                .flatten()
                .any(|e| e.file_name() == "logs" && fs::read_dir(e.path()).unwrap().count() > 0),
            "no archive of the link's target"
        );
    }

    #[test]
    fn stale_result_temps_go() {
        let (_d, s) = spool();
        let old = s.completed().join(".x.json.1.0.tmp");
        let fresh = s.completed().join(".y.json.1.1.tmp");
        fs::write(&old, "").unwrap();
        fs::write(&fresh, "").unwrap();
        age(&old, 1);
        let done = remove_stale_temps(&s, false).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(!old.exists() && fresh.exists());
    }
}
