//! Generates the C header `include/rsmsg.h` from `src/capi/` with cbindgen.
//!
//! The header is committed: the build rewrites it only when its contents change (so a changed
//! C API shows up in `git diff`, which CI checks), and leaves it alone when the source tree is
//! read-only. A copy always lands in `$OUT_DIR/rsmsg.h`.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-changed=src/capi");
    println!("cargo::rerun-if-changed=cbindgen.toml");
    println!("cargo::rerun-if-changed=build.rs");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let config =
        cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml is valid");
    let header = match cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/capi/mod.rs"))
        .generate()
    {
        Ok(h) => h,
        Err(e) => {
            // A syntax error in src/capi is reported by rustc with a better message.
            println!("cargo::warning=cbindgen could not generate include/rsmsg.h: {e}");
            return;
        }
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("rsmsg.h");
    header.write_to_file(&out);
    let committed = root.join("include/rsmsg.h");
    let new = std::fs::read(&out).expect("just written");
    if std::fs::read(&committed).ok().as_deref() != Some(&new[..]) {
        let _ = std::fs::create_dir_all(root.join("include"));
        if let Err(e) = std::fs::write(&committed, &new) {
            println!("cargo::warning=include/rsmsg.h is out of date and cannot be rewritten: {e}");
        }
    }
}
