//! `process` check: count the processes that match an exact name, a regex on the command line,
//! or the pid in a pid file, and compare the count with `min`/`max`. Reads `/proc` directly
//! (Linux only); zombies and the agent itself are not counted.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::threshold::invalid;
use crate::{Metric, Outcome, SpecError, Status, internal_deadline};

fn default_min() -> u64 {
    1
}

fn is_one(v: &u64) -> bool {
    *v == 1
}

/// A process check, as written under `check:` with `type: process`. Exactly one of `name`,
/// `cmdline`, `pid_file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessCheck {
    /// Exact process name: the kernel's name (`/proc/PID/comm`, 15 characters at most) or the
    /// base name of `argv[0]` (`nginx`, `postgres`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Regular expression matched anywhere in the command line (arguments joined by spaces):
    /// `"mineru-api .*--port 8000"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// File holding the pid of the process (`/run/nginx.pid`); the count is 1 when that
    /// process is alive, else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// Fewest matching processes for OK (default 1). Fewer is CRITICAL.
    #[serde(default = "default_min", skip_serializing_if = "is_one")]
    pub min: u64,
    /// Most matching processes for OK (default: no limit). More is WARNING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

/// One process as read from `/proc`.
#[derive(Debug, Clone)]
pub(crate) struct ProcInfo {
    pub pid: i32,
    pub comm: String,
    pub cmdline: Vec<String>,
    pub zombie: bool,
    pub rss_bytes: u64,
}

fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => 4096,
    }
}

/// Reads one process; `None` when it vanished meanwhile (or is not readable).
fn read_proc(pid: i32, page: u64) -> Option<ProcInfo> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(base.join("stat")).ok()?;
    // `pid (comm) S ...`: comm may contain spaces and parentheses, so split at the last ')'.
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let zombie = rest.trim_start().starts_with(['Z', 'X']);
    let cmdline = std::fs::read(base.join("cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let rss_pages = std::fs::read_to_string(base.join("statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    Some(ProcInfo {
        pid,
        comm,
        cmdline,
        zombie,
        rss_bytes: rss_pages * page,
    })
}

/// Every live process but this one.
fn list_processes() -> Result<Vec<ProcInfo>, String> {
    let me = std::process::id() as i32;
    let page = page_size();
    let dir = std::fs::read_dir("/proc").map_err(|e| format!("cannot read /proc: {e}"))?;
    Ok(dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| read_proc(pid, page))
        .filter(|p| !p.zombie)
        .collect())
}

/// Whether `p` is named `name` (its comm, or the base name of argv[0]).
fn name_matches(p: &ProcInfo, name: &str) -> bool {
    if p.comm == name {
        return true;
    }
    p.cmdline.first().is_some_and(|a0| {
        let base = a0.rsplit('/').next().unwrap_or(a0);
        // Some programs rewrite argv[0] as "name: role" (postgres, sshd).
        base == name || base.split_once(':').is_some_and(|(b, _)| b == name)
    })
}

impl ProcessCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        let given = [
            self.name.is_some(),
            self.cmdline.is_some(),
            self.pid_file.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(invalid(
                "process",
                "give exactly one of name, cmdline, pid_file",
            ));
        }
        if self.name.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("name", "is empty"));
        }
        if let Some(re) = &self.cmdline {
            regex::Regex::new(re).map_err(|e| invalid("cmdline", e.to_string()))?;
        }
        if let Some(max) = self.max
            && max < self.min
        {
            return Err(invalid("max", format!("{max} is below min {}", self.min)));
        }
        Ok(())
    }

    fn what(&self) -> String {
        if let Some(n) = &self.name {
            format!("processes named {n:?}")
        } else if let Some(re) = &self.cmdline {
            format!("processes matching /{re}/")
        } else if let Some(p) = &self.pid_file {
            format!("process of pid file {}", p.display())
        } else {
            "processes".into()
        }
    }

    /// Counts matches among `procs` (or reads the pid file). `Err` is the check's own problem.
    fn count<'a>(&self, procs: &'a [ProcInfo]) -> Result<(Vec<&'a ProcInfo>, String), String> {
        if let Some(name) = &self.name {
            return Ok((
                procs.iter().filter(|p| name_matches(p, name)).collect(),
                String::new(),
            ));
        }
        if let Some(re) = &self.cmdline {
            let rx = regex::Regex::new(re).map_err(|e| format!("cmdline regex: {e}"))?;
            return Ok((
                procs
                    .iter()
                    .filter(|p| rx.is_match(&p.cmdline.join(" ")))
                    .collect(),
                String::new(),
            ));
        }
        if let Some(file) = &self.pid_file {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok((Vec::new(), format!(" ({} does not exist)", file.display())));
                }
                Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
            };
            let pid: i32 = text.trim().parse().map_err(|_| {
                format!("{} does not hold a pid: {:?}", file.display(), text.trim())
            })?;
            let found: Vec<&ProcInfo> = procs.iter().filter(|p| p.pid == pid).collect();
            let note = if found.is_empty() {
                format!(" (pid {pid} is not running)")
            } else {
                format!(" (pid {pid})")
            };
            return Ok((found, note));
        }
        Err("no selector given".into())
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let job = tokio::task::spawn_blocking(list_processes);
        let procs = match tokio::time::timeout(internal_deadline(timeout), job).await {
            Ok(Ok(Ok(p))) => p,
            Ok(Ok(Err(e))) => return Outcome::new(Status::Unknown, e),
            Ok(Err(e)) => return Outcome::new(Status::Unknown, format!("listing processes: {e}")),
            Err(_) => return Outcome::new(Status::Unknown, "listing /proc timed out"),
        };
        let mut o = self.evaluate(&procs);
        o.duration = start.elapsed();
        tracing::debug!(what = %self.what(), status = %o.status, message = %o.message,
            "process check finished");
        o
    }

    pub(crate) fn evaluate(&self, procs: &[ProcInfo]) -> Outcome {
        let (found, note) = match self.count(procs) {
            Ok(x) => x,
            Err(e) => return Outcome::new(Status::Unknown, e),
        };
        let n = found.len() as u64;
        let rss: u64 = found.iter().map(|p| p.rss_bytes).sum();
        let bounds = match self.max {
            Some(max) => format!("{}..={max}", self.min),
            None => format!(">= {}", self.min),
        };
        let status = if n < self.min {
            Status::Critical
        } else if self.max.is_some_and(|m| n > m) {
            Status::Warning
        } else {
            Status::Ok
        };
        let mut count = Metric::new("count", n as f64, "");
        // Nagios ranges: CRITICAL below min, WARNING outside min..max.
        count.crit = format!("{}:", self.min);
        if let Some(max) = self.max {
            count.warn = format!("{}:{max}", self.min);
        }
        count.min = Some(0.0);
        let pids: Vec<String> = found.iter().take(10).map(|p| p.pid.to_string()).collect();
        let output = found
            .iter()
            .take(20)
            .map(|p| format!("{} {}", p.pid, crate::truncate(&p.cmdline.join(" "), 200)))
            .collect::<Vec<_>>()
            .join("\n");
        Outcome {
            status,
            message: format!(
                "{n} {} (expected {bounds}){note}{}",
                self.what(),
                if pids.is_empty() {
                    String::new()
                } else {
                    format!(", pids {}", pids.join(" "))
                }
            ),
            metrics: vec![count, Metric::new("rss", rss as f64, "B")],
            output,
            duration: Duration::ZERO,
            exit_code: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attachments, CheckSpec};

    fn check(v: serde_json::Value) -> CheckSpec {
        let s: CheckSpec = serde_json::from_value(v).expect("deserializes");
        s.validate().expect("valid");
        s
    }

    /// A real child process with a unique command line, killed on drop.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleeper(tag: &str) -> Child {
        Child(
            std::process::Command::new("sleep")
                .arg(format!("1000.{tag}"))
                .spawn()
                .expect("spawn sleep"),
        )
    }

    fn tag() -> String {
        format!(
            "{}{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        )
    }

    #[tokio::test]
    async fn cmdline_regex_counts_real_processes() {
        let t = tag();
        let re = format!(r"^sleep 1000\.{t}$");
        let spec = check(serde_json::json!({"type": "process", "cmdline": re, "min": 2, "max": 2}));
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
        assert!(
            o.message.starts_with("0 processes matching"),
            "{}",
            o.message
        );

        let _a = sleeper(&t);
        let _b = sleeper(&t);
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert_eq!(o.metrics[0].label, "count");
        assert_eq!(o.metrics[0].value, 2.0);
        assert!(o.metrics[1].value > 0.0, "rss {:?}", o.metrics[1]);

        let _c = sleeper(&t);
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Warning, "{}", o.message);
        assert!(o.message.contains("3 processes"), "{}", o.message);
    }

    #[tokio::test]
    async fn name_and_pid_file() {
        let t = tag();
        let child = sleeper(&t);
        let o = check(serde_json::json!({"type": "process", "name": "sleep"}))
            .run(&Attachments::default())
            .await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        let o = check(serde_json::json!({"type": "process", "name": "vigil-no-such-proc"}))
            .run(&Attachments::default())
            .await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);

        let dir = tempfile::tempdir().unwrap();
        let pf = dir.path().join("x.pid");
        std::fs::write(&pf, format!("{}\n", child.0.id())).unwrap();
        let spec = check(serde_json::json!({"type": "process", "pid_file": pf}));
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert!(o.message.contains(&format!("(pid {})", child.0.id())));
        drop(child);
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
        assert!(o.message.contains("is not running"), "{}", o.message);

        std::fs::remove_file(&pf).unwrap();
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Critical);
        assert!(o.message.contains("does not exist"), "{}", o.message);
        std::fs::write(&pf, "garbage").unwrap();
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Unknown);
    }

    #[test]
    fn argv0_base_name_matches() {
        let p = ProcInfo {
            pid: 1,
            comm: "postgres".into(),
            cmdline: vec!["/usr/lib/postgresql/15/bin/postgres".into(), "-D".into()],
            zombie: false,
            rss_bytes: 0,
        };
        assert!(name_matches(&p, "postgres"));
        let p2 = ProcInfo {
            comm: "python3".into(),
            cmdline: vec!["mineru-api: worker".into()],
            ..p
        };
        assert!(name_matches(&p2, "mineru-api"));
        assert!(!name_matches(&p2, "mineru"));
    }

    #[test]
    fn validation() {
        for bad in [
            serde_json::json!({"type": "process"}),
            serde_json::json!({"type": "process", "name": "a", "cmdline": "b"}),
            serde_json::json!({"type": "process", "cmdline": "("}),
            serde_json::json!({"type": "process", "name": "a", "min": 3, "max": 2}),
        ] {
            let s: CheckSpec = serde_json::from_value(bad.clone()).unwrap();
            assert!(s.validate().is_err(), "{bad}");
        }
        let err = serde_json::from_value::<CheckSpec>(serde_json::json!({
            "type": "process", "name": "a", "user": "root"}))
        .unwrap_err()
        .to_string();
        assert!(err.contains("pid_file"), "{err}");
    }
}
