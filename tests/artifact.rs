//! The binary Asterisk starts once per call carries the product only: no
//! crate of the bench (the simulator and testbeds in popivr-testkit, the
//! certificate generator, the man page generator, the test helpers) is
//! among the dependencies it is built with.

use std::collections::BTreeSet;
use std::process::Command;

/// The crates the `popivr` package is built with (not its tests).
fn normal_dependencies() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "--package",
            "popivr",
            "--edges",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_binary_is_built_without_the_bench() {
    let deps = normal_dependencies();
    // The listing works: the product's own stack is in it.
    for needed in ["popivr", "tokio", "tokio-xmpp", "clap", "nom"] {
        assert!(deps.contains(needed), "{needed} missing from {deps:?}");
    }
    for bench in [
        "popivr-testkit",
        "rcgen",
        "clap_mangen",
        "proptest",
        "tempfile",
    ] {
        assert!(
            !deps.contains(bench),
            "{bench} is built into the popivr binary"
        );
    }
}
