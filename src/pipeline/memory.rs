//! Reading the process's memory use and the machine's free memory.

/// Resident set size now, in bytes (Linux `/proc/self/statm`).
pub fn rss() -> u64 {
    let page = 4096;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |p| p * page)
}

/// Peak resident set size of the process so far (`VmHWM`).
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

/// Memory available to a new workload, as sysinfo reports it.
pub fn available() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.available_memory()
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// Bytes as a short human figure.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// GiB given on the command line (fractions allowed) as bytes.
pub fn gib(g: f64) -> u64 {
    (g * GIB) as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn figures() {
        assert_eq!(super::human(1536), "1.5 KiB");
        assert_eq!(super::human(3 << 30), "3.00 GiB");
        assert_eq!(super::gib(0.25), 1 << 28);
        assert!(super::rss() > 0 && super::peak_rss() >= super::rss() / 2);
    }
}
