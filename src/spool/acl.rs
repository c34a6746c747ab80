//! The default ACL of the queue directories (`tmp/`, `pending/`): what
//! keeps one member's queued job unreadable by the others.
//!
//! Members submit by creating files in directories of the spool's group,
//! and the worker (the service user, in that group) must read them. With
//! plain modes, a file the worker can read through the group, every member
//! can read too, and a job's `env` may hold secrets. A default ACL on the
//! two directories gives each new file (and directory) in them:
//!
//! - `user::rwx` (the submitter, masked by the mode it asked for),
//! - `user:<service user>:r-x` (the worker reads it),
//! - `group::---` (the other members: nothing),
//! - `mask::r-x`, `other::---`.
//!
//! The sticky bit on the directories does the rest: only a file's owner
//! (and the directory's owner, the worker) may rename or remove it.
//! A writer must create job files with group read permission (0640 or
//! 0644): the mask takes the group bits of the mode, and without them the
//! worker could not read the job either.

use std::io;

use rustix::fs::XattrFlags;

use super::safe::SafeDir;

/// The extended attribute that holds a directory's default ACL.
pub const DEFAULT_ACL: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED: u32 = u32::MAX;

/// The queue directories that carry the ACL.
pub const QUEUE_DIRS: [&str; 3] = ["tmp", "pending", "cancel"];

/// The default ACL for a queue directory whose jobs `worker_uid` runs, in
/// the kernel's `system.posix_acl_default` encoding.
pub fn queue_acl(worker_uid: u32) -> Vec<u8> {
    let entries = [
        (USER_OBJ, 7, UNDEFINED),
        (USER, 5, worker_uid),
        (GROUP_OBJ, 0, UNDEFINED),
        (MASK, 5, UNDEFINED),
        (OTHER, 0, UNDEFINED),
    ];
    let mut out = VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&u16::to_le_bytes(perm));
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// Whether the encoded ACL `bytes` keeps queued jobs from the other
/// members and lets `worker_uid` read them: no access for the owning group
/// or others, read for the worker.
pub fn is_queue_acl(bytes: &[u8], worker_uid: u32) -> bool {
    if bytes.len() < 4 || u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) != VERSION {
        return false;
    }
    let (mut group, mut other, mut worker, mut mask) = (None, None, None, None);
    for e in bytes[4..].chunks(8) {
        let [t0, t1, p0, p1, i0, i1, i2, i3] = e else {
            return false;
        };
        let (tag, perm) = (
            u16::from_le_bytes([*t0, *t1]),
            u16::from_le_bytes([*p0, *p1]),
        );
        let id = u32::from_le_bytes([*i0, *i1, *i2, *i3]);
        match tag {
            GROUP_OBJ => group = Some(perm),
            OTHER => other = Some(perm),
            MASK => mask = Some(perm),
            USER if id == worker_uid => worker = Some(perm),
            _ => {}
        }
    }
    group == Some(0)
        && other == Some(0)
        && worker.is_some_and(|p| p & 4 != 0)
        && mask.is_some_and(|m| m & 4 != 0)
}

/// What a queue directory's default ACL is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclState {
    /// It keeps queued jobs private to their submitter and the worker.
    Private,
    /// There is none, or another: members can read each other's jobs.
    Missing,
    /// The file system has no POSIX ACLs.
    Unsupported,
}

/// The state of `dir`'s default ACL for a worker running as `worker_uid`.
pub fn state(dir: &SafeDir, worker_uid: u32) -> io::Result<AclState> {
    let mut buf = [0u8; 256];
    match rustix::fs::fgetxattr(dir.fd(), DEFAULT_ACL, &mut buf) {
        Ok(n) if is_queue_acl(&buf[..n], worker_uid) => Ok(AclState::Private),
        Ok(_) | Err(rustix::io::Errno::NODATA) => Ok(AclState::Missing),
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(AclState::Unsupported),
        Err(e) => Err(e.into()),
    }
}

/// Gives `dir` the queue ACL (the caller owns it, or has `CAP_FOWNER`).
/// Returns [`AclState::Unsupported`] where the file system has none.
pub fn set(dir: &SafeDir, worker_uid: u32) -> io::Result<AclState> {
    match rustix::fs::fsetxattr(
        dir.fd(),
        DEFAULT_ACL,
        &queue_acl(worker_uid),
        XattrFlags::empty(),
    ) {
        Ok(()) => Ok(AclState::Private),
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(AclState::Unsupported),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn the_encoding_round_trips_and_is_what_getfacl_reads() {
        let acl = queue_acl(1234);
        assert!(is_queue_acl(&acl, 1234));
        assert!(!is_queue_acl(&acl, 1235), "another worker");
        assert!(!is_queue_acl(&acl[..acl.len() - 1], 1234));
        let d = tempfile::tempdir().unwrap();
        let dir = SafeDir::open(d.path()).unwrap();
        match set(&dir, 1234).unwrap() {
            AclState::Unsupported => {
                eprintln!("skipped: {} has no POSIX ACLs", d.path().display());
                return;
            }
            s => assert_eq!(s, AclState::Private),
        }
        assert_eq!(state(&dir, 1234).unwrap(), AclState::Private);
        assert_eq!(state(&dir, 99).unwrap(), AclState::Missing);
        if let Ok(out) = Command::new("getfacl").args(["-n"]).arg(d.path()).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            for line in [
                "default:user::rwx",
                "default:user:1234:r-x",
                "default:group::---",
            ] {
                assert!(text.contains(line), "{line} in {text}");
            }
        }
    }
}
