//! Directory-relative, no-follow file operations, for code that works in a
//! spool that other users can write.
//!
//! Every job runs as the service user, who owns the spool, and members of
//! the spool's group write `tmp/` and `pending/`. Any of them can put a
//! symbolic link (or a hard link to a file of theirs) where a directory or
//! file of the layout is expected. A path-based `chown`, `open` or `rename`
//! by a more privileged process would then act on the link's target. The
//! operations here never do:
//!
//! - the spool root is opened with `O_NOFOLLOW | O_DIRECTORY`, and every
//!   directory below it one name at a time, relative to its parent's fd,
//!   with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`;
//! - owners and modes are changed on the opened fd (`fchown`, `fchmod`);
//! - files are read through `O_NOFOLLOW` opens whose `fstat` must show a
//!   regular file with one link, and created with `O_CREAT | O_EXCL`
//!   (which never follows a link);
//! - renames and unlinks act on names in an opened directory, so they move
//!   or remove the link itself, never what it points to.
//!
//! A symbolic link or a hard-linked file where one is not expected is
//! [`SafeError::Planted`]: the caller refuses that one item and says so.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, CWD, Mode, OFlags, RenameFlags, ResolveFlags};

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

/// Why an item in the spool was not used.
#[derive(Debug, thiserror::Error)]
pub enum SafeError {
    /// A symbolic link, or a file with more than one hard link, stands where
    /// the layout expects a directory or a file of its own.
    #[error(
        "{} is {what}; refusing to use it (a job or a member of the spool's group may have planted it: inspect it and move it away)",
        path.display()
    )]
    Planted {
        /// The item.
        path: PathBuf,
        /// What it is: "a symbolic link to /etc", "a file with 2 hard links".
        what: String,
    },
    /// Something other than the expected kind (a file for a directory, a
    /// FIFO for a file).
    #[error("{} is {found}, not {expected}", path.display())]
    WrongKind {
        /// The item.
        path: PathBuf,
        /// What it should be.
        expected: &'static str,
        /// What it is.
        found: &'static str,
    },
    /// A system call failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl SafeError {
    /// Whether this is a planted link (as opposed to a missing item or an
    /// I/O failure).
    pub fn is_planted(&self) -> bool {
        matches!(self, SafeError::Planted { .. })
    }

    /// Whether the item does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SafeError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    fn io(what: &'static str, path: impl Into<PathBuf>, e: impl Into<io::Error>) -> Self {
        SafeError::Io {
            what,
            path: path.into(),
            source: e.into(),
        }
    }
}

/// What `lstat` says of a name, in the terms the spool cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// `st_mode`.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Number of hard links.
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification.
    pub mtime: SystemTime,
    /// Last status change (a rename sets it: when a job arrived in
    /// `pending/`).
    pub ctime: SystemTime,
}

impl Meta {
    fn from_stat(st: &rustix::fs::Stat) -> Meta {
        fn time(s: i64, ns: impl TryInto<u32>) -> SystemTime {
            let ns = ns.try_into().unwrap_or(0);
            if s >= 0 {
                SystemTime::UNIX_EPOCH + Duration::new(s as u64, ns)
            } else {
                SystemTime::UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
            }
        }
        Meta {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: st.st_nlink,
            size: st.st_size as u64,
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
        }
    }
    /// A directory.
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    /// A regular file.
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    /// A symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    /// Permission bits with set-id and sticky bits.
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
    /// A word for the kind of object.
    pub fn kind(&self) -> &'static str {
        match self.mode & S_IFMT {
            S_IFDIR => "a directory",
            S_IFREG => "a regular file",
            S_IFLNK => "a symbolic link",
            0o010_000 => "a FIFO",
            0o140_000 => "a socket",
            0o020_000 => "a character device",
            0o060_000 => "a block device",
            _ => "an unknown kind of file",
        }
    }
}

/// One name in a directory with its `lstat`.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The name.
    pub name: OsString,
    /// What it is (not following a link).
    pub meta: Meta,
}

/// An open directory of the spool. Everything done through it is relative
/// to its fd and follows no link.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

/// A single path component: no `/`, not empty, not `.` or `..`.
fn check_name(name: &OsStr) -> io::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b.contains(&b'/') || b == b"." || b == b".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single file name"),
        ));
    }
    Ok(())
}

impl SafeDir {
    /// Opens the directory at `path` without following a link at its last
    /// component (the spool root: its parents belong to root).
    pub fn open(path: &Path) -> Result<SafeDir, SafeError> {
        match rustix::fs::openat(CWD, path, dir_flags(), Mode::empty()) {
            Ok(fd) => Ok(SafeDir {
                fd,
                path: path.to_owned(),
            }),
            Err(e) => Err(classify(
                rustix::fs::lstat(path).ok().map(|s| Meta::from_stat(&s)),
                path,
                || read_link_at(CWD, path.as_os_str()),
                "a directory",
                e,
            )),
        }
    }

    /// The path this directory was opened as (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`, for messages.
    pub fn join(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.path.join(name.as_ref())
    }

    /// Opens the sub-directory `name`, refusing a link.
    pub fn dir(&self, name: impl AsRef<OsStr>) -> Result<SafeDir, SafeError> {
        let name = name.as_ref();
        let path = self.join(name);
        check_name(name).map_err(|e| SafeError::io("opening", &path, e))?;
        let opened =
            match rustix::fs::openat2(&self.fd, name, dir_flags(), Mode::empty(), resolve()) {
                // Kernels before 5.6: one component with O_NOFOLLOW is the same.
                Err(rustix::io::Errno::NOSYS) => {
                    rustix::fs::openat(&self.fd, name, dir_flags(), Mode::empty())
                }
                r => r,
            };
        match opened {
            Ok(fd) => Ok(SafeDir { fd, path }),
            Err(e) => Err(classify(
                self.lstat(name).ok().flatten(),
                &path,
                || read_link_at(self.fd.as_fd(), name),
                "a directory",
                e,
            )),
        }
    }

    /// Creates the sub-directory `name` with `mode` if it is missing, then
    /// opens it (refusing a link). Returns it and whether it was created;
    /// a created directory gets exactly `mode`, whatever the umask.
    pub fn ensure_dir(
        &self,
        name: impl AsRef<OsStr>,
        mode: u32,
    ) -> Result<(SafeDir, bool), SafeError> {
        let name = name.as_ref();
        let created = match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(SafeError::io("creating directory", self.join(name), e)),
        };
        let dir = self.dir(name)?;
        if created {
            dir.set_mode(mode)?;
        }
        Ok((dir, created))
    }

    /// `fstat` of this directory.
    pub fn meta(&self) -> Result<Meta, SafeError> {
        rustix::fs::fstat(&self.fd)
            .map(|s| Meta::from_stat(&s))
            .map_err(|e| SafeError::io("reading the status of", &self.path, e))
    }

    /// `fchown` of this directory.
    pub fn set_owner(&self, uid: u32, gid: u32) -> Result<(), SafeError> {
        let (u, g) = (
            rustix::fs::Uid::from_raw(uid),
            rustix::fs::Gid::from_raw(gid),
        );
        rustix::fs::fchown(&self.fd, Some(u), Some(g))
            .map_err(|e| SafeError::io("changing the owner of", &self.path, e))
    }

    /// `fchmod` of this directory.
    pub fn set_mode(&self, mode: u32) -> Result<(), SafeError> {
        rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(mode))
            .map_err(|e| SafeError::io("setting the mode of", &self.path, e))
    }

    /// `lstat` of `name`; `None` if it does not exist.
    pub fn lstat(&self, name: impl AsRef<OsStr>) -> Result<Option<Meta>, SafeError> {
        let name = name.as_ref();
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => Ok(Some(Meta::from_stat(&s))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(SafeError::io("reading the status of", self.join(name), e)),
        }
    }

    /// Every name in the directory (but `.` and `..`) with its `lstat`,
    /// sorted by name. A name that vanishes while listed is left out.
    pub fn entries(&self) -> Result<Vec<Entry>, SafeError> {
        let listing = rustix::fs::Dir::read_from(&self.fd)
            .map_err(|e| SafeError::io("listing", &self.path, e))?;
        let mut out = Vec::new();
        for e in listing {
            let e = e.map_err(|e| SafeError::io("listing", &self.path, e))?;
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            if let Some(meta) = self.lstat(name)? {
                out.push(Entry {
                    name: name.to_owned(),
                    meta,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Opens the regular file `name` for reading. A link (symbolic, or a
    /// second hard link) is refused, as is anything but a regular file; a
    /// FIFO does not block the open.
    pub fn open_file(&self, name: impl AsRef<OsStr>) -> Result<File, SafeError> {
        let name = name.as_ref();
        let path = self.join(name);
        check_name(name).map_err(|e| SafeError::io("opening", &path, e))?;
        let flags =
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::empty()).map_err(|e| {
            classify(
                self.lstat(name).ok().flatten(),
                &path,
                || read_link_at(self.fd.as_fd(), name),
                "a regular file",
                e,
            )
        })?;
        let meta = rustix::fs::fstat(&fd)
            .map(|s| Meta::from_stat(&s))
            .map_err(|e| SafeError::io("reading the status of", &path, e))?;
        if !meta.is_file() {
            return Err(SafeError::WrongKind {
                path,
                expected: "a regular file",
                found: meta.kind(),
            });
        }
        if meta.nlink > 1 {
            return Err(SafeError::Planted {
                path,
                what: format!("a file with {} hard links", meta.nlink),
            });
        }
        Ok(File::from(fd))
    }

    /// Creates the new file `name` with `mode` for writing. Fails if any
    /// object, a link included, already has the name.
    pub fn create_new(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<File, SafeError> {
        let name = name.as_ref();
        let path = self.join(name);
        check_name(name).map_err(|e| SafeError::io("creating", &path, e))?;
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::NOCTTY
            | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode))
            .map_err(|e| SafeError::io("creating", &path, e))?;
        let f = File::from(fd);
        // Exactly `mode`, whatever the umask.
        rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))
            .map_err(|e| SafeError::io("setting the mode of", &path, e))?;
        Ok(f)
    }

    /// Renames `name` to `to/to_name` unless that exists. Returns false if
    /// it does. Moves the name itself: a link is moved, not followed.
    pub fn rename_noreplace(
        &self,
        name: impl AsRef<OsStr>,
        to: &SafeDir,
        to_name: impl AsRef<OsStr>,
    ) -> Result<bool, SafeError> {
        let (name, to_name) = (name.as_ref(), to_name.as_ref());
        let err = |e: rustix::io::Errno| SafeError::io("renaming", self.join(name), e);
        match rustix::fs::renameat_with(&self.fd, name, &to.fd, to_name, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => Ok(false),
            // File systems without the flag: link + unlink never replaces.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                match rustix::fs::linkat(&self.fd, name, &to.fd, to_name, AtFlags::empty()) {
                    Ok(()) => rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
                        .map(|()| true)
                        .map_err(err),
                    Err(rustix::io::Errno::EXIST) => Ok(false),
                    Err(e) => Err(err(e)),
                }
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Moves `name` into `to` under its own name plus `.<stamp>` (and
    /// `.<n>` if that is taken), replacing nothing. Returns the new name.
    pub fn move_into(
        &self,
        name: impl AsRef<OsStr>,
        to: &SafeDir,
        stamp: &str,
    ) -> Result<OsString, SafeError> {
        let name = name.as_ref();
        for n in 0u32.. {
            let mut target = name.to_os_string();
            target.push(format!(".{stamp}"));
            if n > 0 {
                target.push(format!(".{n}"));
            }
            if self.rename_noreplace(name, to, &target)? {
                return Ok(target);
            }
        }
        unreachable!("u32 range exhausted")
    }

    /// Unlinks the name `name` (never what a link points to).
    pub fn remove_file(&self, name: impl AsRef<OsStr>) -> Result<(), SafeError> {
        let name = name.as_ref();
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
            .map_err(|e| SafeError::io("removing", self.join(name), e))
    }

    /// Removes the empty directory `name`.
    pub fn remove_dir(&self, name: impl AsRef<OsStr>) -> Result<(), SafeError> {
        let name = name.as_ref();
        rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)
            .map_err(|e| SafeError::io("removing", self.join(name), e))
    }

    /// The directory's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Where a link found at `name` points, for the message.
fn read_link_at(dir: BorrowedFd<'_>, name: &OsStr) -> Option<String> {
    rustix::fs::readlinkat(dir, name, Vec::new())
        .ok()
        .map(|t| String::from_utf8_lossy(t.as_bytes()).into_owned())
}

/// Turns a failed no-follow open into the error that says why.
fn classify(
    meta: Option<Meta>,
    path: &Path,
    link: impl FnOnce() -> Option<String>,
    expected: &'static str,
    e: rustix::io::Errno,
) -> SafeError {
    match meta {
        Some(m) if m.is_symlink() => SafeError::Planted {
            path: path.to_owned(),
            what: match link() {
                Some(t) => format!("a symbolic link to {t}"),
                None => "a symbolic link".into(),
            },
        },
        Some(m) if expected == "a directory" && !m.is_dir() => SafeError::WrongKind {
            path: path.to_owned(),
            expected,
            found: m.kind(),
        },
        _ => SafeError::io("opening", path, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::{Read, Write};
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn a_linked_directory_is_refused_and_named() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let root = d.path().join("spool");
        fs::create_dir(&root).unwrap();
        symlink(&outside, root.join("tmp")).unwrap();
        let spool = SafeDir::open(&root).unwrap();
        let err = spool.dir("tmp").unwrap_err();
        assert!(err.is_planted(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("symbolic link to") && text.contains("outside"),
            "{text}"
        );
        // ensure_dir refuses it too, and changes nothing at the target.
        let before = fs::metadata(&outside).unwrap().permissions().mode();
        assert!(spool.ensure_dir("tmp", 0o2770).unwrap_err().is_planted());
        assert_eq!(fs::metadata(&outside).unwrap().permissions().mode(), before);
        // The spool root itself as a link.
        symlink(&root, d.path().join("alias")).unwrap();
        assert!(
            SafeDir::open(&d.path().join("alias"))
                .unwrap_err()
                .is_planted()
        );
    }

    #[test]
    fn files_are_read_only_when_they_are_their_own() {
        let d = tempfile::tempdir().unwrap();
        let dir = SafeDir::open(d.path()).unwrap();
        fs::write(d.path().join("plain"), "mine").unwrap();
        fs::write(d.path().join("secret"), "not yours").unwrap();
        symlink(d.path().join("secret"), d.path().join("soft")).unwrap();
        fs::hard_link(d.path().join("secret"), d.path().join("hard")).unwrap();
        let mut s = String::new();
        dir.open_file("plain")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "mine");
        assert!(dir.open_file("soft").unwrap_err().is_planted());
        let err = dir.open_file("hard").unwrap_err();
        assert!(err.to_string().contains("2 hard links"), "{err}");
        assert!(dir.open_file("../etc").is_err());
    }

    #[test]
    fn create_new_never_writes_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let dir = SafeDir::open(d.path()).unwrap();
        let target = d.path().join("target");
        fs::write(&target, "keep").unwrap();
        symlink(&target, d.path().join("name")).unwrap();
        assert!(dir.create_new("name", 0o640).is_err());
        symlink(d.path().join("dangling"), d.path().join("name2")).unwrap();
        assert!(dir.create_new("name2", 0o640).is_err());
        assert!(!d.path().join("dangling").exists());
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        let mut f = dir.create_new("fresh", 0o640).unwrap();
        f.write_all(b"x").unwrap();
        let mode = fs::metadata(d.path().join("fresh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn renames_move_links_not_targets() {
        let d = tempfile::tempdir().unwrap();
        let dir = SafeDir::open(d.path()).unwrap();
        let (to, created) = dir.ensure_dir("to", 0o2750).unwrap();
        assert!(created);
        assert_eq!(to.meta().unwrap().perm(), 0o2750);
        fs::write(d.path().join("target"), "t").unwrap();
        symlink(d.path().join("target"), d.path().join("link")).unwrap();
        let moved = dir.move_into("link", &to, "S").unwrap();
        assert_eq!(moved, "link.S");
        assert!(
            fs::symlink_metadata(d.path().join("to/link.S"))
                .unwrap()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(d.path().join("target")).unwrap(), "t");
        fs::write(d.path().join("link"), "again").unwrap();
        assert_eq!(dir.move_into("link", &to, "S").unwrap(), "link.S.1");
        let names: Vec<_> = to.entries().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["link.S", "link.S.1"]);
    }
}
