//! The Debian package, installed with `dpkg -i` into a clean Debian 12 root
//! (images/build-host-root) that has only the dependencies the package declares: its files
//! land where Debian keeps them, the binaries run there, installing it enables and starts
//! nothing, a purge leaves the VMs' state alone, and lintian finds no error in it.
//!
//! Needs root (chroot), mmdebstrap, lintian and cargo-deb; fails, never skips, without them.

use std::path::Path;
use std::process::Command;
use vmhost_tests::package::{build_package, host_root, run};

/// Records what a maintainer script asks deb-systemd-invoke to start or stop, and refuses it.
const POLICY_RC_D: &str = "#!/bin/sh\necho \"$*\" >> /policy-rc.d.log\nexit 101\n";

#[test]
fn installs_into_a_clean_root_enables_nothing_and_purges_without_touching_vm_state() {
    require_tools(&["mmdebstrap", "lintian", "cargo-deb", "systemctl"]);
    assert!(
        nix::unistd::geteuid().is_root(),
        "THE PACKAGE TEST NEEDS ROOT (chroot)"
    );
    let deb = build_package();
    // Alongside the rest: it takes as long.
    let lintian = std::thread::spawn({
        let deb = deb.clone();
        move || {
            run(Command::new("lintian")
                .args(["--fail-on", "error"])
                .arg(deb))
        }
    });

    let dir = host_root("vmhost-package-");
    let root = &dir.path().join("root");
    // As on a host that runs systemd, so the maintainer scripts take their systemd branch;
    // policy-rc.d logs every start or stop they ask for.
    std::fs::create_dir_all(root.join("run/systemd/system")).unwrap();
    write_executable(&root.join("usr/sbin/policy-rc.d"), POLICY_RC_D);
    std::fs::copy(&deb, root.join("tmp/vmhost.deb")).unwrap();

    chroot(root, &["dpkg", "-i", "/tmp/vmhost.deb"]);
    for file in [
        "usr/bin/vmhostd",
        "usr/bin/vmctl",
        "usr/libexec/vmhost/vhost-device-vsock",
        "lib/systemd/system/vmhostd.service",
        "etc/vmhost/vmhostd.toml",
        "usr/share/man/man1/vmctl.1.gz",
        "usr/share/man/man1/vmctl-create.1.gz",
        "usr/share/man/man8/vmhostd.8.gz",
        "usr/share/bash-completion/completions/vmctl",
        "usr/share/zsh/vendor-completions/_vmctl",
        "usr/share/fish/vendor_completions.d/vmctl.fish",
        "usr/share/doc/vmhost/README.md",
        "usr/share/doc/vmhost/copyright",
    ] {
        assert!(root.join(file).is_file(), "/{file} is missing");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        chroot(root, &["vmctl", "--version"]).trim(),
        format!("vmctl {version}")
    );
    assert_eq!(
        chroot(root, &["vmhostd", "--version"]).trim(),
        format!("vmhostd {version}")
    );
    chroot(
        root,
        &["/usr/libexec/vmhost/vhost-device-vsock", "--version"],
    );
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/vmhostd.service")).unwrap();
    assert!(unit.contains("\nExecStart=/usr/bin/vmhostd "), "{unit}");
    let conffiles = chroot(root, &["dpkg-query", "-W", "-f=${Conffiles}", "vmhost"]);
    assert!(
        conffiles.contains("/etc/vmhost/vmhostd.toml"),
        "{conffiles}"
    );

    let enabled = Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args(["is-enabled", "vmhostd.service"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&enabled.stdout).trim(), "disabled");
    let log = root.join("policy-rc.d.log");
    assert!(
        !log.exists(),
        "installing started something: {}",
        std::fs::read_to_string(&log).unwrap()
    );

    // The state directory is the VMs', not the package's: a purge keeps it.
    let spec = root.join("var/lib/vmhost/vms/db1/spec.json");
    std::fs::create_dir_all(spec.parent().unwrap()).unwrap();
    std::fs::write(&spec, "{}").unwrap();
    chroot(root, &["dpkg", "--purge", "vmhost"]);
    assert!(spec.is_file(), "the purge removed a VM's state");
    assert!(!root.join("usr/bin/vmhostd").exists());
    assert!(!root.join("etc/vmhost/vmhostd.toml").exists());
    // Removing the package stops vmhostd (its VMs keep running), and does nothing else.
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "vmhostd.service stop\n"
    );
    let lintian = lintian
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    eprintln!("lintian:\n{lintian}");
}

/// Runs the command in the root, as `dpkg` and the binaries would run on a host.
fn chroot(root: &Path, args: &[&str]) -> String {
    run(Command::new("chroot")
        .arg(root)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn require_tools(tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "THE PACKAGE TEST CANNOT RUN ON THIS MACHINE; missing: {} (scripts/setup installs them)",
        missing.join(", ")
    );
}
