//! The standard `process_*` metrics every Prometheus client exports (CPU, memory,
//! file descriptors, threads, start time), read from `/proc/self` at each scrape, so
//! the agent's own cost shows beside what it enforces. Must not: fail a scrape: a
//! value that cannot be read is left out.
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What `/proc/self` says, in the units the metrics use.
#[derive(Debug, Default, PartialEq)]
struct ProcessSample {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    threads: Option<i64>,
    start_time_seconds: Option<f64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
}

impl ProcessSample {
    fn read() -> Self {
        // SAFETY: sysconf only reads configuration.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let mut sample = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .zip(std::fs::read_to_string("/proc/stat").ok())
            .map(|(stat, system)| Self::from_stat(&stat, &system, ticks as f64, page as i64))
            .unwrap_or_default();
        sample.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as i64);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            sample.max_fds = Some(i64::try_from(limit.rlim_cur).unwrap_or(i64::MAX));
        }
        sample
    }

    /// From `/proc/self/stat` and the `btime` line of `/proc/stat` (proc(5)).
    fn from_stat(stat: &str, system: &str, ticks: f64, page: i64) -> Self {
        // The command name is in parentheses and may hold spaces: fields start after it.
        let Some(fields) = stat.rfind(')').map(|end| &stat[end + 1..]) else {
            return Self::default();
        };
        // Field 3 (state) is the first after the name.
        let field = |n: usize| fields.split_whitespace().nth(n - 3);
        let number = |n: usize| field(n).and_then(|f| f.parse::<u64>().ok());
        let boot = system
            .lines()
            .find_map(|line| line.strip_prefix("btime "))
            .and_then(|t| t.trim().parse::<u64>().ok());
        let valid_ticks = (ticks > 0.0).then_some(ticks);
        Self {
            cpu_seconds: number(14)
                .zip(number(15))
                .zip(valid_ticks)
                .map(|((user, system), ticks)| (user + system) as f64 / ticks),
            threads: number(20).map(|n| n as i64),
            start_time_seconds: number(22)
                .zip(boot)
                .zip(valid_ticks)
                .map(|((start, boot), ticks)| boot as f64 + start as f64 / ticks),
            virtual_bytes: number(23).map(|n| n as i64),
            resident_bytes: number(24).map(|pages| pages as i64 * page),
            open_fds: None,
            max_fds: None,
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sample = ProcessSample::read();
        if let Some(seconds) = sample.cpu_seconds {
            let counter = ConstCounter::new(seconds);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                counter.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                sample.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                sample.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                sample.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                sample.max_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                sample.threads,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        if let Some(start) = sample.start_time_seconds {
            let gauge = ConstGauge::new(start);
            gauge.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_spaces_in_the_name_is_read_by_field() {
        // pid (comm) state ppid ... utime=14 stime=15 ... threads=20 ... starttime=22 vsize=23 rss=24
        let stat = "42 (ray fence) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 7 0 1000 123456789 300 18446744073709551615";
        let system = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let sample = ProcessSample::from_stat(stat, system, 100.0, 4096);
        assert_eq!(sample.cpu_seconds, Some(4.0));
        assert_eq!(sample.threads, Some(7));
        assert_eq!(sample.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(sample.virtual_bytes, Some(123_456_789));
        assert_eq!(sample.resident_bytes, Some(300 * 4096));
    }

    #[test]
    fn the_running_process_reads_itself() {
        let sample = ProcessSample::read();
        assert!(sample.cpu_seconds.is_some_and(|s| s >= 0.0));
        assert!(sample.resident_bytes.is_some_and(|b| b > 0));
        assert!(sample.open_fds.is_some_and(|n| n > 0));
        assert!(sample.threads.is_some_and(|n| n >= 1));
    }
}
