//! The daemon's memory and its limit as the kernel enforces them: cgroup v2 (`memory.current`,
//! `memory.max` of this cgroup and every ancestor) or v1 (`memory.usage_in_bytes`,
//! `hierarchical_memory_limit`), else the resident set size with no limit. Socket and pipe
//! buffers are charged to the cgroup, so its figure, not RSS, is what runs out.

use std::path::{Path, PathBuf};

/// Where v1's memory hierarchy is mounted when none is visible (`ip netns exec` hides /sys).
const OWN_V1_MOUNT: &str = "/run/tpacct/memory";

/// Where the figures come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    /// v2: this process's cgroup and the v2 mount's root.
    V2 { own: PathBuf, root: PathBuf },
    /// v1: this process's memory cgroup directory.
    V1(PathBuf),
    /// No memory cgroup: RSS, no limit.
    Rss,
}

impl Memory {
    /// Finds this process's memory cgroup. Call it after the process has moved to the cgroup
    /// it stays in.
    pub fn locate() -> Memory {
        if let Some(dir) = v1_dir() {
            return Memory::V1(dir);
        }
        match (crate::cgroup::own(), crate::cgroup::v2_mount()) {
            (Ok(own), Ok(root)) if own.join("memory.current").exists() => Memory::V2 { own, root },
            _ => Memory::Rss,
        }
    }

    /// The limit that applies (the lowest on the way to the root); 0: none.
    pub fn limit(&self) -> u64 {
        match self {
            Memory::V2 { own, root } => limited_ancestor(own, root).map_or(0, |(_, l)| l),
            Memory::V1(dir) => std::fs::read_to_string(dir.join("memory.stat"))
                .ok()
                .and_then(|stat| {
                    stat.lines()
                        .find_map(|l| l.strip_prefix("hierarchical_memory_limit "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                // v1 says "no limit" with a huge page-aligned number.
                .filter(|&l| l < (1 << 62))
                .unwrap_or(0),
            Memory::Rss => 0,
        }
    }

    /// Memory in use where the limit applies: the limiting cgroup's working set (this
    /// cgroup's when nothing above limits it) — its charge less the inactive file cache the
    /// kernel reclaims before it kills anything (what the kubelet and `docker stats` use) —
    /// else RSS. The history database's writes, say, are cache, not flows' memory.
    pub fn usage(&self) -> u64 {
        let working_set = |dir: &Path, charge: &str, inactive: &str| {
            let charged = read_u64(&dir.join(charge))?;
            let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
            let cache = stat
                .lines()
                .find_map(|l| {
                    l.strip_prefix(inactive)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(0u64);
            Some(charged.saturating_sub(cache))
        };
        let charged = match self {
            Memory::V2 { own, root } => {
                let dir = limited_ancestor(own, root).map_or_else(|| own.clone(), |(d, _)| d);
                working_set(&dir, "memory.current", "inactive_file")
            }
            Memory::V1(dir) => working_set(dir, "memory.usage_in_bytes", "total_inactive_file"),
            Memory::Rss => None,
        };
        charged.unwrap_or_else(crate::speed::rss)
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The nearest cgroup from `own` up to (not including) `root` whose `memory.max` is a number,
/// with the lowest such limit on the way.
fn limited_ancestor(own: &Path, root: &Path) -> Option<(PathBuf, u64)> {
    let mut best: Option<(PathBuf, u64)> = None;
    let mut dir = own;
    while dir.starts_with(root) && dir != root {
        if let Some(limit) = read_u64(&dir.join("memory.max"))
            && best.as_ref().is_none_or(|(_, b)| limit < *b)
        {
            best = Some((dir.to_owned(), limit));
        }
        dir = dir.parent()?;
    }
    best
}

/// This process's v1 memory cgroup, when the memory controller is on a v1 hierarchy.
fn v1_dir() -> Option<PathBuf> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = membership.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.trim_start_matches('/').to_owned())
    })?;
    let mount = v1_mount()?;
    let dir = mount.join(rel);
    dir.join("memory.usage_in_bytes").exists().then_some(dir)
}

fn v1_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let found = mounts.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory"))
            .then(|| PathBuf::from(f[1]))
    });
    if found.is_some() {
        return found;
    }
    // Hidden by a private /sys: mount the same hierarchy where we can see it.
    let own = PathBuf::from(OWN_V1_MOUNT);
    crate::cgroup::mount_own(&own, "cgroup", Some("memory"))?;
    Some(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_and_limit_come_from_the_kernel() {
        let m = Memory::locate();
        let used = m.usage();
        // This test process uses at least a megabyte, and not a terabyte.
        assert!((1 << 20..1 << 40).contains(&used), "{m:?}: {used}");
        let limit = m.limit();
        assert!(
            limit == 0 || limit >= used,
            "{m:?}: limit {limit} < usage {used}"
        );
    }
}
