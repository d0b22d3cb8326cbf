//! Executables by process, from `/proc`: each process's path read once and kept with its start
//! time, so a pid the kernel gave to a newer process is never taken for the old one.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex, PoisonError},
};

/// Processes remembered; the least recently used goes first.
const CACHED: usize = 4096;

/// A process as `/proc` shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Start time since boot, in nanoseconds (clock-tick resolution).
    pub start_ns: u64,
    /// The executable's path; None when it cannot be read (the process is exiting, or is a
    /// kernel thread).
    pub path: Option<Arc<str>>,
    /// `comm`.
    pub comm: String,
}

/// (tgid, start time in ticks) → the executable's path, if it could be read.
type Paths = lru::LruCache<(u32, u64), Option<Arc<str>>>;

/// Paths by (tgid, start time).
#[derive(Debug)]
pub struct Exes {
    cache: Mutex<Paths>,
    ns_per_tick: u64,
}

impl Default for Exes {
    fn default() -> Exes {
        Exes {
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(CACHED).unwrap_or(NonZeroUsize::MIN),
            )),
            ns_per_tick: 1_000_000_000 / procfs::ticks_per_second().max(1),
        }
    }
}

impl Exes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Paths> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The process `tgid` is now; None when there is none.
    pub fn seen(&self, tgid: u32) -> Option<Seen> {
        let process = procfs::process::Process::new(i32::try_from(tgid).ok()?).ok()?;
        let stat = process.stat().ok()?;
        let start_ns = stat.starttime.saturating_mul(self.ns_per_tick);
        let key = (tgid, stat.starttime);
        let cached = self.lock().get(&key).cloned();
        let path = match cached {
            Some(path) => path,
            None => {
                let path = process
                    .exe()
                    .ok()
                    .map(|p| Arc::from(p.to_string_lossy().trim_end_matches(" (deleted)")));
                self.lock().put(key, path.clone());
                path
            }
        };
        Some(Seen {
            start_ns,
            path,
            comm: stat.comm,
        })
    }

    /// The executable of the process `tgid` that was running at `at_ns` (boot time) under the
    /// name `comm`; None when that process has exited or its pid now belongs to another.
    pub fn of(&self, tgid: u32, at_ns: u64, comm: &str) -> Option<Arc<str>> {
        let seen = self.seen(tgid)?;
        (seen.start_ns <= at_ns && seen.comm == comm)
            .then_some(seen.path)
            .flatten()
    }
}

/// The socket inodes of every process: inode → tgid (one pass over `/proc/*/fd`).
pub fn socket_owners() -> std::collections::HashMap<u64, u32> {
    let mut owners = std::collections::HashMap::new();
    let Ok(all) = procfs::process::all_processes() else {
        return owners;
    };
    for process in all.flatten() {
        let Ok(fds) = process.fd() else { continue };
        let Ok(tgid) = u32::try_from(process.pid) else {
            continue;
        };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target {
                owners.entry(inode).or_insert(tgid);
            }
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot_ns() -> u64 {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .unwrap_or_else(|e| panic!("{e}"));
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    }

    #[test]
    fn a_running_process_has_its_path_and_a_later_start_is_refused() {
        let exes = Exes::default();
        let me = std::process::id();
        let seen = exes.seen(me).unwrap_or_else(|| panic!("no /proc/{me}"));
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seen.path.as_deref(), exe.to_str());
        // Connected now, by this process: attributed.
        assert_eq!(exes.of(me, boot_ns(), &seen.comm).as_deref(), exe.to_str());
        // "Connected" before this process started: its pid was somebody else's then.
        assert_eq!(
            exes.of(me, seen.start_ns.saturating_sub(1), &seen.comm),
            None
        );
        // Another name under the same pid: another process.
        assert_eq!(exes.of(me, boot_ns(), "not-this-one"), None);
    }

    #[test]
    fn an_exited_process_has_no_path() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let pid = child.id();
        child.wait().unwrap_or_else(|e| panic!("{e}"));
        // Reaped: the pid is free (or another process's, started after now - 1 s).
        assert_eq!(exes_of_gone(pid), None);
    }

    fn exes_of_gone(pid: u32) -> Option<Arc<str>> {
        Exes::default().of(pid, boot_ns().saturating_sub(1_000_000_000), "true")
    }

    #[test]
    fn this_process_sockets_are_found_by_inode() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .unwrap_or_else(|e| panic!("{e}"));
        let inode: u64 = link
            .to_string_lossy()
            .trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap_or_else(|e| panic!("{link:?}: {e}"));
        assert_eq!(socket_owners().get(&inode), Some(&std::process::id()));
    }
}
