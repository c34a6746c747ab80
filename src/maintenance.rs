//! Maintenance (`cleanup`, what the daily timer runs): archive stale
//! pending files with the reason, pack old logs into dated `.tar.gz`
//! archives, delete archives past their retention.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;

use crate::client::change_time;
use crate::config::Config;
use crate::spool::{Spool, Timestamp, move_into};

/// `archive/stale/`: pending files nobody ran in time.
pub fn stale_dir(spool: &Spool) -> PathBuf {
    spool.archive().join("stale")
}

/// `archive/logs/`: packed logs.
pub fn log_archive_dir(spool: &Spool) -> PathBuf {
    spool.archive().join("logs")
}

/// Files in `pending/` that arrived more than `older_than` ago.
pub fn stale_pending(spool: &Spool, older_than: Duration) -> io::Result<Vec<PathBuf>> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    for e in fs::read_dir(spool.pending())?.flatten() {
        let Ok(m) = e.metadata() else { continue };
        let arrived = change_time(&m).0;
        if now.duration_since(arrived).unwrap_or_default() > older_than {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Moves stale pending files to `archive/stale/`, each with a `.reason`
/// file beside it. Returns what was (or would be) moved.
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
    for path in stale_pending(spool, older_than).context("listing pending/")? {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if dry_run {
            done.push(format!("would archive pending/{name} (stale)"));
            continue;
        }
        match move_into(&path, &stale_dir(spool)) {
            Ok(dest) => {
                let mut reason_path = dest.clone().into_os_string();
                reason_path.push(".reason");
                fs::write(&reason_path, format!("{reason}\n")).with_context(|| {
                    format!("writing {}", PathBuf::from(&reason_path).display())
                })?;
                done.push(format!(
                    "archived pending/{name} as {}",
                    spool.relative(&dest)
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("archiving {}", path.display())),
        }
    }
    Ok(done)
}

/// Logs (`logs/<shard>/<id>@<stamp>.log`) whose run started more than
/// `days` ago, grouped by the UTC day they started.
fn old_logs(spool: &Spool, days: u32) -> io::Result<BTreeMap<String, Vec<PathBuf>>> {
    let cutoff = SystemTime::now() - Duration::from_secs(u64::from(days) * 86_400);
    let mut by_day: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let logs = spool.logs();
    for shard in fs::read_dir(&logs)?.flatten() {
        if !shard.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for log in fs::read_dir(shard.path())?.flatten() {
            let name = log.file_name().to_string_lossy().into_owned();
            let Some((_, started)) = crate::spool::log_name_parts(&name) else {
                continue;
            };
            if started.0 < cutoff {
                by_day
                    .entry(started.file_stamp()[..8].to_owned())
                    .or_default()
                    .push(log.path());
            }
        }
    }
    Ok(by_day)
}

/// Packs logs older than `days` into `archive/logs/logs-<YYYYMMDD>.tar.gz`
/// (one archive per day the runs started; members keep their
/// `logs/<shard>/<id>@<stamp>.log` path), then deletes the packed files.
pub fn pack_old_logs(spool: &Spool, days: u32, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    for (day, files) in old_logs(spool, days).context("listing logs/")? {
        let dir = log_archive_dir(spool);
        let mut target = dir.join(format!("logs-{day}.tar.gz"));
        let mut n = 1;
        while target.exists() {
            target = dir.join(format!("logs-{day}.{n}.tar.gz"));
            n += 1;
        }
        if dry_run {
            done.push(format!(
                "would pack {} log(s) from {day} into {}",
                files.len(),
                spool.relative(&target)
            ));
            continue;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = target.with_extension("gz.tmp");
        {
            let out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            let mut tar = tar::Builder::new(gz);
            for f in &files {
                let rel = f.strip_prefix(spool.root()).unwrap_or(f);
                tar.append_path_with_name(f, rel)
                    .with_context(|| format!("adding {}", f.display()))?;
            }
            let gz = tar.into_inner().context("finishing the tar stream")?;
            let out = gz.finish().context("finishing the gzip stream")?;
            out.sync_all().context("syncing the archive")?;
        }
        fs::rename(&tmp, &target).with_context(|| format!("renaming into {}", target.display()))?;
        for f in &files {
            let _ = fs::remove_file(f);
            if let Some(parent) = f.parent() {
                // Empty shard directories go too (the worker makes them
                // again when needed); a busy one stays.
                let _ = fs::remove_dir(parent);
            }
        }
        done.push(format!(
            "packed {} log(s) from {day} into {}",
            files.len(),
            spool.relative(&target)
        ));
    }
    Ok(done)
}

/// Deletes archives (anything under `archive/`) last changed more than
/// `days` ago.
pub fn prune_archives(spool: &Spool, days: u32, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let cutoff = SystemTime::now() - Duration::from_secs(u64::from(days) * 86_400);
    let mut done = Vec::new();
    let mut stack = vec![spool.archive()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
                continue;
            }
            if m.modified().is_ok_and(|t| t < cutoff) {
                let rel = spool.relative(&e.path());
                if dry_run {
                    done.push(format!("would delete {rel} (older than {days} days)"));
                } else {
                    fs::remove_file(e.path()).with_context(|| format!("deleting {rel}"))?;
                    done.push(format!("deleted {rel} (older than {days} days)"));
                }
            }
        }
    }
    done.sort();
    Ok(done)
}

/// The whole cleanup; returns one line per action.
pub fn cleanup(spool: &Spool, config: &Config, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let mut done = archive_stale(spool, config.stale_pending_after.get(), dry_run)?;
    done.extend(pack_old_logs(
        spool,
        config.log_retention_days.get(),
        dry_run,
    )?);
    done.extend(prune_archives(
        spool,
        config.archive_retention_days.get(),
        dry_run,
    )?);
    Ok(done)
}

/// Lists the members of a `.tar.gz` archive (for checks and tests).
pub fn list_archive(path: &Path) -> anyhow::Result<Vec<String>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
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
}
