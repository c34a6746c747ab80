//! Room kept for results that cannot be written because the disk is full.
//!
//! When a result cannot be written, the worker holds it in memory and
//! retries. Should it have to stop before space returns, the held results
//! would be lost, and the next start would record those jobs `interrupted`
//! though they ran to the end. So the worker keeps `completed/.held-results`:
//! a file of [`RESERVE_BYTES`] whose blocks are allocated (written with
//! spaces) while there is space. Overwriting it in place needs no new
//! block, so a stopping worker can still store its held results there, one
//! JSON record a line, the rest blanks. The next start delivers them into
//! `completed/` before it recovers `running/`, and blanks the file again.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use super::{JobResult, Spool, SpoolError};

/// The reserve's name in `completed/` (hidden: no client lists it).
pub const RESERVE_NAME: &str = ".held-results";

/// Its size: room for a few hundred results.
pub const RESERVE_BYTES: usize = 256 * 1024;

const NOFOLLOW: i32 = nix::fcntl::OFlag::O_NOFOLLOW.bits();

fn path(spool: &Spool) -> PathBuf {
    spool.completed().join(RESERVE_NAME)
}

fn open(spool: &Spool, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(NOFOLLOW)
        .open(path(spool))
}

/// Makes sure the reserve exists at full size, its blocks allocated. A
/// reserve that holds results is left alone (deliver them first).
pub fn ensure(spool: &Spool) -> Result<(), SpoolError> {
    let p = path(spool);
    if let Ok(f) = open(spool, false)
        && f.metadata()
            .is_ok_and(|m| m.is_file() && m.len() >= RESERVE_BYTES as u64)
    {
        return Ok(());
    }
    let blank = vec![b' '; RESERVE_BYTES];
    super::write_atomically(&spool.completed(), RESERVE_NAME, &blank, 0o600)
        .map_err(|e| SpoolError::io("reserving room for results in", &p, io::Error::other(e)))
}

/// Stores `results` in the reserve, overwriting it in place (no new block
/// is needed), and syncs it. Returns how many fit; the others are lost.
pub fn store(spool: &Spool, results: &[JobResult]) -> Result<usize, SpoolError> {
    let p = path(spool);
    let f = open(spool, true).map_err(|e| SpoolError::io("opening", &p, e))?;
    let room = usize::try_from(
        f.metadata()
            .map_err(|e| SpoolError::io("reading", &p, e))?
            .len(),
    )
    .unwrap_or(0)
    .min(RESERVE_BYTES);
    let mut bytes = Vec::with_capacity(room);
    let mut stored = 0;
    for r in results {
        let mut line = serde_json::to_vec(r).expect("a result always serializes");
        line.push(b'\n');
        if bytes.len() + line.len() > room {
            break;
        }
        bytes.extend_from_slice(&line);
        stored += 1;
    }
    bytes.resize(room, b' ');
    f.write_all_at(&bytes, 0)
        .and_then(|()| f.sync_data())
        .map_err(|e| SpoolError::io("writing held results into", &p, e))?;
    Ok(stored)
}

/// The results stored in the reserve (none if there is no reserve).
pub fn take(spool: &Spool) -> Result<Vec<JobResult>, SpoolError> {
    let p = path(spool);
    let mut f = match open(spool, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SpoolError::io("opening", &p, e)),
    };
    let mut text = Vec::new();
    f.by_ref()
        .take(RESERVE_BYTES as u64)
        .read_to_end(&mut text)
        .map_err(|e| SpoolError::io("reading", &p, e))?;
    Ok(text
        .split(|b| *b == b'\n')
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect())
}

/// Blanks the reserve in place once its results are delivered.
pub fn clear(spool: &Spool) -> Result<(), SpoolError> {
    store(spool, &[]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Status, Timestamp};

    fn result(id: &str) -> JobResult {
        let t = Timestamp::now();
        JobResult {
            id: id.into(),
            status: Status::Succeeded,
            exit_code: Some(0),
            signal: None,
            started_at: t,
            finished_at: t,
            duration_ms: 3,
            log: Some(format!("logs/00/{id}@x.log")),
            output_truncated: false,
            error: None,
            attempt: 1,
            submitted_by: None,
            usage: crate::spool::Usage::default(),
            limits: None,
            submitted_via: None,
            cancelled_by: None,
        }
    }

    #[test]
    fn results_are_stored_in_place_and_taken_back() {
        let d = tempfile::tempdir().unwrap();
        let spool = Spool::new(d.path());
        spool.ensure_layout().unwrap();
        ensure(&spool).unwrap();
        assert!(take(&spool).unwrap().is_empty());
        let rs = vec![result("a"), result("b")];
        assert_eq!(store(&spool, &rs).unwrap(), 2);
        assert_eq!(take(&spool).unwrap(), rs);
        // What does not fit is not stored (tests/faults.rs fills a disk).
        let many: Vec<_> = (0..2000).map(|i| result(&format!("id-{i}"))).collect();
        let n = store(&spool, &many).unwrap();
        assert!(n > 100 && n < 2000, "{n}");
        assert_eq!(take(&spool).unwrap(), many[..n]);
        clear(&spool).unwrap();
        assert!(take(&spool).unwrap().is_empty());
        let len = std::fs::metadata(path(&spool)).unwrap().len();
        assert_eq!(len, RESERVE_BYTES as u64);
    }
}
