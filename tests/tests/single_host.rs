//! One host, real QEMU guests under the accelerator `auto` picks, driven through vmctl.

use std::time::Duration;
use vmhost_tests::capacity::{held_by, Held};
use vmhost_tests::cgroups::limits_of;
use vmhost_tests::procs::{inheritable_file, open_files};
use vmhost_tests::{process_alive, wait_until, GuestView, HostOptions, Limits, TestHost};

const GIB: u64 = 1 << 30;
const GIB_KB: u64 = 1 << 20;

fn roomy() -> Limits {
    Limits {
        vcpus: 4,
        memory_mib: 8192,
    }
}

#[test]
fn scales_vcpus_and_memory_and_the_guest_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_held, inherited) = inheritable_file(dir.path());
    let host = TestHost::start(roomy());
    let created = host.vmctl_ok(&["--json", "create", "db1", "--min-cu", "1", "--max-cu", "2"]);
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let host_info: serde_json::Value =
        serde_json::from_str(&host.vmctl_ok(&["--json", "host"])).unwrap();
    eprintln!(
        "accelerator: {} ({})",
        host_info["accel"], host_info["accel_reason"]
    );
    assert_eq!(created["accel"], host_info["accel"]);
    assert_eq!(created["state"], "running");
    assert_eq!(created["vcpus"], 1);
    assert_eq!(created["memory_bytes"], GIB);

    host.wait_guest_ready("db1");
    let boot = host.wait_guest_report("db1");
    assert_eq!(boot.cpus, 1);
    // QEMU runs under its seccomp filter (mode 2), every thread of it.
    let pid = host.qemu_pids()[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    // vmhostd inherited a descriptor; the VM's processes, which outlive it, do not.
    let daemon = host.daemon_pid().unwrap() as i32;
    assert!(open_files(daemon).contains(&inherited));
    let pids = host.live_pids("db1");
    for pid in [pids.qemu(), pids.backend()] {
        let files = open_files(pid);
        assert!(!files.contains(&inherited), "{pid} holds {files:?}");
    }

    host.vmctl_ok(&["scale", "db1", "--cu", "2"]);
    let shown = host.show("db1");
    for (field, value) in [
        ("cu", serde_json::json!(2.0)),
        ("vcpus", 2.into()),
        ("memory_bytes", (2 * GIB).into()),
        ("min_cu", serde_json::json!(1.0)),
        ("max_cu", serde_json::json!(2.0)),
        ("name", "db1".into()),
        ("state", "running".into()),
    ] {
        assert_eq!(shown[field], value, "show --json field {field}: {shown}");
    }
    assert!(shown["accel"].is_string());
    assert_eq!(shown["qemu_status"], "running");
    host.wait_guest_view("db1", boot.at_cu(2));

    host.wait_monitor("db1");
    host.vmctl_ok(&["scale", "db1", "--cu", "1"]);
    assert_eq!(host.show("db1")["vcpus"], 1);
    host.wait_guest_view("db1", boot);

    // A fractional step: 1.5 CU rounds vCPUs up and plugs half a GiB.
    host.vmctl_ok(&["scale", "db1", "--cu", "1.5"]);
    host.wait_guest_view(
        "db1",
        GuestView {
            cpus: 2,
            mem_total_kb: boot.mem_total_kb + GIB_KB / 2,
        },
    );

    // Stop ends QEMU and its backend and frees the host; start brings the VM back at its
    // last size.
    let running = host.live_pids("db1");
    host.vmctl_ok(&["stop", "db1"]);
    running.assert_gone();
    let allocated: serde_json::Value =
        serde_json::from_str(&host.vmctl_ok(&["--json", "host"])).unwrap();
    assert_eq!(allocated["allocated"]["vcpus"], 0);
    host.vmctl_ok(&["start", "db1"]);
    host.wait_guest_ready("db1");
    host.wait_guest_view_within(
        "db1",
        GuestView {
            cpus: 2,
            mem_total_kb: boot.mem_total_kb + GIB_KB / 2,
        },
        1024,
    );
    let running = host.live_pids("db1");
    host.vmctl_ok(&["delete", "db1"]);
    running.assert_gone();
    assert!(!host.state_dir().join("vms/db1").exists());

    // A scale asked for the moment `create` returns, while the guest still boots, waits
    // until the guest can take the vCPU, and the guest then sees its new size.
    host.vmctl_ok(&["create", "db2", "--min-cu", "1", "--max-cu", "2"]);
    host.vmctl_ok(&["scale", "db2", "--cu", "2"]);
    assert_eq!(host.show("db2")["vcpus"], 2);
    host.wait_guest_view_within("db2", boot.at_cu(2), 64 * 1024);
}

#[test]
fn vms_survive_a_sigkilled_vmhostd() {
    let mut host = TestHost::start(roomy());
    host.vmctl_ok(&["create", "db1", "--min-cu", "1", "--max-cu", "2"]);
    let boot_id = host.wait_guest_ready("db1");
    let boot = host.wait_guest_report("db1");
    let pid = host.show("db1")["pid"].as_i64().unwrap() as i32;

    host.kill_daemon();
    assert!(process_alive(pid), "QEMU died with vmhostd");
    assert!(
        !host.vmctl(&["list"]).status.success(),
        "vmctl reached a dead daemon"
    );

    host.start_daemon();
    let shown = host.show("db1");
    assert_eq!(shown["state"], "running");
    assert_eq!(shown["pid"], pid);
    let listed = host.vmctl_ok(&["list"]);
    assert!(
        listed.contains("db1") && listed.contains("running"),
        "{listed}"
    );

    host.vmctl_ok(&["scale", "db1", "--cu", "2"]);
    host.wait_guest_view("db1", boot.at_cu(2));
    // Same guest, never rebooted.
    assert_eq!(host.wait_guest_ready("db1"), boot_id);
    let log = std::fs::read_to_string(host.serial_log("db1")).unwrap();
    assert_eq!(log.matches("vmhost-guest: ready").count(), 1);
}

/// Asserts one line on stderr naming the problem, and the given exit code.
fn assert_one_line_error(result: (i32, String), code: i32, needle: &str) {
    let (exit, stderr) = result;
    assert_eq!(exit, code, "exit code for {stderr:?}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr:?}"
    );
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
}

#[test]
fn bad_input_gets_one_clear_error_and_leaves_nothing_half_made() {
    let host = TestHost::start(Limits {
        vcpus: 2,
        memory_mib: 2048,
    });
    let refusals: [(&[&str], i32, &str); 11] = [
        (&["show", "nope"], 3, "no VM named 'nope'"),
        (&["scale", "nope", "--cu", "1"], 3, "no VM named 'nope'"),
        (&["delete", "nope"], 3, "no VM named 'nope'"),
        (
            &["create", "x", "--min-cu", "2", "--max-cu", "1"],
            2,
            "min_cu (2) is greater than max_cu (1)",
        ),
        (&["create", "x", "--min-cu", "0.3"], 2, "multiple of 0.25"),
        (
            &["create", "x", "--disk-gib", "0"],
            2,
            "0 is not in 1..=16384",
        ),
        (&["create", "Bad/Name"], 2, "invalid VM name"),
        (
            &["create", "x", "--image", "postgres"],
            2,
            "image 'postgres' is not configured",
        ),
        (
            &["create", "x", "--min-cu", "3"],
            5,
            "host capacity exceeded",
        ),
        (&["frobnicate"], 2, "unrecognized subcommand"),
        (
            &["migrate", "x", "--resume", "--to", "b"],
            2,
            "cannot be used with",
        ),
    ];
    for (args, code, needle) in refusals {
        assert_one_line_error(host.vmctl_err(args), code, needle);
    }

    // Nothing half-made by the refusals.
    assert!(
        host.vmctl_ok(&["list"]).lines().count() == 1,
        "list not empty"
    );
    let vms_dir = host.state_dir().join("vms");
    assert_eq!(std::fs::read_dir(&vms_dir).unwrap().count(), 0);
    assert!(host.qemu_pids().is_empty());

    // Scale past capacity and outside bounds are refused; the VM keeps its size.
    host.vmctl_ok(&["create", "a", "--min-cu", "1", "--max-cu", "4"]);
    host.vmctl_ok(&["create", "b", "--min-cu", "1"]);
    let refusals: [(&[&str], i32, &str); 3] = [
        (&["scale", "a", "--cu", "2"], 5, "host capacity exceeded"),
        (&["scale", "a", "--cu", "5"], 2, "outside VM 'a' bounds"),
        (&["create", "a"], 4, "already exists"),
    ];
    for (args, code, needle) in refusals {
        assert_one_line_error(host.vmctl_err(args), code, needle);
    }
    assert_eq!(host.show("a")["cu"], serde_json::json!(1.0));
    let one_cu = Held {
        vcpus: 1,
        memory_bytes: GIB,
    };
    assert_eq!(held_by(&host, "a"), one_cu, "QEMU's size changed");

    // A second vmhostd on the same state dir is refused, and the first keeps serving.
    let second = std::process::Command::new(vmhost_tests::bin("vmhostd"))
        .arg("--config")
        .arg(&host.config)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("another vmhostd already uses state directory"),
        "{stderr}"
    );
    assert_eq!(host.show("a")["state"], "running");

    // A malformed config is one clear line and a non-zero exit.
    let bad = host.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "state_dir = \"/tmp/x\"\n[capacity]\nvcpus = \"many\"\nmemory_mib = 1\n",
    )
    .unwrap();
    let output = std::process::Command::new(vmhost_tests::bin("vmhostd"))
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid config") && stderr.contains("bad.toml"),
        "{stderr}"
    );
}

#[test]
fn a_user_outside_the_api_group_is_refused_even_when_the_socket_is_open_to_all() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let host = TestHost::start(roomy());
    // Everyone may reach and connect to the socket; the daemon still asks the kernel who
    // connected.
    let open = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(host.socket.parent().unwrap(), 0o711);
    open(&host.socket, 0o666);
    let nobody = std::process::Command::new(vmhost_tests::bin("vmctl"))
        .arg("--socket")
        .arg(&host.socket)
        .arg("list")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert_eq!(nobody.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("uid 65534") && stderr.contains("may not use this socket"),
        "{stderr}"
    );
    host.vmctl_ok(&["list"]);
}

#[test]
fn each_vm_runs_in_a_cgroup_whose_limits_follow_its_size() {
    const OVERHEAD: u64 = 300 << 20;
    let mut options = HostOptions::new(roomy());
    options.extra_config = "[cgroups]\nqemu_overhead_mib = 300\n".into();
    let mut host = TestHost::start_with(options);
    host.vmctl_ok(&[
        "create",
        "db1",
        "--min-cu",
        "1",
        "--max-cu",
        "3",
        "--no-autoscale",
    ]);
    host.wait_guest_ready("db1");
    let boot = host.wait_guest_report("db1");
    let running = host.live_pids("db1");
    let (qemu, backend) = (running.qemu(), running.backend());
    let limits = limits_of(qemu);
    assert!(
        limits
            .memory_cgroup
            .ends_with(&format!("/vmhost-{}/db1", host.name)),
        "QEMU is in {limits:?}"
    );
    assert_eq!(
        limits_of(backend),
        limits,
        "the vsock backend shares QEMU's cgroup"
    );
    assert_eq!(limits.memory_bytes, GIB + OVERHEAD);
    assert_eq!(limits.cpu_quota_us, 100_000);

    host.vmctl_ok(&["scale", "db1", "--cu", "3"]);
    host.wait_guest_view("db1", boot.at_cu(3));
    let grown = limits_of(qemu);
    assert_eq!(grown.memory_bytes, 3 * GIB + OVERHEAD);
    assert_eq!(grown.cpu_quota_us, 300_000);

    host.wait_monitor("db1");
    host.vmctl_ok(&["scale", "db1", "--cu", "2"]);
    host.wait_guest_view("db1", boot.at_cu(2));
    assert_eq!(limits_of(qemu).memory_bytes, 2 * GIB + OVERHEAD);
    assert_eq!(limits_of(qemu).cpu_quota_us, 200_000);

    // The cgroup is the kernel's: it outlives vmhostd, which finds it again.
    host.kill_daemon();
    host.start_daemon();
    assert_eq!(host.show("db1")["pid"], qemu);
    assert_eq!(limits_of(qemu).memory_bytes, 2 * GIB + OVERHEAD);
    assert_eq!(limits_of(backend), limits_of(qemu));

    let memory_cgroup = limits_of(qemu).memory_cgroup;
    host.vmctl_ok(&["delete", "db1"]);
    running.assert_gone();
    wait_until(Duration::from_secs(10), "the VM's cgroup to go", || {
        !std::path::Path::new("/sys/fs/cgroup/memory")
            .join(memory_cgroup.trim_start_matches('/'))
            .exists()
            && !std::path::Path::new("/sys/fs/cgroup")
                .join(memory_cgroup.trim_start_matches('/'))
                .exists()
    });
}
