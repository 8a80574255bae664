//! The dated lines that benchmarks and the soak append to BENCHMARKS.md.

use crate::repo_root;
use std::io::Write;
use std::process::Command;

/// Prints `line` and appends it to BENCHMARKS.md.
pub fn append(line: &str) {
    print!("{line}");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(repo_root().join("BENCHMARKS.md"))
        .expect("BENCHMARKS.md must exist at the repository root");
    file.write_all(line.as_bytes()).unwrap();
}

pub fn today() -> String {
    let out = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .unwrap()
        .stdout;
    String::from_utf8(out).unwrap().trim().to_string()
}
