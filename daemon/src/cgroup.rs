//! The cgroup v2 whose sockets are accounted: finding the v2 mount and our own cgroup, making a
//! child for the daemon when it sits in the root, moving in, and undoing all of it on drop.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

/// Errors placing the process in a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup v2 (cgroup2) mount in /proc/mounts, and mounting one failed")]
    NoV2Mount,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("no cgroup v2 entry (\"0::/...\") in /proc/self/cgroup")]
    NoV2Membership,
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot move this process into {path}: {source}")]
    Move { path: PathBuf, source: io::Error },
    #[error("cannot open cgroup {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not inside the cgroup v2 mount {mount}")]
    Outside { path: PathBuf, mount: PathBuf },
}

/// Where tpacct mounts cgroup2 itself when none is visible.
const OWN_MOUNT: &str = "/run/tpacct/cgroup2";

/// Where the cgroup v2 hierarchy is mounted (not always `/sys/fs/cgroup`). When no mount is
/// visible — `ip netns exec` remounts /sys in a private mount namespace, hiding it — cgroup2
/// is mounted at [`OWN_MOUNT`] (same hierarchy, another view).
pub fn v2_mount() -> Result<PathBuf, Error> {
    let mounts = read("/proc/mounts")?;
    if let Some(found) = parse_v2_mount(&mounts) {
        return Ok(found);
    }
    let own = PathBuf::from(OWN_MOUNT);
    mount_own(&own, "cgroup2", None).ok_or(Error::NoV2Mount)?;
    tracing::info!("no cgroup2 mount visible; mounted one at {OWN_MOUNT}");
    Ok(own)
}

/// Mounts a cgroup hierarchy of type `fstype` (with `data`, e.g. v1's controller) at `dir`,
/// made if missing: the same hierarchy, visible where a private /sys hid it.
pub(crate) fn mount_own(dir: &Path, fstype: &str, data: Option<&str>) -> Option<()> {
    std::fs::create_dir_all(dir).ok()?;
    nix::mount::mount(
        Some(fstype),
        dir,
        Some(fstype),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        data,
    )
    .ok()
}

fn parse_v2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// This process's cgroup v2 directory.
pub fn own() -> Result<PathBuf, Error> {
    let mount = v2_mount()?;
    let membership = read("/proc/self/cgroup")?;
    let rel = parse_v2_membership(&membership).ok_or(Error::NoV2Membership)?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

fn parse_v2_membership(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

fn read(path: &str) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })
}

/// Removes `tpacct-<pid>` cgroups left by daemons that were killed: their process is gone and
/// nothing is inside them.
fn remove_stale_children(mount: &Path) {
    let Ok(entries) = std::fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("tpacct-"))
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let empty = std::fs::read_to_string(entry.path().join("cgroup.procs"))
            .is_ok_and(|procs| procs.trim().is_empty());
        if empty && !Path::new("/proc").join(pid).exists() {
            match std::fs::remove_dir(entry.path()) {
                Ok(()) => tracing::info!("removed stale cgroup {}", entry.path().display()),
                Err(e) => tracing::debug!("stale cgroup {}: {e}", entry.path().display()),
            }
        }
    }
}

fn move_into(dir: &Path) -> Result<(), Error> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).map_err(|source| Error::Move {
        path: dir.to_owned(),
        source,
    })
}

/// The cgroup programs are attached to, with this process inside it. Dropping it moves the
/// process back where it was and removes the cgroup if it was made here.
#[derive(Debug)]
pub struct Placement {
    dir: PathBuf,
    file: File,
    /// Set when this process was moved: the cgroup it came from.
    came_from: Option<PathBuf>,
    /// Set when the directory was made here.
    created: bool,
}

impl Placement {
    /// Places the process for accounting. With `configured`, that cgroup (made if missing);
    /// otherwise our own cgroup, unless it is the root (which would account every socket on
    /// the machine): then a child `tpacct-<pid>` is made.
    pub fn establish(configured: Option<&Path>) -> Result<Placement, Error> {
        let mount = v2_mount()?;
        let own = own()?;
        let (dir, should_create) = match configured {
            Some(dir) => {
                if !dir.starts_with(&mount) {
                    return Err(Error::Outside {
                        path: dir.to_owned(),
                        mount,
                    });
                }
                (dir.to_owned(), !dir.exists())
            }
            None if own == mount => {
                remove_stale_children(&mount);
                (mount.join(format!("tpacct-{}", std::process::id())), true)
            }
            None => (own.clone(), false),
        };
        Placement::at(dir, should_create, &own)
    }

    /// A fresh child of this process's cgroup named `name`, with the process moved in. For tests
    /// and tools that need their own accounted cgroup.
    pub fn child(name: &str) -> Result<Placement, Error> {
        let own = own()?;
        Placement::at(own.join(name), true, &own)
    }

    fn at(dir: PathBuf, create: bool, own: &Path) -> Result<Placement, Error> {
        if create {
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(Error::Create { path: dir, source }),
            }
        }
        let mut placement = Placement {
            file: File::open(&dir).map_err(|source| Error::Open {
                path: dir.clone(),
                source,
            })?,
            dir,
            came_from: None,
            created: create,
        };
        if !own.starts_with(&placement.dir) {
            move_into(&placement.dir)?;
            placement.came_from = Some(own.to_owned());
        }
        Ok(placement)
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// An open handle on the directory, for attaching programs.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if let Some(back) = &self.came_from
            && let Err(e) = move_into(back)
        {
            tracing::warn!("leaving cgroup {}: {e}", self.dir.display());
        }
        if self.created
            && let Err(e) = std::fs::remove_dir(&self.dir)
        {
            tracing::warn!("removing cgroup {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v2_mount_among_v1() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            parse_v2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_v2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn reads_v2_membership() {
        let text = "4:memory:/x\n1:cpu:/\n0::/system.slice/tpacct.service\n";
        assert_eq!(
            parse_v2_membership(text),
            Some("/system.slice/tpacct.service")
        );
        assert_eq!(parse_v2_membership("1:cpu:/\n"), None);
    }
}
