//! Reading the guest's own state from /proc and /sys. Parsers are pure.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The fields of /proc/meminfo the monitor uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemInfo {
    pub total: u64,
    pub available: u64,
    pub cached: u64,
}

impl MemInfo {
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }
}

pub fn parse_meminfo(text: &str) -> MemInfo {
    let mut info = MemInfo::default();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(key), Some(value)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "MemTotal:" => info.total = kib * 1024,
            "MemAvailable:" => info.available = kib * 1024,
            "Cached:" => info.cached = kib * 1024,
            _ => {}
        }
    }
    info
}

/// load1 and load5 from /proc/loadavg.
pub fn parse_loadavg(text: &str) -> (f32, f32) {
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    (fields.next().unwrap_or(0.0), fields.next().unwrap_or(0.0))
}

/// Counts CPUs in a kernel CPU list such as "0-3,5".
pub fn count_cpu_list(text: &str) -> u32 {
    text.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(part.parse::<u32>().is_ok()),
        })
        .sum()
}

/// `some avg10` of /proc/pressure/cpu, a percentage.
pub fn parse_cpu_pressure(text: &str) -> Option<f32> {
    let some = text.lines().find_map(|line| line.strip_prefix("some "))?;
    let avg10 = some
        .split_whitespace()
        .find_map(|field| field.strip_prefix("avg10="))?;
    avg10.parse().ok().filter(|p| (0.0..=100.0).contains(p))
}

/// Cumulative CPU time of all CPUs, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Everything but idle and iowait: a vCPU waiting on a disk could run something else.
    pub busy: u64,
    pub total: u64,
}

impl CpuTimes {
    /// The busy share of CPU time since `earlier`; None if no time passed. Only online
    /// CPUs' counters advance, so 1.0 means every online vCPU was busy.
    pub fn util_since(&self, earlier: &CpuTimes) -> Option<f32> {
        let total = self.total.checked_sub(earlier.total).filter(|&t| t > 0)?;
        // Idle time read through nohz can step back a little: keep within 0..=1.
        let busy = self.busy.saturating_sub(earlier.busy).min(total);
        Some(busy as f32 / total as f32)
    }
}

/// The aggregate `cpu` line of /proc/stat. Its guest and guest_nice columns are already
/// counted in user and nice, so only the first eight are summed.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find_map(|line| line.strip_prefix("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
        return None;
    };
    let total = user + nice + system + idle + iowait + irq + softirq + steal;
    Some(CpuTimes {
        busy: total - idle - iowait,
        total,
    })
}

/// CPU utilisation over a sliding window of /proc/stat samples taken at any pace.
#[derive(Debug)]
pub struct UtilWindow {
    span: Duration,
    samples: VecDeque<(Instant, CpuTimes)>,
}

impl UtilWindow {
    pub fn new(span: Duration) -> Self {
        UtilWindow {
            span,
            samples: VecDeque::new(),
        }
    }

    /// Adds a sample and returns the utilisation since the newest sample at least `span`
    /// old (or the oldest, while the window fills); None until two samples apart.
    pub fn update(&mut self, now: Instant, times: CpuTimes) -> Option<f32> {
        while self
            .samples
            .get(1)
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= self.span)
        {
            self.samples.pop_front();
        }
        self.samples.push_back((now, times));
        let (_, oldest) = self.samples.front()?;
        times.util_since(oldest)
    }
}

pub fn meminfo() -> MemInfo {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

pub fn loadavg() -> (f32, f32) {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").unwrap_or_default())
}

/// None without PSI in the kernel.
pub fn cpu_pressure() -> Option<f32> {
    parse_cpu_pressure(&std::fs::read_to_string("/proc/pressure/cpu").ok()?)
}

pub fn cpu_times() -> Option<CpuTimes> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

pub fn online_cpus() -> u32 {
    count_cpu_list(&std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let info = parse_meminfo("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:   600 kB\nCached: 50 kB\nSwapCached: 7 kB\n");
        assert_eq!(
            info,
            MemInfo {
                total: 1_024_000,
                available: 614_400,
                cached: 51_200
            }
        );
        assert_eq!(info.used(), 409_600);
    }

    #[test]
    fn parses_loadavg_and_cpu_lists() {
        assert_eq!(parse_loadavg("0.50 0.25 0.10 1/80 123"), (0.5, 0.25));
        assert_eq!(parse_loadavg("garbage"), (0.0, 0.0));
        assert_eq!(count_cpu_list("0\n"), 1);
        assert_eq!(count_cpu_list("0-3,5"), 5);
        assert_eq!(count_cpu_list("0-1,3-4"), 4);
        assert_eq!(count_cpu_list(""), 0);
    }

    #[test]
    fn parses_cpu_pressure() {
        let text = "some avg10=42.50 avg60=10.00 avg300=2.00 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_cpu_pressure(text), Some(42.5));
        assert_eq!(parse_cpu_pressure("full avg10=3.00\n"), None);
        assert_eq!(parse_cpu_pressure("some avg10=x\n"), None);
        assert_eq!(parse_cpu_pressure("some avg10=nan\n"), None);
        assert_eq!(parse_cpu_pressure(""), None);
    }

    #[test]
    fn parses_proc_stat_without_counting_guest_time_twice() {
        let text = "cpu  100 10 50 800 40 0 5 5 30 0\ncpu0 50 5 25 400 20 0 2 3 15 0\nintr 1 2\n";
        assert_eq!(
            parse_proc_stat(text),
            Some(CpuTimes {
                busy: 170,
                total: 1010
            })
        );
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 2 3\n"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    fn times(busy: u64, total: u64) -> CpuTimes {
        CpuTimes { busy, total }
    }

    #[test]
    fn utilisation_is_the_busy_share_of_cpu_time() {
        // Two vCPUs for one second (200 ticks), one of them busy.
        assert_eq!(times(150, 400).util_since(&times(50, 200)), Some(0.5));
        assert_eq!(times(400, 400).util_since(&times(200, 200)), Some(1.0));
        assert_eq!(times(50, 200).util_since(&times(50, 200)), None);
        // Idle stepping back never makes it more than all busy.
        assert_eq!(times(500, 400).util_since(&times(200, 200)), Some(1.0));
    }

    #[test]
    fn the_window_covers_the_last_span() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut window = UtilWindow::new(Duration::from_secs(3));
        assert_eq!(window.update(at(0), times(0, 0)), None);
        // Idle, then busy from second 3: a third, two thirds, then all of the last 3 s.
        assert_eq!(window.update(at(1), times(0, 100)), Some(0.0));
        window.update(at(2), times(0, 200));
        window.update(at(3), times(0, 300));
        assert_eq!(window.update(at(4), times(100, 400)), Some(1.0 / 3.0));
        assert_eq!(window.update(at(5), times(200, 500)), Some(2.0 / 3.0));
        assert_eq!(window.update(at(6), times(300, 600)), Some(1.0));
        // A sample taken in between does not shorten it.
        assert_eq!(window.update(at(6), times(300, 600)), Some(1.0));
        assert_eq!(window.samples.len(), 5);
    }
}
