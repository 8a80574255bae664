//! What the test guests' workloads report on their serial consoles, and the fleet's view
//! of its hosts, shared by the multi-host tests.

use crate::{wait_until, TestHost};
use serde_json::Value;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One `dirtier:` report line: the pass count, the boot it ran in, and the writes found
/// lost so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    pub pass: u64,
    pub boot_id: String,
    pub errors: u64,
}

pub fn parse_tick(line: &str) -> Option<Tick> {
    let rest = line.split("dirtier: pass=").nth(1)?;
    let (pass, rest) = rest.split_once(" boot_id=")?;
    let (boot_id, errors) = rest.split_once(" errors=")?;
    Some(Tick {
        pass: pass.parse().ok()?,
        boot_id: boot_id.into(),
        errors: errors.trim().parse().ok()?,
    })
}

pub fn ticks(serial: &Path) -> Vec<Tick> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    text.lines().filter_map(parse_tick).collect()
}

/// What the `diskwriter` guest writes first: random bytes, then one numbered record per
/// 512-byte sector after them.
pub const BLOB_BYTES: u64 = 16 << 20;

/// One line of the `diskwriter` guest's serial console that matters to a disk check.
#[derive(Debug, Clone, PartialEq)]
pub enum DiskLine {
    Ready(String),
    /// The blob's checksum, and the boot that wrote it.
    Blob(String, Option<String>),
    /// A record's number, and the boot that wrote it.
    Record(u64, Option<String>),
}

pub fn parse_disk_line(line: &str) -> Option<DiskLine> {
    if let Some(id) = line.split("vmhost-guest: ready boot_id=").nth(1) {
        Some(DiskLine::Ready(id.trim().to_string()))
    } else if let Some(rest) = line.split("vmhost-disk: blob_md5=").nth(1) {
        let (sum, boot) = value_and_boot(rest);
        Some(DiskLine::Blob(sum.to_string(), boot))
    } else {
        let (n, boot) = value_and_boot(line.split("vmhost-disk: record=").nth(1)?);
        Some(DiskLine::Record(n.parse().ok()?, boot))
    }
}

/// `VALUE boot=ID`, the boot left out by older images.
fn value_and_boot(rest: &str) -> (&str, Option<String>) {
    let mut words = rest.split_whitespace();
    let value = words.next().unwrap_or_default();
    let boot = words
        .find_map(|w| w.strip_prefix("boot="))
        .map(String::from);
    (value, boot)
}

/// What the `diskwriter` guest reported on one host's serial console.
#[derive(Debug, Default)]
pub struct DiskReports {
    pub boot_id: Option<String>,
    pub blob_md5: Option<String>,
    pub records: Vec<u64>,
}

pub fn disk_reports(serial: &Path) -> DiskReports {
    disk_reports_in(&std::fs::read_to_string(serial).unwrap_or_default())
}

pub fn disk_reports_in(text: &str) -> DiskReports {
    let mut reports = DiskReports::default();
    for line in text.lines() {
        match parse_disk_line(line) {
            Some(DiskLine::Ready(id)) => reports.boot_id = Some(id),
            Some(DiskLine::Blob(sum, _)) => reports.blob_md5 = Some(sum),
            Some(DiskLine::Record(n, _)) => reports.records.push(n),
            None => {}
        }
    }
    reports
}

/// The checksum of the first `bytes` of a file.
pub fn md5_of_head(path: &Path, bytes: u64) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"head -c "$1" "$2" | md5sum"#)
        .args(["md5", &bytes.to_string(), &path.display().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Waits for more than `after` dirtier reports of VM `vm` on `host`; returns the last.
pub fn wait_ticking(host: &TestHost, vm: &str, after: usize) -> Tick {
    let serial = host.serial_log(vm);
    wait_until(
        Duration::from_secs(180),
        "the guest's workload to report",
        || ticks(&serial).len() > after,
    );
    ticks(&serial).last().unwrap().clone()
}

/// The guest ran on at `target`: same boot, counter past where it was, no page lost.
pub fn assert_continued(before: &Tick, target: &TestHost, vm: &str) {
    let after = wait_ticking(target, vm, 0);
    let on_target = ticks(&target.serial_log(vm));
    assert!(
        on_target.iter().all(|t| t.boot_id == before.boot_id),
        "the guest rebooted: {before:?} then {on_target:?}"
    );
    assert!(
        on_target[0].pass > before.pass,
        "the counter went back: {before:?} then {:?}",
        on_target[0]
    );
    assert!(
        on_target.iter().all(|t| t.errors == 0),
        "pages lost their last write: {on_target:?}"
    );
    assert!(after.pass > on_target[0].pass || on_target.len() == 1);
}

/// The fleet's hosts as `host` sees them through gossip (`vmctl hosts`).
pub fn fleet_hosts(host: &TestHost) -> Vec<Value> {
    let json: Value = serde_json::from_str(&host.vmctl_ok(&["--json", "hosts"])).unwrap();
    json.as_array().unwrap().clone()
}

/// How many hosts `host` sees live, itself included.
pub fn live_hosts(host: &TestHost) -> usize {
    fleet_hosts(host)
        .iter()
        .filter(|h| h["live"] == true)
        .count()
}

/// The dirtier's beat, `b<n>`, that it prints every BEAT_MS when given one.
pub fn parse_beat(line: &str) -> Option<u64> {
    line.trim_end().strip_prefix('b')?.parse().ok()
}

/// A file's identity: inode numbers are reused, so with its birth time a new folder's log
/// is a new file.
pub type FileId = (u64, u128);

pub fn file_id(meta: &std::fs::Metadata) -> FileId {
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    (meta.ino(), born.map_or(0, |d| d.as_nanos()))
}

/// One complete line of a log, and where it lies in the file.
pub struct Line {
    pub start: u64,
    pub end: u64,
    pub text: String,
}

/// What one read of a log found.
pub struct NewLines {
    pub file: FileId,
    /// The log was read from its start again: a new file, or one rewritten.
    pub restarted: bool,
    pub lines: Vec<Line>,
}

/// One serial log, read on by whole lines from where the last read stopped. A new file, or
/// one rewritten (QEMU truncates the log it starts on), is read again from its start.
pub struct LogTail {
    path: PathBuf,
    file: Option<FileId>,
    offset: u64,
    /// The end of the last line not yet complete.
    partial: Vec<u8>,
    /// The last bytes read, to see that they are still there.
    tail: Vec<u8>,
}

impl LogTail {
    pub fn new(path: PathBuf) -> LogTail {
        LogTail {
            path,
            file: None,
            offset: 0,
            partial: Vec::new(),
            tail: Vec::new(),
        }
    }

    /// The lines completed since the last read; None while there is no file.
    pub fn read(&mut self) -> Option<NewLines> {
        let mut file = std::fs::File::open(&self.path).ok()?;
        let meta = file.metadata().ok()?;
        let id = file_id(&meta);
        let mut seen_tail = vec![0; self.tail.len()];
        let rewritten = meta.len() < self.offset
            || file
                .seek(SeekFrom::Start(self.offset - self.tail.len() as u64))
                .and_then(|_| file.read_exact(&mut seen_tail))
                .map_or(true, |_| seen_tail != self.tail);
        let restarted = self.file != Some(id) || rewritten;
        if restarted {
            *self = LogTail::new(std::mem::take(&mut self.path));
            self.file = Some(id);
        }
        file.seek(SeekFrom::Start(self.offset)).ok()?;
        let start = self.offset - self.partial.len() as u64;
        let mut text = std::mem::take(&mut self.partial);
        let before = text.len();
        // What was read before an error still counts.
        let _ = file.read_to_end(&mut text);
        self.offset += (text.len() - before) as u64;
        self.tail = text[text.len().saturating_sub(64)..].to_vec();
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.partial = text.split_off(complete);
        let mut at = start;
        let lines = text
            .split_inclusive(|b| *b == b'\n')
            .map(|line| {
                let end = at + line.len() as u64;
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                let line = Line {
                    start: at,
                    end,
                    text,
                };
                at = end;
                line
            })
            .collect();
        Some(NewLines {
            file: id,
            restarted,
            lines,
        })
    }

    /// The highest number that `number` reads from the lines completed since the last call.
    fn highest(&mut self, number: fn(&str) -> Option<u64>) -> Option<u64> {
        let read = self.read()?;
        read.lines.iter().filter_map(|l| number(&l.text)).max()
    }
}

/// The longest a guest may stall in a live migration without faults: the switchover, and
/// post-copy faults at a capped bandwidth (a few seconds under TCG).
pub const MIGRATION_STALL: Duration = Duration::from_secs(10);

/// How long `finish` waits for the guest to count on, closing the gap still open.
const CLOSING_WAIT: Duration = Duration::from_secs(30);

/// Follows numbered lines of one guest on several serial logs, stamping on the host each
/// rise of the highest number seen: the largest gap between them is the outage the guest
/// showed, wherever it ran.
pub struct TickGaps {
    stop: Arc<AtomicBool>,
    follower: std::thread::JoinHandle<Duration>,
}

impl TickGaps {
    /// The dirtier's pass reports of `vm` on every host, once it has reported; the source's
    /// serial log may go with its VM.
    pub fn start(hosts: &[&TestHost], vm: &str) -> TickGaps {
        let serials = hosts.iter().map(|h| h.serial_log(vm)).collect();
        TickGaps::follow(serials, Duration::from_millis(50), |line| {
            parse_tick(line).map(|t| t.pass)
        })
    }

    /// The numbers `number` reads from lines of `serials`: what they hold now (one number at
    /// least), then what is added, read every `poll`.
    pub fn follow(
        serials: Vec<PathBuf>,
        poll: Duration,
        number: fn(&str) -> Option<u64>,
    ) -> TickGaps {
        let mut logs: Vec<LogTail> = serials.into_iter().map(LogTail::new).collect();
        let mut read = move || logs.iter_mut().filter_map(|l| l.highest(number)).max();
        let mut highest = read().expect("the guest counted before the watch started");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let follower = std::thread::spawn(move || {
            let mut since = Instant::now();
            let mut largest = Duration::ZERO;
            loop {
                std::thread::sleep(poll);
                // Asked before the read, so a rise seen now closes the last gap.
                let stopping = stopped.load(Ordering::SeqCst);
                if let Some(now) = read().filter(|now| *now > highest) {
                    largest = largest.max(since.elapsed());
                    (highest, since) = (now, Instant::now());
                    if stopping {
                        return largest;
                    }
                } else if stopping && since.elapsed() > CLOSING_WAIT {
                    return largest.max(since.elapsed());
                }
            }
        });
        TickGaps { stop, follower }
    }

    /// Stops following once the guest counts on: the largest gap, the last one included.
    pub fn finish(self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        self.follower.join().expect("the follower panicked")
    }

    /// Stops following; fails if the guest's workload ever stalled longer than `bound`.
    pub fn assert_within(self, bound: Duration) {
        let largest = self.finish();
        println!("the guest's workload stalled at most {largest:?}");
        assert!(
            largest <= bound,
            "the guest's workload stalled {largest:?}, more than {bound:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_log_is_read_on_by_whole_lines_and_again_from_its_start_when_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut log = LogTail::new(path.clone());
        assert_eq!(log.highest(parse_beat), None, "no file yet");
        append(&path, "boot\r\nb7\r\nb8\r\nb");
        assert_eq!(log.highest(parse_beat), Some(8));
        append(&path, "9\r\n");
        assert_eq!(log.highest(parse_beat), Some(9));
        assert_eq!(log.highest(parse_beat), None, "nothing new");
        // The target's QEMU truncates the log it starts on.
        std::fs::write(&path, "b3\n").unwrap();
        assert_eq!(log.highest(parse_beat), Some(3));
    }

    #[test]
    fn the_largest_gap_spans_the_move_to_another_log_and_closes_after_the_stop() {
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (dir.path().join("source"), dir.path().join("target"));
        append(&source, "b1\n");
        let gaps = TickGaps::follow(
            vec![source, target.clone()],
            Duration::from_millis(1),
            parse_beat,
        );
        std::thread::sleep(Duration::from_millis(100));
        append(&target, "b2\n");
        let beats_on = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            append(&target, "b3\n");
        });
        let largest = gaps.finish();
        beats_on.join().unwrap();
        assert!(
            largest >= Duration::from_millis(100) && largest < CLOSING_WAIT,
            "{largest:?}"
        );
    }
}
