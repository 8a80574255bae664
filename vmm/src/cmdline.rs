//! The QEMU command line for one VM, built from a typed description.

use crate::accel::Accel;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::PathBuf;

/// QOM id of the virtio-mem device; hotplug code addresses it by this id.
pub const VIRTIO_MEM_ID: &str = "vmem0";
/// Prefix of the ids given to hotplugged vCPUs (`cpu<core>`).
pub const HOTPLUG_CPU_ID_PREFIX: &str = "cpu";
/// Kernel command line for guests: serial console for the log, hotplugged memory onlined
/// as movable so it can be unplugged again, no reboot loop on panic, and no boot-time
/// check that the IO-APIC timer ticks: a guest starved of CPU by a busy host (seen under
/// TCG with 40 guests booting on 2 cores) fails it and panics.
pub const DEFAULT_KERNEL_CMDLINE: &str =
    "console=ttyS0 memhp_default_state=online_movable panic=-1 no_timer_check quiet";
/// The guest vsock device and the root port it sits on.
pub const VSOCK_DEVICE_ID: &str = "vsock0";
pub const VSOCK_ROOT_PORT: &str = "vsockport";
pub const VSOCK_CHARDEV_ID: &str = "vsock0";
/// Block node of the VM's disk; a migration mirrors it, and exports it, by this name.
pub const DISK_NODE: &str = "disk0";
/// Block node of an image's shared read-only root; every host has its own copy.
pub const ROOT_NODE: &str = "root0";
/// virtio-mem block size: the granularity of a memory resize.
pub const VIRTIO_MEM_BLOCK_BYTES: u64 = 2 << 20;

/// The guest NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Nic {
    None,
    /// An existing tap device, opened by name.
    Tap {
        ifname: String,
        mac: String,
    },
}

/// Everything QEMU needs to start one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    pub name: String,
    pub accel: Accel,
    /// vCPUs that are part of the machine and can never be unplugged.
    pub boot_vcpus: u32,
    /// vCPUs present at start: the ones above `boot_vcpus` are cold-plugged devices, so
    /// they can be unplugged later like hotplugged ones.
    pub initial_vcpus: u32,
    pub max_vcpus: u32,
    /// vCPU slots QEMU offers (`maxcpus`), at least `max_vcpus`. See [`vcpu_slots`].
    pub vcpu_slots: u32,
    /// Memory present at boot; never unplugged.
    pub boot_memory_bytes: u64,
    /// Size of the virtio-mem region that can be plugged on top; 0 means no device.
    pub hotplug_memory_bytes: u64,
    /// virtio-mem memory plugged at start.
    pub initial_hotplug_memory_bytes: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub kernel_cmdline: String,
    pub nic: Nic,
    /// A raw disk image, the guest's `/dev/vda`.
    pub disk: Option<PathBuf>,
    /// A raw root file system shared by every VM of an image, attached read-only: the
    /// guest tells it from its own disk by the device's read-only flag.
    pub root_image: Option<PathBuf>,
    /// Empty `pcie-root-port`s for devices plugged later (vsock, disks).
    pub spare_root_ports: u32,
    /// The vhost-user socket of the guest's vsock backend, if it has one at start.
    pub vhost_user_vsock: Option<PathBuf>,
    /// Wait for an incoming migration (`-incoming defer`) instead of booting.
    pub incoming: bool,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pub pidfile: PathBuf,
}

/// The most vCPU slots a q35 machine gets here (xAPIC ids stay below 255).
const MAX_VCPU_SLOTS: u32 = 255;
/// Under TCG, spare slots per vCPU; see [`vcpu_slots`].
const TCG_SLOTS_PER_VCPU: u32 = 16;

/// QEMU's `maxcpus` for a VM of `max_vcpus`.
///
/// Multi-threaded TCG gives every vCPU thread that ever starts its own translation context,
/// never returned on unplug, and aborts once `maxcpus` contexts are used. So under TCG the
/// machine gets spare slots: each one is one more vCPU plug over the QEMU process's life.
/// The guest sees them only as possible, never present, CPUs.
pub fn vcpu_slots(accel: Accel, max_vcpus: u32) -> u32 {
    match accel {
        Accel::Kvm => max_vcpus,
        Accel::Tcg => max_vcpus
            .saturating_mul(TCG_SLOTS_PER_VCPU)
            .clamp(max_vcpus, MAX_VCPU_SLOTS),
    }
}

/// How many vCPU plugs a fresh QEMU can still take: unlimited (`None`) under KVM.
pub fn vcpu_plug_budget(accel: Accel, slots: u32, initial_vcpus: u32) -> Option<u32> {
    match accel {
        Accel::Kvm => None,
        Accel::Tcg => Some(slots.saturating_sub(initial_vcpus)),
    }
}

impl MachineSpec {
    /// The arguments after `qemu-system-x86_64`. QEMU daemonizes: the VM must outlive vmhostd.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg,thread=multi", "qemu64"),
        };
        let mib = |bytes: u64| format!("{}M", bytes >> 20);
        let max_memory = self.boot_memory_bytes + self.hotplug_memory_bytes;

        push(&["-name", &format!("guest={},debug-threads=on", self.name)]);
        push(&["-machine", "q35,memory-backend=ram0"]);
        push(&["-accel", accel, "-cpu", cpu]);
        push(&[
            "-smp",
            &format!(
                "cpus={},sockets=1,cores={},threads=1,maxcpus={}",
                self.boot_vcpus, self.vcpu_slots, self.vcpu_slots
            ),
        ]);
        for core in self.boot_vcpus..self.initial_vcpus {
            push(&[
                "-device",
                &format!(
                    "{cpu}-x86_64-cpu,id={HOTPLUG_CPU_ID_PREFIX}{core},socket-id=0,core-id={core},thread-id=0"
                ),
            ]);
        }
        // Shared memfd backing: a vhost-user device needs to map guest memory.
        push(&[
            "-m",
            &format!(
                "size={},maxmem={}",
                mib(self.boot_memory_bytes),
                mib(max_memory)
            ),
        ]);
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=ram0,size={},share=on",
                mib(self.boot_memory_bytes)
            ),
        ]);
        if self.hotplug_memory_bytes > 0 {
            push(&[
                "-object",
                &format!(
                    "memory-backend-memfd,id=hotmem0,size={},share=on",
                    mib(self.hotplug_memory_bytes)
                ),
            ]);
            push(&[
                "-device",
                &format!(
                    "virtio-mem-pci,id={VIRTIO_MEM_ID},memdev=hotmem0,block-size={},requested-size={}",
                    mib(VIRTIO_MEM_BLOCK_BYTES),
                    mib(self.initial_hotplug_memory_bytes)
                ),
            ]);
        }
        for port in 0..self.spare_root_ports {
            push(&[
                "-device",
                &format!("pcie-root-port,id=hotplug{port},chassis={}", port + 1),
            ]);
        }
        // The vsock device sits on its own root port, so it can be unplugged before a
        // migration and plugged again after; the port exists even while it is empty, so
        // both ends of a migration have the same devices.
        push(&[
            "-device",
            &format!("pcie-root-port,id={VSOCK_ROOT_PORT},chassis=100"),
        ]);
        if let Some(socket) = &self.vhost_user_vsock {
            push(&[
                "-chardev",
                &format!("socket,id={VSOCK_CHARDEV_ID},path={}", socket.display()),
            ]);
            push(&[
                "-device",
                &format!("vhost-user-vsock-pci,id={VSOCK_DEVICE_ID},chardev={VSOCK_CHARDEV_ID},bus={VSOCK_ROOT_PORT}"),
            ]);
        }
        if let Some(disk) = &self.disk {
            // A comma in an option value is written twice.
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name={DISK_NODE}-file,filename={}",
                    disk.display().to_string().replace(',', ",,")
                ),
            ]);
            push(&[
                "-blockdev",
                &format!("driver=raw,node-name={DISK_NODE},file={DISK_NODE}-file"),
            ]);
            push(&[
                "-device",
                &format!("virtio-blk-pci,id=vda,drive={DISK_NODE}"),
            ]);
        }
        if let Some(root) = &self.root_image {
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name={ROOT_NODE}-file,filename={},read-only=on",
                    root.display().to_string().replace(',', ",,")
                ),
            ]);
            push(&[
                "-blockdev",
                &format!("driver=raw,node-name={ROOT_NODE},file={ROOT_NODE}-file,read-only=on"),
            ]);
            push(&[
                "-device",
                &format!("virtio-blk-pci,id=vdroot,drive={ROOT_NODE}"),
            ]);
        }
        if let Nic::Tap { ifname, mac } = &self.nic {
            push(&[
                "-netdev",
                &format!("tap,id=net0,ifname={ifname},script=no,downscript=no"),
            ]);
            push(&["-device", &format!("virtio-net-pci,netdev=net0,mac={mac}")]);
        }
        push(&["-nodefaults", "-no-reboot", "-display", "none"]);
        push(&["-sandbox", SANDBOX]);
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        push(&["-kernel"]);
        args.push(self.kernel.clone().into());
        if let Some(initrd) = &self.initrd {
            args.push("-initrd".into());
            args.push(initrd.clone().into());
        }
        args.push("-append".into());
        args.push(self.kernel_cmdline.clone().into());
        args.push("-serial".into());
        args.push(prefixed("file:", &self.serial_log));
        for socket in [self.qmp_socket.clone(), oob_socket(&self.qmp_socket)] {
            args.push("-qmp".into());
            let mut qmp = prefixed("unix:", &socket);
            qmp.push(",server=on,wait=off");
            args.push(qmp);
        }
        args.push("-daemonize".into());
        args.push("-pidfile".into());
        args.push(self.pidfile.clone().into());
        args
    }
}

/// QEMU's seccomp filter: the guest's QEMU may not run obsolete system calls or change
/// scheduling and resource limits. `elevateprivileges=deny` and `spawn=deny` would also
/// stop it gaining privileges and starting processes, but QEMU installs the filter before
/// `-daemonize` forks, and either makes it fail to start; they need vmhostd to detach QEMU
/// itself.
pub const SANDBOX: &str = "on,obsolete=deny,resourcecontrol=deny";

/// The second monitor, beside `qmp_socket`, for out-of-band commands: they run even while
/// QEMU's main loop is stuck, as it can be on a page still on the other host during a
/// post-copy migration.
pub fn oob_socket(qmp_socket: &std::path::Path) -> PathBuf {
    qmp_socket.with_extension("oob.sock")
}

fn prefixed(prefix: &str, path: &std::path::Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            name: "db1".into(),
            accel: Accel::Tcg,
            boot_vcpus: 1,
            initial_vcpus: 1,
            max_vcpus: 4,
            vcpu_slots: 4,
            boot_memory_bytes: 1 << 30,
            hotplug_memory_bytes: 3 << 30,
            initial_hotplug_memory_bytes: 0,
            kernel: "/img/vmlinuz".into(),
            initrd: Some("/img/initrd.img".into()),
            kernel_cmdline: "console=ttyS0".into(),
            nic: Nic::None,
            disk: None,
            root_image: None,
            spare_root_ports: 2,
            vhost_user_vsock: None,
            incoming: false,
            qmp_socket: "/state/db1/qmp.sock".into(),
            serial_log: "/state/db1/serial.log".into(),
            pidfile: "/state/db1/qemu.pid".into(),
        }
    }

    fn joined(spec: &MachineSpec) -> String {
        spec.to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_disk_is_a_named_raw_node_behind_virtio_blk() {
        assert!(!joined(&spec()).contains("virtio-blk"));
        let line = joined(&MachineSpec {
            disk: Some("/state/db,1/disk.raw".into()),
            ..spec()
        });
        assert!(
            line.contains(
                "-blockdev driver=file,node-name=disk0-file,filename=/state/db,,1/disk.raw"
            ),
            "{line}"
        );
        assert!(
            line.contains("-blockdev driver=raw,node-name=disk0,file=disk0-file"),
            "{line}"
        );
        assert!(
            line.contains("-device virtio-blk-pci,id=vda,drive=disk0"),
            "{line}"
        );
    }

    #[test]
    fn an_image_root_is_read_only_on_both_nodes() {
        let line = joined(&MachineSpec {
            root_image: Some("/images/pg/root.img".into()),
            ..spec()
        });
        assert!(
            line.contains("-blockdev driver=file,node-name=root0-file,filename=/images/pg/root.img,read-only=on"),
            "{line}"
        );
        assert!(
            line.contains("-blockdev driver=raw,node-name=root0,file=root0-file,read-only=on"),
            "{line}"
        );
        assert!(
            line.contains("-device virtio-blk-pci,id=vdroot,drive=root0"),
            "{line}"
        );
    }

    #[test]
    fn sizes_boot_and_hotplug_memory() {
        let line = joined(&spec());
        assert!(line.contains("-m size=1024M,maxmem=4096M"), "{line}");
        assert!(
            line.contains("memory-backend-memfd,id=ram0,size=1024M,share=on"),
            "{line}"
        );
        assert!(
            line.contains("memory-backend-memfd,id=hotmem0,size=3072M,share=on"),
            "{line}"
        );
        assert!(
            line.contains("virtio-mem-pci,id=vmem0,memdev=hotmem0,block-size=2M,requested-size=0M")
        );
    }

    #[test]
    fn starts_above_min_with_removable_vcpus_and_plugged_memory() {
        let line = joined(&MachineSpec {
            initial_vcpus: 3,
            initial_hotplug_memory_bytes: 1 << 30,
            ..spec()
        });
        assert!(line.contains("-smp cpus=1,"), "{line}");
        assert!(
            line.contains("-device qemu64-x86_64-cpu,id=cpu1,socket-id=0,core-id=1,thread-id=0")
        );
        assert!(
            line.contains("-device qemu64-x86_64-cpu,id=cpu2,socket-id=0,core-id=2,thread-id=0")
        );
        assert!(!line.contains("id=cpu3"));
        assert!(line.contains("requested-size=1024M"), "{line}");
    }

    #[test]
    fn vcpus_boot_at_min_and_plug_up_to_max() {
        let line = joined(&spec());
        assert!(
            line.contains("-smp cpus=1,sockets=1,cores=4,threads=1,maxcpus=4"),
            "{line}"
        );
    }

    #[test]
    fn tcg_gets_spare_vcpu_slots_kvm_does_not() {
        assert_eq!(vcpu_slots(Accel::Kvm, 4), 4);
        assert_eq!(vcpu_slots(Accel::Tcg, 2), 32);
        assert_eq!(vcpu_slots(Accel::Tcg, 200), 255);
        assert_eq!(vcpu_slots(Accel::Tcg, 255), 255);
        assert_eq!(vcpu_plug_budget(Accel::Tcg, 32, 2), Some(30));
        assert_eq!(vcpu_plug_budget(Accel::Kvm, 4, 1), None);
    }

    #[test]
    fn no_virtio_mem_when_min_equals_max() {
        let line = joined(&MachineSpec {
            hotplug_memory_bytes: 0,
            ..spec()
        });
        assert!(!line.contains("virtio-mem"), "{line}");
        assert!(line.contains("maxmem=1024M"), "{line}");
    }

    #[test]
    fn accel_selects_cpu_model() {
        assert!(joined(&spec()).contains("-accel tcg,thread=multi -cpu qemu64"));
        let kvm = MachineSpec {
            accel: Accel::Kvm,
            ..spec()
        };
        assert!(joined(&kvm).contains("-accel kvm -cpu host"));
    }

    #[test]
    fn root_ports_nic_and_runtime_files() {
        let line = joined(&MachineSpec {
            nic: Nic::Tap {
                ifname: "vmh-db1".into(),
                mac: "52:54:00:12:34:56".into(),
            },
            ..spec()
        });
        assert!(line.contains("pcie-root-port,id=hotplug0,chassis=1"));
        assert!(line.contains("pcie-root-port,id=hotplug1,chassis=2"));
        assert!(line.contains("-netdev tap,id=net0,ifname=vmh-db1,script=no,downscript=no"));
        assert!(line.contains("virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"));
        assert!(line.contains("-nodefaults -no-reboot"));
        assert!(line.contains(&format!("-sandbox {SANDBOX}")), "{line}");
        assert!(line.contains("-serial file:/state/db1/serial.log"));
        assert!(line.contains("-qmp unix:/state/db1/qmp.sock,server=on,wait=off"));
        assert!(line.contains("-qmp unix:/state/db1/qmp.oob.sock,server=on,wait=off"));
        assert!(line.contains("-daemonize -pidfile /state/db1/qemu.pid"));
        assert!(!joined(&spec()).contains("-netdev"));
        assert!(!joined(&spec()).contains("vhost-user-vsock"));
        assert!(!joined(&spec()).contains("-incoming"));
    }

    #[test]
    fn an_incoming_vm_waits_and_keeps_an_empty_vsock_port() {
        let line = joined(&MachineSpec {
            incoming: true,
            ..spec()
        });
        assert!(line.contains("-incoming defer"));
        assert!(line.contains("pcie-root-port,id=vsockport,chassis=100"));
        assert!(!line.contains("vhost-user-vsock"));
    }

    #[test]
    fn vhost_user_vsock_sits_on_its_own_root_port() {
        let line = joined(&MachineSpec {
            vhost_user_vsock: Some("/state/db1/vhost-vsock.sock".into()),
            ..spec()
        });
        assert!(
            line.contains("-chardev socket,id=vsock0,path=/state/db1/vhost-vsock.sock"),
            "{line}"
        );
        assert!(line.contains("pcie-root-port,id=vsockport,chassis=100"));
        assert!(line.contains("vhost-user-vsock-pci,id=vsock0,chardev=vsock0,bus=vsockport"));
    }
}
