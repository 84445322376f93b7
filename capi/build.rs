//! Generates `include/notifier.h` from the crate's `extern "C"` items
//! with cbindgen. The header is committed too, so C users can read it
//! without building; CI fails if the committed copy is stale
//! (`tests/run_c.sh` diffs them).

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let cfg = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("capi/cbindgen.toml");
    let out = dir.join("include").join("notifier.h");
    match cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(cfg)
        .generate()
    {
        Ok(b) => {
            b.write_to_file(&out);
        }
        // A header that cannot be generated must not break the Rust
        // build of the workspace: say so; run_c.sh fails on a stale header.
        Err(e) => println!("cargo:warning=cbindgen: {e}"),
    }
}
