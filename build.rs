//! Links the `gatehouse` binary with its serving code laid out together.
//!
//! The kernel maps an executable's code 64 KiB around each page a process touches, so the
//! two thousand or so functions a serving gateway runs, scattered by the compiler over tens of
//! megabytes of text, keep several times their size resident. `deploy/link-order.txt` lists
//! them, hottest first (written by `cargo bench --bench gateway -- --write-link-order BUILD`);
//! LLVM's linker places them at the start of the text. Names the build does not have (another
//! build's, or code since changed) are skipped, so a stale list costs memory, never
//! correctness. Other linkers (GNU ld, gold: a distribution's Rust may use them) do not know
//! the option, so a probe link decides; `GATEHOUSE_LINK_ORDER=off` skips it all.

use std::path::{Path, PathBuf};
use std::process::Command;

const ORDER: &str = "deploy/link-order.txt";

fn main() {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let order = Path::new(&env("CARGO_MANIFEST_DIR")).join(ORDER);
    // Watching a file that does not exist would rebuild the crate every time.
    let watched = match order.parent() {
        _ if order.exists() => order.as_path(),
        Some(dir) if dir.exists() => dir,
        _ => Path::new("build.rs"),
    };
    println!("cargo:rerun-if-changed={}", watched.display());
    for var in [
        "GATEHOUSE_LINK_ORDER",
        "RUSTC_LINKER",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env("GATEHOUSE_LINK_ORDER") == "off" || !order.exists() {
        return;
    }
    // `-Xlinker` passes the path whole (`-Wl,` would split it at commas).
    let args = [
        "-Xlinker".to_owned(),
        format!("--symbol-ordering-file={}", order.display()),
        "-Xlinker".to_owned(),
        "--no-warn-symbol-ordering".to_owned(),
    ];
    if !linker_takes(&args, &env) {
        println!(
            "cargo:warning=the linker does not take --symbol-ordering-file: serving code not laid out together (more resident memory, same behaviour)"
        );
        return;
    }
    for arg in args {
        println!("cargo:rustc-link-arg-bin=gatehouse={arg}");
    }
}

/// Whether the linker this build uses links an empty program with `args`: the compiler, the
/// target, the flags and the linker Cargo gives the build.
fn linker_takes(args: &[String], env: &dyn Fn(&str) -> String) -> bool {
    let out = PathBuf::from(env("OUT_DIR"));
    let source = out.join("link_order_probe.rs");
    if std::fs::write(&source, "fn main() {}\n").is_err() {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut probe = Command::new(rustc);
    probe
        .args(["--edition", "2024", "--crate-type", "bin", "--target"])
        .arg(env("TARGET"))
        .arg("-o")
        .arg(out.join("link_order_probe"))
        .arg(&source);
    let flags = env("CARGO_ENCODED_RUSTFLAGS");
    probe.args(flags.split('\u{1f}').filter(|f| !f.is_empty()));
    let linker = env("RUSTC_LINKER");
    if !linker.is_empty() {
        probe.arg("-C").arg(format!("linker={linker}"));
    }
    for arg in args {
        probe.arg("-C").arg(format!("link-arg={arg}"));
    }
    probe.output().is_ok_and(|o| o.status.success())
}
