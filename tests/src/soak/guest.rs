//! What the guests say on their serial consoles, followed on every host: the dirtier's
//! counter must only go forward within a boot, with no lost write, and two copies of one
//! boot must never both run (their counters would overlap); a new boot must have a cause the
//! soak made. The disk writer's records must all be on the disk of the host that runs it.

use super::fleet::Fleet;
use crate::workload::{
    file_id, parse_disk_line, parse_tick, DiskLine, FileId, LogTail, BLOB_BYTES,
};
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Instant;

/// A serial log as read so far, and the boot its latest lines came from.
struct Cursor {
    log: LogTail,
    boot: Option<String>,
}

/// Ticks of one boot read from one file.
struct Segment {
    host: usize,
    file: FileId,
    boot: String,
    first: u64,
    last: u64,
}

#[derive(Default)]
struct Guest {
    boots: Vec<String>,
    reboots_allowed: u32,
    segments: Vec<Segment>,
    records: HashMap<String, BTreeSet<u64>>,
    blob_md5: HashMap<String, String>,
    last_tick: Option<Instant>,
}

/// A byte range of one host's serial logs written while its filesystem was full: a line
/// there may be spliced from two, so it is not read.
struct Taint {
    host: usize,
    from: HashMap<FileId, u64>,
    to: Option<HashMap<FileId, u64>>,
}

#[derive(Default)]
pub struct GuestWatch {
    cursors: HashMap<(usize, String), Cursor>,
    guests: HashMap<String, Guest>,
    taints: Vec<Taint>,
}

fn serial_sizes(fleet: &Fleet, host: usize) -> HashMap<FileId, u64> {
    let dir = fleet.hosts[host].state_dir().join("vms");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let meta = std::fs::metadata(e.ok()?.path().join("serial.log")).ok()?;
            Some((file_id(&meta), meta.len()))
        })
        .collect()
}

impl GuestWatch {
    /// The soak is about to make `vm` boot again (start, cold move).
    pub fn allow_reboot(&mut self, vm: &str) {
        self.guests.entry(vm.into()).or_default().reboots_allowed += 1;
    }

    pub fn forget(&mut self, vm: &str) {
        self.guests.remove(vm);
        self.cursors.retain(|(_, name), _| name != vm);
    }

    pub fn last_tick(&self, vm: &str) -> Option<Instant> {
        self.guests.get(vm)?.last_tick
    }

    pub fn fs_full(&mut self, fleet: &Fleet, host: usize) {
        self.taints.push(Taint {
            host,
            from: serial_sizes(fleet, host),
            to: None,
        });
    }

    pub fn fs_freed(&mut self, fleet: &Fleet, host: usize) {
        let sizes = serial_sizes(fleet, host);
        if let Some(taint) = self
            .taints
            .iter_mut()
            .rev()
            .find(|t| t.host == host && t.to.is_none())
        {
            taint.to = Some(sizes);
        }
    }

    fn tainted(&self, host: usize, file: FileId, start: u64, end: u64) -> bool {
        self.taints.iter().filter(|t| t.host == host).any(|t| {
            // A file born after the space came back has nothing spliced.
            let to = match &t.to {
                None => u64::MAX,
                Some(to) => match to.get(&file) {
                    Some(len) => *len,
                    None => return false,
                },
            };
            let from = t.from.get(&file).copied().unwrap_or(0);
            end > from && start <= to
        })
    }

    /// Reads what every guest wrote since the last call; fails on a broken rule.
    pub fn read(&mut self, fleet: &Fleet) -> Result<(), String> {
        for host in 0..fleet.hosts.len() {
            let dir = fleet.hosts[host].state_dir().join("vms");
            let names: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok()?.file_name().to_str().map(String::from))
                .collect();
            for vm in names {
                self.read_one(fleet, host, &vm)?;
            }
        }
        Ok(())
    }

    fn read_one(&mut self, fleet: &Fleet, host: usize, vm: &str) -> Result<(), String> {
        let path = fleet.vm_dir(host, vm).join("serial.log");
        let cursor = self
            .cursors
            .entry((host, vm.to_string()))
            .or_insert_with(|| Cursor {
                log: LogTail::new(path),
                boot: None,
            });
        let Some(read) = cursor.log.read() else {
            return Ok(());
        };
        if read.restarted {
            cursor.boot = None;
        }
        for line in read.lines {
            if !self.tainted(host, read.file, line.start, line.end) {
                self.line(host, vm, read.file, &line.text)?;
            }
        }
        Ok(())
    }

    fn line(&mut self, host: usize, vm: &str, file: FileId, line: &str) -> Result<(), String> {
        let key = (host, vm.to_string());
        if let Some(tick) = parse_tick(line) {
            self.cursors.get_mut(&key).unwrap().boot = Some(tick.boot_id.clone());
            return self.tick(host, vm, file, &tick.boot_id, tick.pass, tick.errors);
        }
        let Some(disk) = parse_disk_line(line) else {
            return Ok(());
        };
        let guest = self.guests.entry(vm.into()).or_default();
        let cursor = self.cursors.get_mut(&key).unwrap();
        match disk {
            DiskLine::Ready(boot) => {
                cursor.boot = Some(boot);
                return Ok(());
            }
            DiskLine::Blob(sum, boot) => {
                let boot = boot.or(cursor.boot.clone()).or(guest.boots.last().cloned());
                guest.blob_md5.insert(boot.unwrap_or_default(), sum);
            }
            DiskLine::Record(n, boot) => {
                // The line names its boot; a serial log read from the middle may not have.
                let boot = boot.or(cursor.boot.clone()).or(guest.boots.last().cloned());
                guest
                    .records
                    .entry(boot.unwrap_or_default())
                    .or_default()
                    .insert(n);
            }
        }
        Ok(())
    }

    fn tick(
        &mut self,
        host: usize,
        vm: &str,
        file: FileId,
        boot: &str,
        pass: u64,
        errors: u64,
    ) -> Result<(), String> {
        let guest = self.guests.entry(vm.into()).or_default();
        guest.last_tick = Some(Instant::now());
        if errors != 0 {
            return Err(format!(
                "dirtier of {vm} on host {host} reports {errors} pages that lost their last write (boot {boot}, pass {pass})"
            ));
        }
        if !guest.boots.iter().any(|b| b == boot) {
            if !guest.boots.is_empty() {
                if guest.reboots_allowed == 0 {
                    return Err(format!(
                        "{vm} booted again (boot {boot} after {:?}) with no stop/start, QEMU kill, reboot or cold move of the soak's to explain it",
                        guest.boots
                    ));
                }
                guest.reboots_allowed -= 1;
            }
            guest.boots.push(boot.to_string());
        }
        match guest
            .segments
            .iter_mut()
            .find(|s| s.host == host && s.file == file && s.boot == boot)
        {
            Some(segment) if pass <= segment.last => {
                return Err(format!(
                    "dirtier of {vm} went back on host {host}: pass {pass} after {} (boot {boot})",
                    segment.last
                ))
            }
            Some(segment) => segment.last = pass,
            None => guest.segments.push(Segment {
                host,
                file,
                boot: boot.to_string(),
                first: pass,
                last: pass,
            }),
        }
        let mine = guest
            .segments
            .iter()
            .find(|s| s.host == host && s.file == file && s.boot == boot)
            .unwrap();
        if let Some(other) = guest.segments.iter().find(|s| {
            s.boot == boot
                && (s.host, s.file) != (host, file)
                && s.first <= mine.last
                && mine.first <= s.last
        }) {
            return Err(format!(
                "two copies of {vm} ran the same boot {boot}: passes {}..={} on host {} and {}..={} on host {host}",
                other.first, other.last, other.host, mine.first, mine.last
            ));
        }
        Ok(())
    }

    /// Every record `vm` reported is on `disk`, written by its boot or a later one (a new
    /// boot writes its records from the start again; one not seen yet is later).
    pub fn check_disk(&self, vm: &str, disk: &Path, with_blob: bool) -> Result<usize, String> {
        let Some(guest) = self.guests.get(vm) else {
            return Ok(0);
        };
        let Ok(mut image) = std::fs::File::open(disk) else {
            return Ok(0);
        };
        let mut checked = 0;
        for (k, boot) in guest.boots.iter().enumerate() {
            for record in guest.records.get(boot).into_iter().flatten() {
                let mut sector = [0u8; 512];
                image
                    .seek(SeekFrom::Start(BLOB_BYTES + record * 512))
                    .and_then(|_| image.read_exact(&mut sector))
                    .map_err(|e| format!("reading {}: {e}", disk.display()))?;
                let text = String::from_utf8_lossy(&sector);
                let holder = text
                    .strip_prefix(&format!("record {record:08} "))
                    .and_then(|rest| rest.split('\n').next());
                // A boot not seen yet is newer than every boot seen: it wrote since the
                // last read of the logs.
                let newer = |b: &str| {
                    guest.boots[k..].iter().any(|later| later == b)
                        || !guest.boots.iter().any(|seen| seen == b)
                };
                if !holder.is_some_and(newer) {
                    return Err(format!(
                        "record {record} that {vm} reported written in boot {boot} is not on {}: {:?}",
                        disk.display(),
                        text.split('\n').next().unwrap_or_default()
                    ));
                }
                checked += 1;
            }
        }
        let blob = guest.boots.last().and_then(|b| guest.blob_md5.get(b));
        if let Some(sum) = blob.filter(|_| with_blob) {
            let on_disk = crate::workload::md5_of_head(disk, BLOB_BYTES);
            if &on_disk != sum {
                return Err(format!(
                    "the first 16 MiB of {} have md5 {on_disk}, the guest wrote {sum}",
                    disk.display()
                ));
            }
        }
        Ok(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE_A: FileId = (1, 1);
    const FILE_B: FileId = (2, 2);

    #[test]
    fn a_counter_that_goes_on_across_a_move_is_fine() {
        let mut watch = GuestWatch::default();
        for pass in 1..=5 {
            watch.tick(0, "x", FILE_A, "boot1", pass, 0).unwrap();
        }
        for pass in 6..=9 {
            watch.tick(1, "x", FILE_B, "boot1", pass, 0).unwrap();
        }
    }

    #[test]
    fn a_counter_going_back_or_two_copies_of_a_boot_fail() {
        let mut watch = GuestWatch::default();
        watch.tick(0, "x", FILE_A, "boot1", 5, 0).unwrap();
        let back = watch.tick(0, "x", FILE_A, "boot1", 4, 0).unwrap_err();
        assert!(back.contains("went back"), "{back}");
        watch.tick(1, "x", FILE_B, "boot1", 3, 0).unwrap();
        let twice = watch.tick(1, "x", FILE_B, "boot1", 6, 0).unwrap_err();
        assert!(twice.contains("two copies of x"), "{twice}");
        let lost = watch.tick(0, "y", FILE_A, "boot9", 1, 2).unwrap_err();
        assert!(lost.contains("lost their last write"), "{lost}");
    }

    #[test]
    fn a_new_boot_needs_a_cause() {
        let mut watch = GuestWatch::default();
        watch.tick(0, "x", FILE_A, "boot1", 7, 0).unwrap();
        let unasked = watch.tick(0, "x", FILE_A, "boot2", 1, 0).unwrap_err();
        assert!(unasked.contains("booted again"), "{unasked}");
        let mut watch = GuestWatch::default();
        watch.tick(0, "x", FILE_A, "boot1", 7, 0).unwrap();
        watch.allow_reboot("x");
        watch.tick(0, "x", FILE_A, "boot2", 1, 0).unwrap();
    }

    #[test]
    fn a_record_must_be_on_the_disk_from_its_boot_or_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        let image = std::fs::File::create(&disk).unwrap();
        image.set_len(BLOB_BYTES + 8 * 512).unwrap();
        let write = |record: u64, boot: &str| {
            use std::os::unix::fs::FileExt;
            let text = format!("record {record:08} {boot}\n");
            image
                .write_at(text.as_bytes(), BLOB_BYTES + record * 512)
                .unwrap();
        };
        let mut watch = GuestWatch::default();
        watch.tick(0, "x", FILE_A, "boot1", 1, 0).unwrap();
        let guest = watch.guests.get_mut("x").unwrap();
        guest.records.insert("boot1".into(), [0, 1, 2].into());
        write(0, "boot1");
        write(1, "boot1");
        let missing = watch.check_disk("x", &disk, false).unwrap_err();
        assert!(missing.contains("record 2"), "{missing}");
        write(2, "boot1");
        assert_eq!(watch.check_disk("x", &disk, false), Ok(3));
        // A later boot writes from record 0 again.
        watch.allow_reboot("x");
        watch.tick(0, "x", FILE_A, "boot2", 1, 0).unwrap();
        write(0, "boot2");
        assert_eq!(watch.check_disk("x", &disk, false), Ok(3));
        // boot2's record 0 lost under boot1's.
        let guest = watch.guests.get_mut("x").unwrap();
        guest.records.insert("boot2".into(), [0].into());
        write(0, "boot1");
        let lost = watch.check_disk("x", &disk, false).unwrap_err();
        assert!(
            lost.contains("record 0 that x reported written in boot boot2"),
            "{lost}"
        );
        // A boot the logs have not shown yet wrote it since.
        write(0, "boot3");
        assert_eq!(watch.check_disk("x", &disk, false), Ok(4));
    }
}
