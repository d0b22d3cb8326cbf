//! `cargo xtask install` / `uninstall`: the release binary, the systemd unit, the default
//! config and the README put in place under a root (`/` by default), with a manifest so that
//! uninstalling removes exactly what was installed. A config already there is never
//! overwritten; the config and the state directory outlive an uninstall unless `--purge`.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// Where each installed file goes, relative to the root, and its mode.
const FILES: [(&str, &str, u32); 3] = [
    ("target/release/tpacctd", "usr/local/bin/tpacctd", 0o755),
    (
        "systemd/tpacctd.service",
        "etc/systemd/system/tpacctd.service",
        0o644,
    ),
    ("README.md", "usr/local/share/doc/tpacct/README.md", 0o644),
];
const CONFIG: (&str, &str) = ("systemd/config.yaml", "etc/tpacct/config.yaml");
const MANIFEST: &str = "usr/local/share/doc/tpacct/installed-files";
/// What `--purge` removes besides the files: the unit's ConfigurationDirectory and
/// StateDirectory.
const PURGED: [&str; 2] = ["etc/tpacct", "var/lib/tpacct"];

/// Whether systemd manages this machine (the unit is then loaded and can be enabled).
fn systemd_runs(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) {
    match std::process::Command::new("systemctl").args(args).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("systemctl {}: {s}", args.join(" ")),
        Err(e) => eprintln!("systemctl {}: {e}", args.join(" ")),
    }
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Into a new file, then renamed: a running binary is replaced, not overwritten in place.
    let tmp = to.with_extension("xtask-new");
    fs::copy(from, &tmp).with_context(|| format!("{} → {}", from.display(), tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    println!("installed {}", to.display());
    Ok(())
}

/// Installs from the workspace `source` into `root`; returns the files installed.
pub fn install(source: &Path, root: &Path) -> Result<Vec<PathBuf>> {
    for (from, _, _) in FILES {
        if !source.join(from).exists() {
            bail!(
                "{} is missing (build it first)",
                source.join(from).display()
            );
        }
    }
    let mut installed = Vec::new();
    for (from, to, mode) in FILES {
        let to = root.join(to);
        copy(&source.join(from), &to, mode)?;
        installed.push(to);
    }
    let config = root.join(CONFIG.1);
    if config.exists() {
        println!(
            "kept {} (yours; the default is {})",
            config.display(),
            CONFIG.0
        );
    } else {
        copy(&source.join(CONFIG.0), &config, 0o600)?;
    }
    let manifest: String = installed
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    fs::write(root.join(MANIFEST), manifest)?;
    if systemd_runs(root) {
        systemctl(&["daemon-reload"]);
        println!(
            "next: edit {} and run: systemctl enable --now tpacctd",
            config.display()
        );
    } else {
        println!(
            "systemd is not running here: start it with {}",
            root.join(FILES[0].1).display()
        );
    }
    Ok(installed)
}

/// Removes what [`install`] put under `root` (and, with `purge`, the config and state).
pub fn uninstall(root: &Path, purge: bool) -> Result<()> {
    let manifest = root.join(MANIFEST);
    let listed = fs::read_to_string(&manifest)
        .with_context(|| format!("{}: nothing installed here", manifest.display()))?;
    if systemd_runs(root) {
        systemctl(&["disable", "--now", "tpacctd"]);
    }
    for file in listed.lines().map(PathBuf::from).chain([manifest]) {
        match fs::remove_file(&file) {
            Ok(()) => println!("removed {}", file.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing {}: {e}", file.display()),
        }
    }
    let _ = fs::remove_dir(root.join("usr/local/share/doc/tpacct"));
    if purge {
        for dir in PURGED.map(|d| root.join(d)) {
            if dir.exists() {
                fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
                println!("removed {}", dir.display());
            }
        }
    } else {
        println!(
            "kept {} and {} (--purge removes them)",
            root.join(PURGED[0]).display(),
            root.join(PURGED[1]).display()
        );
    }
    if systemd_runs(root) {
        systemctl(&["daemon-reload"]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workspace whose release binary is the real daemon this workspace's tests built.
    fn source() -> PathBuf {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let stage = std::env::temp_dir().join(format!("tpacct-install-src-{}", std::process::id()));
        fs::create_dir_all(stage.join("target/release")).expect("stage");
        fs::create_dir_all(stage.join("systemd")).expect("stage");
        let built = root.join("target/debug/tpacctd");
        assert!(built.exists(), "{} (cargo test builds it)", built.display());
        for (from, to) in [
            (built, "target/release/tpacctd".into()),
            (
                root.join("systemd/tpacctd.service"),
                PathBuf::from("systemd/tpacctd.service"),
            ),
            (
                root.join("systemd/config.yaml"),
                PathBuf::from("systemd/config.yaml"),
            ),
            (root.join("README.md"), PathBuf::from("README.md")),
        ] {
            fs::copy(&from, stage.join(to)).expect("copy");
        }
        stage
    }

    #[test]
    fn install_then_uninstall_leaves_only_config_and_state() {
        let src = source();
        let root = std::env::temp_dir().join(format!("tpacct-install-root-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let files = install(&src, &root).expect("install");
        assert_eq!(files.len(), 3);
        let bin = root.join("usr/local/bin/tpacctd");
        let config = root.join("etc/tpacct/config.yaml");
        assert_eq!(
            fs::metadata(&bin).expect("bin").permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::metadata(&config).expect("config").permissions().mode() & 0o777,
            0o600
        );
        // The installed binary accepts the installed default config.
        let check = std::process::Command::new(&bin)
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("tpacctd check");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        // The unit starts the installed binary with the installed config.
        let unit =
            fs::read_to_string(root.join("etc/systemd/system/tpacctd.service")).expect("unit");
        assert!(
            unit.contains("ExecStart=/usr/local/bin/tpacctd run --config /etc/tpacct/config.yaml")
        );
        // A config of the user's own survives a reinstall.
        fs::write(&config, "mixed-port: 7891\n").expect("edit");
        install(&src, &root).expect("reinstall");
        assert_eq!(
            fs::read_to_string(&config).expect("config"),
            "mixed-port: 7891\n"
        );

        fs::create_dir_all(root.join("var/lib/tpacct")).expect("state");
        uninstall(&root, false).expect("uninstall");
        for f in &files {
            assert!(!f.exists(), "{} removed", f.display());
        }
        assert!(
            config.exists() && root.join("var/lib/tpacct").exists(),
            "config and state kept"
        );
        assert!(
            uninstall(&root, false).is_err(),
            "nothing left to uninstall"
        );
        install(&src, &root).expect("install again");
        uninstall(&root, true).expect("purge");
        assert!(
            !config.exists() && !root.join("var/lib/tpacct").exists(),
            "purged"
        );
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_dir_all(&src);
    }
}
