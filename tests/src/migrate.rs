//! `vmctl migrate` run as a child: its JSON progress lines, and its end.

use crate::{bin, TestHost};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Starts `vmctl --json migrate ARGS` on `host`.
pub fn spawn_migrate(host: &TestHost, args: &[&str]) -> Child {
    Command::new(bin("vmctl"))
        .arg("--socket")
        .arg(&host.socket)
        .args(["--json", "migrate"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads the migration's JSON lines until one satisfies `seen`.
pub fn wait_progress(lines: &mut Lines, what: &str, mut seen: impl FnMut(&Value) -> bool) {
    for line in lines {
        let value: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if seen(&value) {
            return;
        }
    }
    panic!("the migration ended before {what}");
}

pub fn progress_lines(child: &mut Child) -> Lines {
    BufReader::new(child.stdout.take().unwrap()).lines()
}

/// Waits for the migration to end: whether it succeeded, the rest of its stdout (the
/// summary last), and its stderr.
pub fn finish(child: Child, rest: Lines) -> (bool, String, String) {
    let stdout: Vec<String> = rest.map_while(Result::ok).collect();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        stdout.join("\n"),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `finish`, failing if the migration lasts past `deadline` from now.
pub fn finish_within(child: Child, rest: Lines, deadline: Duration) -> (bool, String, String) {
    let pid = child.id() as i32;
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(finish(child, rest)));
    result.recv_timeout(deadline).unwrap_or_else(|_| {
        crate::procs::kill(pid);
        panic!("the migration did not finish within {deadline:?}")
    })
}
