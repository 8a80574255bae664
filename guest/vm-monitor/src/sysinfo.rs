//! Reading the guest's own state from /proc and /sys. Parsers are pure.

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

pub fn meminfo() -> MemInfo {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

pub fn loadavg() -> (f32, f32) {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").unwrap_or_default())
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
}
