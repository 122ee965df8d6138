//! Builds `robin-ebpf` for `bpfel-unknown-none` and leaves the object in `OUT_DIR/robin-ebpf`,
//! where `capture::ebpf` embeds it. The toolchain (Debian's rustc with its source, linked into
//! rustup as `bpf-debian`, plus bpf-linker) is installed by `cargo xtask setup`.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

const EBPF_TOOLCHAIN: &str = "bpf-debian";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../robin-ebpf");
    let common_dir = format!("{manifest_dir}/../robin-common");
    println!("cargo:rerun-if-changed={common_dir}");
    // Debian's rustc is a stable compiler; `-Z build-std=core` (needed because no prebuilt core
    // exists for the BPF target) requires RUSTC_BOOTSTRAP, which aya-build reads from here.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [Package {
            name: "robin-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context(
        "building the eBPF object failed; run `cargo xtask setup` to install the eBPF toolchain",
    )
}
