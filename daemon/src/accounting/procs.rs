//! The process-attribution programs: attaching the cgroup connect/sendmsg hooks and the
//! connect-time sock_ops program where local processes live, and reading their records.

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use tpacct_common::{PROC_SOCK_MAP, PROC_TUPLE_MAP, ProcKey, ProcRecord};

use super::{
    Error,
    ebpf::{map, program},
};
use crate::cgroup;

/// The record maps of the process hooks, attached to one cgroup.
pub struct ProcMaps {
    by_tuple: HashMap<MapData, ProcKey, ProcRecord>,
    by_cookie: HashMap<MapData, u64, ProcRecord>,
    cgroup: PathBuf,
}

impl std::fmt::Debug for ProcMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcMaps")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl ProcMaps {
    /// Attaches the hooks to `configured`, or to the root of the cgroup v2 hierarchy (every
    /// process on the machine), and takes their maps out of `ebpf`.
    pub(super) fn attach(ebpf: &mut Ebpf, configured: Option<&Path>) -> Result<ProcMaps, Error> {
        let dir = match configured {
            Some(dir) => dir.to_owned(),
            None => cgroup::v2_mount()?,
        };
        let file = File::open(&dir).map_err(|source| {
            Error::Cgroup(cgroup::Error::Open {
                path: dir.clone(),
                source,
            })
        })?;
        let fd = file.as_fd();
        let mode = CgroupAttachMode::Single;
        for name in [
            "tpacct_proc_connect4",
            "tpacct_proc_connect6",
            "tpacct_proc_sendmsg4",
            "tpacct_proc_sendmsg6",
        ] {
            let p: &mut CgroupSockAddr = program(ebpf, name)?;
            p.load()
                .and_then(|()| p.attach(fd, mode).map(drop))
                .map_err(|source| Error::Program { name, source })?;
        }
        let name = "tpacct_proc_ops";
        let ops: &mut SockOps = program(ebpf, name)?;
        ops.load()
            .and_then(|()| ops.attach(fd, mode).map(drop))
            .map_err(|source| Error::Program { name, source })?;
        Ok(ProcMaps {
            by_tuple: map(ebpf, PROC_TUPLE_MAP)?,
            by_cookie: map(ebpf, PROC_SOCK_MAP)?,
            cgroup: dir,
        })
    }

    /// The cgroup the hooks watch.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The record of the TCP client socket with this 4-tuple, if its connect was seen.
    pub fn tcp_client(&self, key: &ProcKey) -> Option<ProcRecord> {
        self.by_tuple.get(key, 0).ok()
    }

    /// The record of the socket with this cookie.
    pub fn socket(&self, cookie: u64) -> Option<ProcRecord> {
        self.by_cookie.get(&cookie, 0).ok()
    }
}
