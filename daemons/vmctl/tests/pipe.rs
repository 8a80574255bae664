//! vmctl in a pipe whose reader stops early (`vmctl list | head -1`) ends quietly, as `ls`
//! does, instead of panicking on the broken pipe; output it cannot write at all is a one-line
//! error, not a panic.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use vmhost_api::{ComputeUnits, Reply, Response, VmInfo, VmState};

/// Far more output than a pipe buffers (64 KiB), so vmctl is still writing when the reader
/// goes away.
const VMS: usize = 20_000;

fn vm(i: usize) -> VmInfo {
    VmInfo {
        name: format!("db{i}"),
        state: VmState::Running,
        cu: ComputeUnits::whole(1),
        min_cu: ComputeUnits::whole(1),
        max_cu: ComputeUnits::whole(4),
        vcpus: 1,
        memory_bytes: 4 << 30,
        accel: "tcg".into(),
        image: "test".into(),
        host: "host-a".into(),
        autoscale: true,
        disk_gib: None,
        goal_cu: None,
        pid: Some(1000 + i as i32),
        serial_log: format!("/var/lib/vmhost/vms/db{i}/serial.log"),
        guest: None,
        qemu_status: None,
        compute: None,
    }
}

/// A vmhostd stand-in: answers one request line with `reply`, as one JSON line.
fn serve_once(socket: &Path, reply: Reply) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut request = String::new();
        BufReader::new(&stream).read_line(&mut request).unwrap();
        assert!(request.ends_with('\n'), "{request:?}");
        let mut line = serde_json::to_vec(&Response::Ok(reply)).unwrap();
        line.push(b'\n');
        // vmctl may already be gone by the time this is written; that is fine.
        let _ = (&stream).write_all(&line);
    })
}

/// Runs vmctl with `args` against a stand-in answering `reply`, reads one line of its
/// output and closes the pipe; returns how it ended and what it said on stderr.
fn run_into_short_pipe(args: &[&str], reply: Reply) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhostd.sock");
    let server = serve_once(&socket, reply);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .args(args)
        .env("VMHOST_SOCKET", &socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(!first.is_empty(), "vmctl printed nothing");
    drop(stdout);
    let output = child.wait_with_output().unwrap();
    server.join().unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

fn assert_quiet_end(status: std::process::ExitStatus, stderr: &str) {
    assert!(!stderr.contains("panicked"), "vmctl panicked: {stderr}");
    assert!(stderr.is_empty(), "vmctl complained: {stderr}");
    // Like `ls | head`: killed by SIGPIPE (the shell's 141), or a clean exit.
    assert!(
        status.signal() == Some(13) || status.code() == Some(141) || status.success(),
        "{status:?}"
    );
}

#[test]
fn list_into_a_pipe_closed_after_one_line_ends_quietly() {
    let vms = (0..VMS).map(vm).collect();
    let (status, stderr) = run_into_short_pipe(&["list", "--local"], Reply::Vms(vms));
    assert_quiet_end(status, &stderr);
}

#[test]
fn show_json_into_a_pipe_closed_after_one_line_ends_quietly() {
    // `vmctl show x | head -3`, with a reply too big for the pipe.
    let mut big = vm(1);
    big.serial_log = "x".repeat(1 << 20);
    let (status, stderr) =
        run_into_short_pipe(&["show", "db1", "--json"], Reply::Vm(Box::new(big)));
    assert_quiet_end(status, &stderr);
}

#[test]
fn a_reader_that_reads_everything_gets_everything() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhostd.sock");
    let server = serve_once(&socket, Reply::Vms((0..VMS).map(vm).collect()));
    let output = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .args(["list", "--local"])
        .env("VMHOST_SOCKET", &socket)
        .output()
        .unwrap();
    server.join().unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), VMS + 1);
    assert!(stdout
        .lines()
        .last()
        .unwrap()
        .starts_with(&format!("db{}", VMS - 1)));
}

#[test]
fn output_that_cannot_be_written_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhostd.sock");
    let server = serve_once(&socket, Reply::Vms((0..10).map(vm).collect()));
    // Writes to /dev/full fail with ENOSPC.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .args(["list", "--local"])
        .env("VMHOST_SOCKET", &socket)
        .stdout(full)
        .output()
        .unwrap();
    server.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "vmctl panicked: {stderr}");
    assert!(stderr.starts_with("vmctl: cannot write output"), "{stderr}");
    assert_eq!(output.status.code(), Some(1));
}
