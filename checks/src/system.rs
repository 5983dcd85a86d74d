//! `system` check: disk usage and inodes per mount point (statvfs), memory and swap use
//! (`/proc/meminfo`) and load per core (`/proc/loadavg`), each against warning/critical
//! thresholds. Linux only; reads the kernel's files directly, no external program.
//!
//! The result is the worst of the parts (CRITICAL > UNKNOWN > WARNING > OK); every value read
//! becomes a metric. A mount that is not mounted (its path is only a directory on the parent
//! file system) is CRITICAL: that is the "data disk did not come back after reboot" case.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::threshold::{above, invalid, metric, validate_pair, worst};
use crate::{Metric, Outcome, SpecError, Status, internal_deadline};

/// A system check, as written under `check:` with `type: system`. Each part is optional; at
/// least one must be given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemCheck {
    /// Mount points to watch (used space and inodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk: Vec<DiskLimits>,
    /// Memory in use (total minus available) as a percentage of total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<PercentLimits>,
    /// Swap in use as a percentage of total swap (a node without swap is OK, 0 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<PercentLimits>,
    /// 1, 5 and 15 minute load averages divided by the number of online CPUs; each of the three
    /// is compared with the thresholds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_per_core: Option<LoadLimits>,
}

fn d80() -> f64 {
    80.0
}
fn d90() -> f64 {
    90.0
}
fn d95() -> f64 {
    95.0
}
fn d2() -> f64 {
    2.0
}
fn d4() -> f64 {
    4.0
}

/// One mount point. Percentages alert when the value is *above* them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskLimits {
    /// Mount point (`/`, `/data`); must be mounted.
    pub mount: String,
    /// Used space, percent (default 80), computed like `df` (used / (used + available)).
    #[serde(default = "d80")]
    pub warning: f64,
    /// Used space, percent (default 90).
    #[serde(default = "d90")]
    pub critical: f64,
    /// Used inodes, percent (default 80). Ignored on file systems without an inode limit.
    #[serde(default = "d80")]
    pub inodes_warning: f64,
    /// Used inodes, percent (default 90).
    #[serde(default = "d90")]
    pub inodes_critical: f64,
}

/// Percentage thresholds for memory or swap (defaults 90 and 95).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PercentLimits {
    #[serde(default = "d90")]
    pub warning: f64,
    #[serde(default = "d95")]
    pub critical: f64,
}

/// Load per core thresholds (defaults 2.0 and 4.0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadLimits {
    #[serde(default = "d2")]
    pub warning: f64,
    #[serde(default = "d4")]
    pub critical: f64,
}

/// What statvfs said about one mount point.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DiskReading {
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub avail_bytes: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
}

impl DiskReading {
    fn used_percent(&self) -> f64 {
        let denom = self.used_bytes + self.avail_bytes;
        if denom == 0 {
            0.0
        } else {
            self.used_bytes as f64 * 100.0 / denom as f64
        }
    }

    fn inodes_percent(&self) -> Option<f64> {
        (self.inodes_total > 0).then(|| {
            (self.inodes_total - self.inodes_free.min(self.inodes_total)) as f64 * 100.0
                / self.inodes_total as f64
        })
    }
}

/// Memory facts from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MemReading {
    pub total: u64,
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

/// Parses `/proc/meminfo` (values in kB).
pub(crate) fn parse_meminfo(text: &str) -> Result<MemReading, String> {
    let get = |key: &str| -> Result<u64, String> {
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .map(|kb| kb * 1024)
            .ok_or_else(|| format!("/proc/meminfo has no {key}"))
    };
    Ok(MemReading {
        total: get("MemTotal")?,
        available: get("MemAvailable")?,
        swap_total: get("SwapTotal").unwrap_or(0),
        swap_free: get("SwapFree").unwrap_or(0),
    })
}

/// Parses `/proc/loadavg` into the 1, 5 and 15 minute averages.
pub(crate) fn parse_loadavg(text: &str) -> Result<[f64; 3], String> {
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => Ok([a, b, c]),
        _ => Err(format!("cannot parse /proc/loadavg: {:?}", text.trim())),
    }
}

/// Unescapes a path field of `/proc/self/mountinfo` (`\040` is a space).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points listed in `/proc/self/mountinfo` text (field 5).
pub(crate) fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(unescape_mount))
        .collect()
}

/// Reads one mount point (blocking: statvfs on a hung network file system never returns, so
/// the caller runs this on a blocking thread with a timeout).
fn read_disk(mount: &str, mountinfo: &str) -> Result<DiskReading, String> {
    let trimmed = if mount.len() > 1 {
        mount.trim_end_matches('/')
    } else {
        mount
    };
    if !Path::new(trimmed).exists() {
        return Err(format!("{mount} does not exist"));
    }
    if !mount_points(mountinfo).iter().any(|m| m == trimmed) {
        return Err(format!("{mount} is not a mount point (not mounted?)"));
    }
    let st = nix::sys::statvfs::statvfs(trimmed).map_err(|e| format!("statvfs {mount}: {e}"))?;
    let frsize = st.fragment_size() as u64;
    let blocks = st.blocks() as u64;
    let bfree = st.blocks_free() as u64;
    let bavail = st.blocks_available() as u64;
    Ok(DiskReading {
        size_bytes: blocks * frsize,
        used_bytes: blocks.saturating_sub(bfree) * frsize,
        avail_bytes: bavail * frsize,
        inodes_total: st.files() as u64,
        inodes_free: st.files_free() as u64,
    })
}

/// Number of online CPUs (at least 1).
pub(crate) fn online_cpus() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
    }
}

/// Accumulates the parts of the result.
struct Report {
    status: Status,
    problems: Vec<String>,
    summary: Vec<String>,
    metrics: Vec<Metric>,
}

impl Report {
    fn part(&mut self, status: Status, text: String) {
        self.status = worst(self.status, status);
        if status != Status::Ok {
            self.problems
                .push(format!("{}: {text}", status.as_str().to_uppercase()));
        }
        self.summary.push(text);
    }
}

fn pct(v: f64) -> String {
    format!("{v:.1}%")
}

impl SystemCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if self.disk.is_empty()
            && self.memory.is_none()
            && self.swap.is_none()
            && self.load_per_core.is_none()
        {
            return Err(invalid(
                "system",
                "give at least one of disk, memory, swap, load_per_core",
            ));
        }
        for (i, d) in self.disk.iter().enumerate() {
            let f = format!("disk[{i}]");
            if !d.mount.starts_with('/') {
                return Err(invalid(
                    &f,
                    format!("mount {:?} must be an absolute path", d.mount),
                ));
            }
            validate_pair(&f, d.warning, d.critical, Some(100.0))?;
            validate_pair(
                &format!("{f}.inodes"),
                d.inodes_warning,
                d.inodes_critical,
                Some(100.0),
            )?;
        }
        if let Some(m) = &self.memory {
            validate_pair("memory", m.warning, m.critical, Some(100.0))?;
        }
        if let Some(m) = &self.swap {
            validate_pair("swap", m.warning, m.critical, Some(100.0))?;
        }
        if let Some(l) = &self.load_per_core {
            validate_pair("load_per_core", l.warning, l.critical, None)?;
        }
        Ok(())
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let until = tokio::time::Instant::now() + internal_deadline(timeout);
        let mut disks = Vec::with_capacity(self.disk.len());
        if !self.disk.is_empty() {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            for d in &self.disk {
                let mount = d.mount.clone();
                let info = mountinfo.clone();
                let job = tokio::task::spawn_blocking(move || read_disk(&mount, &info));
                let r = match tokio::time::timeout_at(until, job).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(format!("reading {}: {e}", d.mount)),
                    Err(_) => Err(format!(
                        "{}: statvfs did not answer in time (hung network file system?)",
                        d.mount
                    )),
                };
                disks.push(r);
            }
        }
        let mem = if self.memory.is_some() || self.swap.is_some() {
            Some(
                std::fs::read_to_string("/proc/meminfo")
                    .map_err(|e| format!("cannot read /proc/meminfo: {e}"))
                    .and_then(|t| parse_meminfo(&t)),
            )
        } else {
            None
        };
        let load = self.load_per_core.as_ref().map(|_| {
            std::fs::read_to_string("/proc/loadavg")
                .map_err(|e| format!("cannot read /proc/loadavg: {e}"))
                .and_then(|t| parse_loadavg(&t))
        });
        let mut o = self.evaluate(&disks, mem, load, online_cpus());
        o.duration = start.elapsed();
        tracing::debug!(status = %o.status, message = %o.message, "system check finished");
        o
    }

    /// Turns readings into the outcome (pure, so thresholds are tested on made-up numbers).
    pub(crate) fn evaluate(
        &self,
        disks: &[Result<DiskReading, String>],
        mem: Option<Result<MemReading, String>>,
        load: Option<Result<[f64; 3], String>>,
        cpus: u64,
    ) -> Outcome {
        let mut r = Report {
            status: Status::Ok,
            problems: Vec::new(),
            summary: Vec::new(),
            metrics: Vec::new(),
        };
        for (spec, reading) in self.disk.iter().zip(disks) {
            let m = &spec.mount;
            match reading {
                Err(e) => r.part(Status::Critical, format!("disk {e}")),
                Ok(d) => {
                    let used = d.used_percent();
                    let mut st = above(used, Some(spec.warning), Some(spec.critical));
                    let mut text = format!("disk {m} {} used", pct(used));
                    let mut used_m = metric(
                        format!("disk {m} used"),
                        used,
                        "%",
                        Some(spec.warning),
                        Some(spec.critical),
                    );
                    used_m.min = Some(0.0);
                    used_m.max = Some(100.0);
                    r.metrics.push(used_m);
                    r.metrics.push(Metric::new(
                        format!("disk {m} free"),
                        d.avail_bytes as f64,
                        "B",
                    ));
                    r.metrics.push(Metric::new(
                        format!("disk {m} size"),
                        d.size_bytes as f64,
                        "B",
                    ));
                    if let Some(ip) = d.inodes_percent() {
                        let ist = above(ip, Some(spec.inodes_warning), Some(spec.inodes_critical));
                        st = worst(st, ist);
                        text.push_str(&format!(", inodes {} used", pct(ip)));
                        let mut im = metric(
                            format!("disk {m} inodes used"),
                            ip,
                            "%",
                            Some(spec.inodes_warning),
                            Some(spec.inodes_critical),
                        );
                        im.min = Some(0.0);
                        im.max = Some(100.0);
                        r.metrics.push(im);
                    }
                    r.part(st, text);
                }
            }
        }
        match mem {
            None => {}
            Some(Err(e)) => r.part(Status::Unknown, e),
            Some(Ok(mem)) => {
                if let Some(lim) = &self.memory {
                    let used = if mem.total == 0 {
                        0.0
                    } else {
                        mem.total.saturating_sub(mem.available) as f64 * 100.0 / mem.total as f64
                    };
                    let st = above(used, Some(lim.warning), Some(lim.critical));
                    let mut m = metric(
                        "memory used",
                        used,
                        "%",
                        Some(lim.warning),
                        Some(lim.critical),
                    );
                    m.min = Some(0.0);
                    m.max = Some(100.0);
                    r.metrics.push(m);
                    r.metrics
                        .push(Metric::new("memory available", mem.available as f64, "B"));
                    r.metrics
                        .push(Metric::new("memory total", mem.total as f64, "B"));
                    r.part(st, format!("memory {} used", pct(used)));
                }
                if let Some(lim) = &self.swap {
                    let used = if mem.swap_total == 0 {
                        0.0
                    } else {
                        mem.swap_total.saturating_sub(mem.swap_free) as f64 * 100.0
                            / mem.swap_total as f64
                    };
                    let st = above(used, Some(lim.warning), Some(lim.critical));
                    let mut m = metric(
                        "swap used",
                        used,
                        "%",
                        Some(lim.warning),
                        Some(lim.critical),
                    );
                    m.min = Some(0.0);
                    m.max = Some(100.0);
                    r.metrics.push(m);
                    r.metrics
                        .push(Metric::new("swap total", mem.swap_total as f64, "B"));
                    let text = if mem.swap_total == 0 {
                        "no swap".to_string()
                    } else {
                        format!("swap {} used", pct(used))
                    };
                    r.part(st, text);
                }
            }
        }
        if let (Some(lim), Some(load)) = (&self.load_per_core, load) {
            match load {
                Err(e) => r.part(Status::Unknown, e),
                Ok(avgs) => {
                    let cpus = cpus.max(1);
                    let mut st = Status::Ok;
                    let mut per = [0.0; 3];
                    for (i, (avg, minutes)) in avgs.iter().zip([1, 5, 15]).enumerate() {
                        per[i] = avg / cpus as f64;
                        st = worst(st, above(per[i], Some(lim.warning), Some(lim.critical)));
                        r.metrics
                            .push(Metric::new(format!("load{minutes}"), *avg, ""));
                        r.metrics.push(metric(
                            format!("load{minutes} per core"),
                            per[i],
                            "",
                            Some(lim.warning),
                            Some(lim.critical),
                        ));
                    }
                    r.metrics.push(Metric::new("cpus", cpus as f64, ""));
                    r.part(
                        st,
                        format!(
                            "load per core {:.2}/{:.2}/{:.2} ({cpus} CPUs)",
                            per[0], per[1], per[2]
                        ),
                    );
                }
            }
        }
        let message = if r.problems.is_empty() {
            r.summary.join(", ")
        } else {
            r.problems.join("; ")
        };
        Outcome {
            status: r.status,
            message,
            metrics: r.metrics,
            output: r.summary.join("\n"),
            duration: Duration::ZERO,
            exit_code: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attachments, CheckKind, CheckSpec};

    fn spec(v: serde_json::Value) -> SystemCheck {
        let s: CheckSpec = serde_json::from_value(v).expect("deserializes");
        s.validate().expect("valid");
        match s.kind {
            CheckKind::System(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_and_bad_specs() {
        let c = spec(
            serde_json::json!({"type": "system", "disk": [{"mount": "/"}],
            "memory": {}, "swap": {}, "load_per_core": {}}),
        );
        assert_eq!(c.disk[0].warning, 80.0);
        assert_eq!(c.disk[0].inodes_critical, 90.0);
        assert_eq!(c.memory.as_ref().unwrap().critical, 95.0);
        assert_eq!(c.load_per_core.as_ref().unwrap().warning, 2.0);

        let err = serde_json::from_value::<CheckSpec>(serde_json::json!({
            "type": "system", "disk": [{"mount": "/", "warn": 1}]}))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("warn") && err.contains("inodes_warning"),
            "{err}"
        );

        for bad in [
            serde_json::json!({"type": "system"}),
            serde_json::json!({"type": "system", "disk": [{"mount": "data"}]}),
            serde_json::json!({"type": "system", "disk": [{"mount": "/", "warning": 95}]}),
            serde_json::json!({"type": "system", "memory": {"critical": 120}}),
            serde_json::json!({"type": "system", "load_per_core": {"warning": -1}}),
        ] {
            let s: CheckSpec = serde_json::from_value(bad.clone()).unwrap();
            assert!(s.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn parsers() {
        let m = parse_meminfo(
            "MemTotal:       16000000 kB\nMemFree: 1 kB\nMemAvailable:    4000000 kB\n\
             SwapTotal: 1000 kB\nSwapFree: 250 kB\n",
        )
        .unwrap();
        assert_eq!(m.total, 16_000_000 * 1024);
        assert_eq!(m.available, 4_000_000 * 1024);
        assert_eq!(m.swap_total - m.swap_free, 750 * 1024);
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert_eq!(
            parse_loadavg("0.50 1.25 2.00 1/123 4567\n").unwrap(),
            [0.5, 1.25, 2.0]
        );
        assert!(parse_loadavg("x").is_err());
        let mi = "22 1 0:21 / / rw - overlay overlay rw\n\
                  30 22 8:1 / /mnt/my\\040disk rw - ext4 /dev/sda1 rw\n";
        assert_eq!(mount_points(mi), ["/", "/mnt/my disk"]);
    }

    fn disk(used: u64, avail: u64, inodes_total: u64, inodes_free: u64) -> DiskReading {
        DiskReading {
            size_bytes: used + avail,
            used_bytes: used,
            avail_bytes: avail,
            inodes_total,
            inodes_free,
        }
    }

    #[test]
    fn thresholds_on_made_up_readings() {
        let c = spec(serde_json::json!({"type": "system",
            "disk": [{"mount": "/"}, {"mount": "/data", "warning": 50, "critical": 70}],
            "memory": {"warning": 80, "critical": 90}, "swap": {},
            "load_per_core": {"warning": 1.0, "critical": 2.0}}));
        let mem = MemReading {
            total: 100,
            available: 50,
            swap_total: 0,
            swap_free: 0,
        };
        let ok = c.evaluate(
            &[Ok(disk(40, 60, 100, 90)), Ok(disk(40, 60, 0, 0))],
            Some(Ok(mem)),
            Some(Ok([1.0, 1.0, 1.0])),
            4,
        );
        assert_eq!(ok.status, Status::Ok, "{}", ok.message);
        assert!(ok.message.contains("disk / 40.0% used, inodes 10.0% used"));
        assert!(ok.message.contains("no swap"), "{}", ok.message);
        assert!(ok.message.contains("load per core 0.25/0.25/0.25 (4 CPUs)"));
        let labels: Vec<&str> = ok.metrics.iter().map(|m| m.label.as_str()).collect();
        for l in [
            "disk / used",
            "disk / free",
            "disk / size",
            "disk / inodes used",
            "disk /data used",
            "memory used",
            "memory available",
            "memory total",
            "swap used",
            "swap total",
            "load1",
            "load5 per core",
            "load15 per core",
            "cpus",
        ] {
            assert!(labels.contains(&l), "{l} missing from {labels:?}");
        }
        // /data has no inode limit: no inode metric.
        assert!(!labels.contains(&"disk /data inodes used"));
        let used = ok
            .metrics
            .iter()
            .find(|m| m.label == "disk / used")
            .unwrap();
        assert_eq!((used.warn.as_str(), used.crit.as_str()), ("80", "90"));

        // /data at 60 % is WARNING; inodes of / at 95 % are CRITICAL; load 1.5/core WARNING.
        let bad = c.evaluate(
            &[Ok(disk(40, 60, 100, 5)), Ok(disk(60, 40, 0, 0))],
            Some(Ok(mem)),
            Some(Ok([6.0, 1.0, 1.0])),
            4,
        );
        assert_eq!(bad.status, Status::Critical);
        assert!(
            bad.message
                .starts_with("CRITICAL: disk / 40.0% used, inodes 95.0% used"),
            "{}",
            bad.message
        );
        assert!(bad.message.contains("WARNING: disk /data 60.0% used"));
        assert!(bad.message.contains("WARNING: load per core 1.50/"));

        // An unreadable mount is CRITICAL, an unreadable /proc file UNKNOWN.
        let o = c.evaluate(
            &[
                Err("/data is not a mount point".into()),
                Ok(disk(1, 99, 0, 0)),
            ],
            Some(Err("cannot read /proc/meminfo".into())),
            Some(Ok([0.0; 3])),
            1,
        );
        assert_eq!(o.status, Status::Critical);
        let o = c.evaluate(
            &[Ok(disk(1, 99, 0, 0)), Ok(disk(1, 99, 0, 0))],
            Some(Err("cannot read /proc/meminfo".into())),
            Some(Ok([0.0; 3])),
            1,
        );
        assert_eq!(o.status, Status::Unknown, "{}", o.message);
    }

    #[tokio::test]
    async fn real_readings_on_this_machine() {
        let s: CheckSpec = serde_json::from_value(serde_json::json!({"type": "system",
            "disk": [{"mount": "/", "warning": 100, "critical": 100,
                      "inodes_warning": 100, "inodes_critical": 100}],
            "memory": {"warning": 100, "critical": 100}, "swap": {"warning": 100, "critical": 100},
            "load_per_core": {"warning": 1000, "critical": 1000}}))
        .unwrap();
        s.validate().unwrap();
        let o = s.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        let get = |l: &str| o.metrics.iter().find(|m| m.label == l).map(|m| m.value);
        assert!(get("disk / used").unwrap() > 0.0);
        assert!(get("disk / size").unwrap() > 0.0);
        assert!(get("memory total").unwrap() > 0.0);
        assert!(get("cpus").unwrap() >= 1.0);
        assert!(get("load1").is_some());

        // Any used space is above a 0 % threshold: CRITICAL for real.
        let c = SystemCheck {
            disk: vec![DiskLimits {
                mount: "/".into(),
                warning: 0.0,
                critical: 0.0,
                inodes_warning: 100.0,
                inodes_critical: 100.0,
            }],
            memory: None,
            swap: None,
            load_per_core: None,
        };
        let o = c.run(Duration::from_secs(5)).await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
    }

    #[tokio::test]
    async fn missing_or_unmounted_path_is_critical() {
        let dir = tempfile::tempdir().unwrap();
        let c = SystemCheck {
            disk: vec![
                DiskLimits {
                    mount: dir.path().to_str().unwrap().into(),
                    warning: 80.0,
                    critical: 90.0,
                    inodes_warning: 80.0,
                    inodes_critical: 90.0,
                },
                DiskLimits {
                    mount: "/vigil/no/such/mount".into(),
                    warning: 80.0,
                    critical: 90.0,
                    inodes_warning: 80.0,
                    inodes_critical: 90.0,
                },
            ],
            memory: None,
            swap: None,
            load_per_core: None,
        };
        let o = c.run(Duration::from_secs(5)).await;
        assert_eq!(o.status, Status::Critical);
        assert!(o.message.contains("is not a mount point"), "{}", o.message);
        assert!(o.message.contains("does not exist"), "{}", o.message);
    }
}
