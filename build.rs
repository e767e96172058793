//! Links the `gatehouse` binary with its serving code laid out together.
//!
//! The kernel maps an executable's code 64 KiB around each page a process touches, so the few
//! hundred functions a serving gateway runs, scattered by the compiler over tens of megabytes
//! of text, keep several times their size resident. `deploy/link-order.txt` lists them,
//! hottest first (written by `cargo bench --bench gateway -- --write-link-order PROFILE`);
//! LLVM's linker, Rust's default on x86_64 Linux, places them at the start of the text.
//! Names the build does not have (another profile's, or code since changed) are skipped, so a
//! stale list costs memory, never correctness.

use std::path::Path;

fn main() {
    const ORDER: &str = "deploy/link-order.txt";
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-env-changed=GATEHOUSE_LINK_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    // Only where the linker is known to be LLVM's: another would refuse the option.
    let rust_lld_default = env("TARGET") == "x86_64-unknown-linux-gnu";
    let linker_chosen = !env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty()
        || ["linker", "link-self-contained", "fuse-ld"]
            .iter()
            .any(|flag| env("CARGO_ENCODED_RUSTFLAGS").contains(flag));
    let path = Path::new(&env("CARGO_MANIFEST_DIR")).join(ORDER);
    if !rust_lld_default || linker_chosen || env("GATEHOUSE_LINK_ORDER") == "off" || !path.exists()
    {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=gatehouse=-Wl,--symbol-ordering-file={}",
        path.display()
    );
    println!("cargo:rustc-link-arg-bin=gatehouse=-Wl,--no-warn-symbol-ordering");
}
