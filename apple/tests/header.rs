//! include/sluice.h is what cbindgen makes of src/lib.rs: fails when the checked-in header is
//! stale. `SLUICE_UPDATE_HEADER=1 cargo test -p sluice-apple --test header` rewrites it.

use std::path::Path;

#[test]
fn the_checked_in_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        // The exports and their types all live in lib.rs: no cargo metadata run needed.
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen could not read src/lib.rs")
        .write(&mut generated);
    let path = dir.join("include/sluice.h");
    if std::env::var_os("SLUICE_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("cannot write include/sluice.h");
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "apple/include/sluice.h is stale (or missing): the C ABI in apple/src/lib.rs changed.\n\
         Refresh it with: SLUICE_UPDATE_HEADER=1 cargo test -p sluice-apple --test header\n\
         --- generated ---\n{}",
        String::from_utf8_lossy(&generated)
    );
}
