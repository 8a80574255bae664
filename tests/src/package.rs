//! The Debian package under test and the clean Debian roots it is installed into.

use crate::{bin_dir, repo_root};
use std::path::PathBuf;
use std::process::Command;

/// Builds the package from the binaries under test, and returns its path.
pub fn build_package() -> PathBuf {
    let bins = bin_dir();
    let profile = match bins.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => panic!("no profile folder in {}", bins.display()),
    };
    // cargo holds the build lock while the tests run: package what it built.
    let path = run(
        Command::new(repo_root().join("scripts/build-package")).args([
            "--profile",
            &profile,
            "--no-build",
        ]),
    );
    repo_root().join(path.trim())
}

/// A fresh copy of the clean host root (images/build-host-root) at `<dir>/root`.
pub fn host_root(prefix: &str) -> tempfile::TempDir {
    let tar = run(&mut Command::new(
        repo_root().join("images/build-host-root"),
    ));
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-xf")
        .arg(tar.trim()));
    dir
}

/// The command's stdout; its whole output in the panic message when it fails.
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
