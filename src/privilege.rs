//! What root's tools do in the spool, they do as the spool's owner.
//!
//! The spool belongs to the service user, every job runs as that user, and
//! members of its group write `tmp/` and `pending/`: anything in it may be
//! a link planted to make a privileged process act somewhere else. So root
//! keeps only what needs root (unit control over D-Bus, creating the user,
//! fixing the owner of the spool's own directories, which goes through
//! [`crate::spool::safe`]); all other spool work runs with the owner's ids:
//!
//! - tools whose whole job is spool work (`cleanup`, `ensure-running`)
//!   [`become_owner`] for good before they touch it;
//! - tools that also need root (`health --fix`, `diagnose`, `repair`)
//!   [`lower`] their effective ids for each stretch of spool work. The real
//!   and saved ids stay root, so a job, which runs as the owner, can neither
//!   signal nor trace the tool meanwhile.
//!
//! Nothing happens unless the process runs as root and the spool's owner is
//! not root.

use std::path::Path;

use anyhow::Context;
use nix::unistd::{Gid, Uid, User, getgroups, setgroups, setresgid, setresuid};

use crate::spool::safe::SafeDir;

/// The user and group a spool belongs to.
#[derive(Debug, Clone)]
pub struct Owner {
    /// Its uid.
    pub uid: Uid,
    /// The spool's group: the owner's primary group where the owner has a
    /// passwd entry, else the spool root's group.
    pub gid: Gid,
    /// The owner's name, where it has one.
    pub name: Option<String>,
    /// Its groups (the primary one included).
    groups: Vec<Gid>,
}

impl Owner {
    /// The owner of the spool root `spool` (not following a link there), or
    /// `None` when it is root or the spool does not exist.
    pub fn of_spool(spool: &Path) -> anyhow::Result<Option<Owner>> {
        let meta = match SafeDir::open(spool) {
            Ok(dir) => dir.meta()?,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if meta.uid == 0 {
            return Ok(None);
        }
        let uid = Uid::from_raw(meta.uid);
        let user = User::from_uid(uid).ok().flatten();
        let gid = user.as_ref().map_or(Gid::from_raw(meta.gid), |u| u.gid);
        let mut groups = vec![gid];
        if let Some(u) = &user
            && let Ok(name) = std::ffi::CString::new(u.name.as_str())
            && let Ok(all) = nix::unistd::getgrouplist(&name, gid)
        {
            groups = all;
        }
        Ok(Some(Owner {
            uid,
            gid,
            name: user.map(|u| u.name),
            groups,
        }))
    }

    /// The owner's name, or `uid N`.
    pub fn describe(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("uid {}", self.uid))
    }
}

/// For a root process whose work is all in `spool`: becomes the spool's
/// owner for good (groups, then gid, then uid, real, effective and saved).
/// Returns the owner it became, or `None` when nothing changed (not root,
/// or a spool that root owns or that does not exist yet).
pub fn become_owner(spool: &Path) -> anyhow::Result<Option<Owner>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let Some(owner) = Owner::of_spool(spool)? else {
        return Ok(None);
    };
    setgroups(&owner.groups).context("setting the spool owner's groups")?;
    setresgid(owner.gid, owner.gid, owner.gid).context("switching to the spool's group")?;
    setresuid(owner.uid, owner.uid, owner.uid).context("switching to the spool's owner")?;
    anyhow::ensure!(
        setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_err(),
        "the switch to {} could be undone",
        owner.describe()
    );
    Ok(Some(owner))
}

/// Effective ids lowered to a spool's owner; dropping it raises them back.
#[derive(Debug)]
pub struct Lowered {
    groups: Vec<Gid>,
    egid: Gid,
}

/// For a root process that also needs root: acts as the spool's owner
/// (effective uid, gid and groups) until the returned guard is dropped.
/// `None` when nothing changed (see [`become_owner`]). The process must not
/// need root on another thread meanwhile: the ids are the whole process's.
pub fn lower(spool: &Path) -> anyhow::Result<Option<Lowered>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let Some(owner) = Owner::of_spool(spool)? else {
        return Ok(None);
    };
    let saved = Lowered {
        groups: getgroups().context("reading this process's groups")?,
        egid: Gid::effective(),
    };
    let keep = Uid::from_raw(u32::MAX);
    setgroups(&owner.groups).context("setting the spool owner's groups")?;
    setresgid(Gid::from_raw(u32::MAX), owner.gid, Gid::from_raw(u32::MAX))
        .context("switching to the spool's group")?;
    setresuid(keep, owner.uid, keep).context("switching to the spool's owner")?;
    Ok(Some(saved))
}

impl Drop for Lowered {
    fn drop(&mut self) {
        let keep_u = Uid::from_raw(u32::MAX);
        let keep_g = Gid::from_raw(u32::MAX);
        // Failing to raise leaves the process with less privilege, never
        // more: the root-only steps after it fail and say so.
        if let Err(e) = setresuid(keep_u, Uid::from_raw(0), keep_u) {
            tracing::error!("raising the effective uid back to root: {e}");
            return;
        }
        if let Err(e) = setresgid(keep_g, self.egid, keep_g) {
            tracing::error!("restoring the effective gid: {e}");
        }
        if let Err(e) = setgroups(&self.groups) {
            tracing::error!("restoring the groups: {e}");
        }
    }
}
