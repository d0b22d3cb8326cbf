//! Scratch files: everything a test process writes lives under one directory of its own,
//! removed when the process exits; directories left by test processes that died are swept.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

const PREFIX: &str = "tpacct-it-";

/// This test process's scratch directory (made, and its cleanup arranged, on first use).
pub fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        sweep();
        let root = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("scratch directory");
        // SAFETY: `remove_root` is a plain `extern "C" fn` that takes nothing and unwinds
        // nowhere (it ignores every error); atexit only records its address.
        let rc = unsafe { libc::atexit(remove_root) };
        assert_eq!(rc, 0, "atexit");
        root
    })
}

/// `name` inside [`root`].
pub fn path(name: &str) -> PathBuf {
    root().join(name)
}

/// Writes `text` to `name` inside [`root`]; returns its path.
pub fn file(name: &str, text: &str) -> PathBuf {
    let path = path(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// Runs at exit (libtest's own `exit` included): the whole tree goes.
extern "C" fn remove_root() {
    let root = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(root);
}

/// Removes the scratch directories of test processes that no longer run (killed, aborted).
fn sweep() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
