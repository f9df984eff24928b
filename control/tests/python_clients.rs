//! Runs the Python real-client suite (`tests/python`: httpx over HTTP/1.1 and
//! h2c, TLS, curl, the CLI as a user types it) against this build's `serin`
//! binary, so that `cargo test --workspace` also covers what users drive from
//! outside. The first run creates a venv and installs the pinned clients from
//! PyPI (`tests/python/run.sh`); later runs reuse it.

use std::path::Path;
use std::process::Command;

#[test]
fn python_client_suite_passes_against_this_build() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let out = Command::new("bash")
        .arg(root.join("tests/python/run.sh"))
        .env("SERIN_BIN", env!("CARGO_BIN_EXE_serin"))
        .current_dir(root)
        .output()
        .expect("run bash tests/python/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client suite failed (rerun: bash tests/python/run.sh):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed"), "pytest ran no test:\n{stdout}");
    // Show pytest's summary line in cargo's output when run with --nocapture.
    println!("{}", stdout.lines().last().unwrap_or_default());
}
