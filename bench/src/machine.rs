//! A one-line description of the machine a figure was measured on.

/// CPU model, logical cores and OS, e.g. `AMD EPYC 7B13 ×2, linux x86_64`.
pub(crate) fn describe() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu} ×{cores}, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}
