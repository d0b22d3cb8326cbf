//! Builds the eBPF programs from `../ebpf` for the BPF target and leaves the object in `OUT_DIR`
//! for `include_bytes_aligned!`. Uses the toolchain cargo itself runs on (no nightly needed):
//! `RUSTC_BOOTSTRAP=1` unlocks `-Z build-std=core` for that one inner build.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../common/src");
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    // SAFETY: build scripts are single-threaded; the variable is read by the child cargo.
    // CARGO_TERM_QUIET keeps the inner build's progress lines out of our warnings.
    unsafe {
        std::env::set_var("RUSTC_BOOTSTRAP", "1");
        std::env::set_var("CARGO_TERM_QUIET", "true");
    }
    let package = aya_build::Package {
        name: "tpacct-ebpf",
        root_dir: "../ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
}
