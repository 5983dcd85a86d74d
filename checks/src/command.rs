//! `command` check: run a Monitoring-Plugins-compatible program (an argument vector, never a shell
//! string) in its own process group, with a deadline after which the whole group is killed.
//!
//! Exit code 0/1/2/3 maps to OK/WARNING/CRITICAL/UNKNOWN, anything else (and death by a signal)
//! to UNKNOWN. The first stdout line is the message (`text | perfdata`); later lines are long text
//! and may carry more perfdata after a `|`.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::perfdata::parse_plugin_output_struct;
use crate::{MAX_OUTPUT_BYTES, Outcome, SpecError, Status, grace, internal_deadline};

/// Most bytes kept from each of stdout and stderr; the rest is read and discarded so the program
/// never blocks on a full pipe.
pub const MAX_CAPTURE_BYTES: usize = 64 * 1024;

/// How long, after the program itself exited, its leftover children may keep the output pipes
/// open before the process group is killed.
const LINGER: Duration = Duration::from_secs(1);

/// Longest wait for the pipes to close and the child to be reaped after SIGKILL.
const AFTER_KILL: Duration = Duration::from_millis(500);

/// A program to run, as written under `check:` with `type: command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandCheck {
    /// Program and its arguments: `["/usr/lib/nagios/plugins/check_disk", "-w", "10%"]`. The
    /// program is looked up in `PATH` when it has no `/`. Never passed through a shell.
    pub argv: Vec<String>,
    /// Extra environment variables, added to the agent's own environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Directory to run in (default: the agent's working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<PathBuf>,
}

fn invalid(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

impl CommandCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        match self.argv.first() {
            None => return Err(invalid("argv", "must name a program")),
            Some(p) if p.trim().is_empty() => {
                return Err(invalid("argv", "program (argv[0]) is empty"));
            }
            Some(_) => {}
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err(invalid("argv", "arguments must not contain NUL bytes"));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(invalid(
                    "env",
                    format!("invalid variable name {k:?} (empty, or contains '=' or NUL)"),
                ));
            }
            if v.contains('\0') {
                return Err(invalid("env", format!("{k}: value contains a NUL byte")));
            }
        }
        if let Some(d) = &self.working_dir
            && d.as_os_str().is_empty()
        {
            return Err(invalid("working_dir", "is empty"));
        }
        Ok(())
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        let Some(program) = self.argv.first() else {
            return Outcome::new(Status::Unknown, "argv is empty: no program to run");
        };
        let start = Instant::now();
        let deadline = start + internal_deadline(timeout);
        // Clean-up after a kill uses at most half the grace, so the outcome is ours, not the
        // outer timeout's.
        let cleanup_end = deadline + grace(timeout) / 2;
        let after_kill = || (Instant::now() + AFTER_KILL).min(cleanup_end);

        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&self.argv[1..])
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(dir) = &self.working_dir {
            cmd.current_dir(dir);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Outcome::new(Status::Unknown, self.spawn_error(program, &e)),
        };
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return Outcome::new(
                Status::Unknown,
                format!("{program}: exited before it could be watched"),
            );
        };
        // Kills the whole group if this future is dropped (outer timeout, shutdown) before the
        // group was dealt with; `kill_on_drop` covers the leader itself.
        let mut group = GroupGuard::new(Pid::from_raw(pid));
        tracing::debug!(program, pid, ?timeout, "command check started");

        let mut stdout = Capture::default();
        let mut stderr = Capture::default();
        let (out_pipe, err_pipe) = (child.stdout.take(), child.stderr.take());
        let ended = {
            let readers = async {
                tokio::join!(stdout.drain(out_pipe), stderr.drain(err_pipe));
            };
            tokio::pin!(readers);
            let mut drained = false;
            let exit = loop {
                tokio::select! {
                    r = child.wait() => break Some(r),
                    () = &mut readers, if !drained => drained = true,
                    () = tokio::time::sleep_until(deadline) => break None,
                }
            };
            match exit {
                None => {
                    // Deadline: the leader is not reaped yet, so the group id is still ours.
                    group.kill();
                    let until = after_kill();
                    let _ = tokio::time::timeout_at(until, child.wait()).await;
                    if !drained {
                        let _ = tokio::time::timeout_at(until, &mut readers).await;
                    }
                    Ended::TimedOut
                }
                Some(Err(e)) => {
                    group.kill();
                    Ended::WaitFailed(e)
                }
                Some(Ok(status)) => {
                    // The program exited; children it left behind may still hold the pipes.
                    if !drained {
                        let linger = LINGER.min(deadline.saturating_duration_since(Instant::now()));
                        drained = tokio::time::timeout(linger, &mut readers).await.is_ok();
                    }
                    // Leftover members of the group are killed: a check must not leak processes.
                    // (The group id cannot have been reused while any member is alive; with none
                    // left this is ESRCH.)
                    group.kill();
                    if !drained {
                        let _ = tokio::time::timeout_at(after_kill(), &mut readers).await;
                    }
                    Ended::Exited(status)
                }
            }
        };
        group.disarm();

        let out_text = String::from_utf8_lossy(&stdout.buf).into_owned();
        let err_text = String::from_utf8_lossy(&stderr.buf).into_owned();
        let parsed = parse_plugin_output_struct(&out_text);
        let mut excerpt = out_text.clone();
        if stdout.total > stdout.buf.len() as u64 {
            excerpt.push_str(&format!(
                "\n…[{} bytes of stdout discarded]",
                stdout.total - stdout.buf.len() as u64
            ));
        }
        if !err_text.trim().is_empty() {
            excerpt.push_str("\n--- stderr ---\n");
            excerpt.push_str(&err_text);
        }
        let first_stderr_line = err_text.lines().map(str::trim).find(|l| !l.is_empty());
        let plugin_message = if !parsed.message.is_empty() {
            Some(parsed.message.clone())
        } else {
            first_stderr_line.map(|l| format!("(stderr) {l}"))
        };

        let exit_code = match &ended {
            Ended::Exited(es) => es.code(),
            _ => None,
        };
        let (status, message) = match ended {
            Ended::TimedOut => {
                let took = humantime::format_duration(round_ms(start.elapsed()));
                let mut msg = format!("{program}: timed out after {took}, process group killed");
                if let Some(m) = &plugin_message {
                    msg.push_str(&format!(" (last output: {m})"));
                }
                tracing::warn!(
                    program,
                    pid,
                    ?timeout,
                    "command check timed out, process group killed"
                );
                (Status::Unknown, msg)
            }
            Ended::WaitFailed(e) => (
                Status::Unknown,
                format!("{program}: waiting for the program failed: {e}"),
            ),
            Ended::Exited(es) => exit_outcome(program, es, plugin_message),
        };
        tracing::debug!(program, pid, status = %status, "command check finished");
        Outcome {
            status,
            message: one_line(&message),
            metrics: parsed.metrics,
            output: crate::excerpt(&excerpt, MAX_OUTPUT_BYTES),
            duration: start.elapsed(),
            exit_code,
        }
    }

    fn spawn_error(&self, program: &str, e: &std::io::Error) -> String {
        use std::io::ErrorKind;
        if let Some(dir) = &self.working_dir
            && !dir.is_dir()
        {
            return format!(
                "working_dir {} does not exist or is not a directory",
                dir.display()
            );
        }
        match e.kind() {
            ErrorKind::NotFound => format!("program not found: {program}"),
            ErrorKind::PermissionDenied => {
                format!("program not executable: {program} (permission denied)")
            }
            _ => format!("cannot start {program}: {e}"),
        }
    }
}

enum Ended {
    Exited(ExitStatus),
    TimedOut,
    WaitFailed(std::io::Error),
}

fn exit_outcome(program: &str, es: ExitStatus, plugin_message: Option<String>) -> (Status, String) {
    let signal = es.signal().map(|s| {
        Signal::try_from(s).map_or_else(|_| format!("signal {s}"), |s| s.as_str().to_string())
    });
    plugin_outcome(program, es.code(), signal.as_deref(), plugin_message)
}

/// The one rule from a plugin's end to an outcome (Monitoring-Plugins conventions), for a
/// program run here or over SSH: exit 0/1/2/3 are OK/WARNING/CRITICAL/UNKNOWN with the plugin's
/// message; another code or a signal is UNKNOWN and says so.
pub fn plugin_outcome(
    program: &str,
    exit_code: Option<i32>,
    signal: Option<&str>,
    plugin_message: Option<String>,
) -> (Status, String) {
    if let Some(code) = exit_code {
        let status = Status::from_exit_code(code);
        let msg = match (plugin_message, code) {
            (Some(m), 0..=3) => m,
            (Some(m), _) => format!("exit code {code}: {m}"),
            (None, _) => format!("{program}: exit code {code}, no output"),
        };
        return (status, msg);
    }
    let mut msg = format!("{program}: killed by {}", signal.unwrap_or("unknown cause"));
    if let Some(m) = plugin_message {
        msg.push_str(&format!(" (last output: {m})"));
    }
    (Status::Unknown, msg)
}

fn one_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    crate::excerpt(line, 1024)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}

/// Bounded capture of one pipe.
#[derive(Default)]
struct Capture {
    buf: Vec<u8>,
    /// Bytes read in all, kept or not.
    total: u64,
}

impl Capture {
    /// Reads `pipe` to its end, keeping the first [`MAX_CAPTURE_BYTES`].
    async fn drain<R: AsyncRead + Unpin>(&mut self, pipe: Option<R>) {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            match pipe.read(&mut chunk).await {
                Ok(0) => return,
                Ok(n) => {
                    self.total += n as u64;
                    let room = MAX_CAPTURE_BYTES.saturating_sub(self.buf.len());
                    self.buf.extend_from_slice(&chunk[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "command check: reading a pipe failed");
                    return;
                }
            }
        }
    }
}

/// Sends SIGKILL to a process group when asked, or when dropped while still armed.
struct GroupGuard {
    pgid: Pid,
    armed: bool,
}

impl GroupGuard {
    fn new(pgid: Pid) -> Self {
        GroupGuard { pgid, armed: true }
    }

    fn kill(&self) {
        match killpg(self.pgid, Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(pgid = self.pgid.as_raw(), error = %e, "cannot kill process group")
            }
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            tracing::debug!(
                pgid = self.pgid.as_raw(),
                "command check dropped, killing its process group"
            );
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;
    use crate::{Attachments, CheckKind, CheckSpec};

    fn script(dir: &Path, name: &str, body: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_string()
    }

    fn check(argv: &[&str]) -> CommandCheck {
        CommandCheck {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            working_dir: None,
        }
    }

    async fn run(argv: &[&str], timeout: Duration) -> Outcome {
        let c = check(argv);
        c.validate().unwrap();
        c.run(timeout).await
    }

    #[tokio::test]
    async fn exit_codes_map_to_status() {
        let dir = tempfile::tempdir().unwrap();
        for (code, status) in [
            (0, Status::Ok),
            (1, Status::Warning),
            (2, Status::Critical),
            (3, Status::Unknown),
            (4, Status::Unknown),
        ] {
            let p = script(
                dir.path(),
                &format!("exit{code}"),
                &format!("echo 'STATE {code} | a={code}'\nexit {code}"),
            );
            let o = run(&[&p], Duration::from_secs(10)).await;
            assert_eq!(o.status, status, "exit {code}: {o:?}");
            assert_eq!(o.exit_code, Some(code), "the exit code as it was");
            if code <= 3 {
                assert_eq!(o.message, format!("STATE {code}"));
            } else {
                assert_eq!(o.message, "exit code 4: STATE 4");
            }
            assert_eq!(o.metrics.len(), 1);
            assert_eq!(o.metrics[0].value, f64::from(code));
        }
    }

    #[tokio::test]
    async fn perfdata_and_long_output_are_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(
            dir.path(),
            "plugin",
            "echo \"DISK WARNING - $1 | '/ usage'=81%;80;90;0;100\"\n\
             echo 'detail line'\n\
             echo 'more | /home=10GB;;;0;100 load=0.5'\n\
             echo 'to stderr' >&2\n\
             exit 1",
        );
        let o = run(&[&p, "arg with spaces"], Duration::from_secs(10)).await;
        assert_eq!(o.status, Status::Warning);
        assert_eq!(o.message, "DISK WARNING - arg with spaces");
        let labels: Vec<_> = o.metrics.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["/ usage", "/home", "load"]);
        assert_eq!(o.metrics[0].warn, "80");
        assert_eq!(o.metrics[1].unit, "GB");
        assert!(o.output.contains("detail line"), "{}", o.output);
        assert!(
            o.output.contains("--- stderr ---\nto stderr"),
            "{}",
            o.output
        );
    }

    #[tokio::test]
    async fn env_and_working_dir_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), "envtest", "echo \"$VIGIL_TEST_VAR in $(pwd)\"");
        let mut c = check(&[&p]);
        c.env.insert("VIGIL_TEST_VAR".into(), "hello".into());
        c.working_dir = Some(dir.path().to_path_buf());
        let o = c.run(Duration::from_secs(10)).await;
        let pwd = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.message, format!("hello in {}", pwd.display()));
    }

    #[tokio::test]
    async fn huge_output_is_bounded_and_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        // 50 MiB on stdout and 8 MiB on stderr: far more than any pipe buffer.
        let p = script(
            dir.path(),
            "yes",
            "echo 'OK big | x=1'\n\
             head -c 8388608 /dev/zero >&2\n\
             head -c 52428800 /dev/zero | tr '\\0' 'y'\n\
             exit 0",
        );
        let o = run(&[&p], Duration::from_secs(60)).await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert_eq!(o.message, "OK big");
        assert_eq!(o.metrics.len(), 1);
        assert!(
            o.output.len() <= MAX_OUTPUT_BYTES + 32,
            "output {} bytes",
            o.output.len()
        );
        assert!(o.output.ends_with("…[truncated]"));
    }

    #[test]
    fn capture_keeps_only_the_bound() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let data = vec![b'a'; MAX_CAPTURE_BYTES * 3 + 7];
        let mut cap = Capture::default();
        rt.block_on(cap.drain(Some(&data[..])));
        assert_eq!(cap.buf.len(), MAX_CAPTURE_BYTES);
        assert_eq!(cap.total, data.len() as u64);
    }

    fn alive(pid: i32) -> bool {
        // Signal 0 probes for existence; a zombie still counts, so also look at /proc state.
        if nix::sys::signal::kill(Pid::from_raw(pid), None).is_err() {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    /// Waits (polling, bounded) until `pid` is gone; returns whether it went.
    async fn gone_within(pid: i32, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !alive(pid)
    }

    fn read_pid(path: &Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A plugin that hangs and has a hanging child: the script writes the child's pid, then
    /// both sleep "forever".
    fn hanging_script(dir: &Path) -> (String, PathBuf) {
        let pidfile = dir.join("child.pid");
        let p = script(
            dir,
            "hang",
            &format!(
                "sleep 1000 &\necho $! > {pf}.tmp\nmv {pf}.tmp {pf}\necho 'still working'\nsleep 1000",
                pf = pidfile.display()
            ),
        );
        (p, pidfile)
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let (p, pidfile) = hanging_script(dir.path());
        let o = run(&[&p], Duration::from_secs(2)).await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert!(o.message.contains("timed out after"), "{}", o.message);
        assert!(o.message.contains("killed"), "{}", o.message);
        assert!(o.message.contains("still working"), "{}", o.message);
        let child = read_pid(&pidfile);
        assert!(
            gone_within(child, Duration::from_secs(5)).await,
            "child {child} survived"
        );
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let (p, pidfile) = hanging_script(dir.path());
        let c = check(&[&p]);
        // Run with a long internal deadline but drop the future once the child pid is known.
        // Boxed so that `drop` really drops the future (a stack-pinned one lives to scope end).
        let mut fut = Box::pin(c.run(Duration::from_secs(3600)));
        let pid_written = async {
            while !pidfile.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            o = &mut fut => panic!("run finished early: {o:?}"),
            r = tokio::time::timeout(Duration::from_secs(10), pid_written) => {
                r.expect("the script wrote its child's pid");
            }
        }
        let child = read_pid(&pidfile);
        assert!(alive(child), "child should run while the check runs");
        drop(fut);
        assert!(
            gone_within(child, Duration::from_secs(5)).await,
            "child {child} survived drop"
        );
    }

    #[tokio::test]
    async fn spec_run_reports_unknown_before_the_outer_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (p, pidfile) = hanging_script(dir.path());
        let spec = CheckSpec {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(2),
            kind: CheckKind::Command(check(&[&p])),
        };
        spec.validate().unwrap();
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert!(o.message.contains("process group killed"), "{}", o.message);
        let child = read_pid(&pidfile);
        assert!(gone_within(child, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn leftover_background_children_are_killed_after_exit() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        // The child keeps no pipe open, so the plugin finishes at once.
        let p = script(
            dir.path(),
            "bg",
            &format!(
                "sleep 1000 >/dev/null 2>&1 &\necho $! > {}\necho OK",
                pidfile.display()
            ),
        );
        let o = run(&[&p], Duration::from_secs(10)).await;
        assert_eq!(o.status, Status::Ok);
        let child = read_pid(&pidfile);
        assert!(gone_within(child, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn killed_by_signal_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), "segv", "echo 'about to die'\nkill -KILL $$");
        let o = run(&[&p], Duration::from_secs(10)).await;
        assert_eq!(o.status, Status::Unknown);
        assert!(o.message.contains("killed by SIGKILL"), "{}", o.message);
        assert!(o.message.contains("about to die"), "{}", o.message);
    }

    #[tokio::test]
    async fn missing_and_non_executable_programs() {
        let o = run(
            &["/nonexistent/check_vigil_nothing"],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(o.status, Status::Unknown);
        assert_eq!(
            o.message,
            "program not found: /nonexistent/check_vigil_nothing"
        );

        let o = run(
            &["check_vigil_not_in_path_anywhere"],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(o.status, Status::Unknown);
        assert!(
            o.message.contains("check_vigil_not_in_path_anywhere"),
            "{}",
            o.message
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noexec");
        std::fs::write(&path, "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let o = run(&[path.to_str().unwrap()], Duration::from_secs(5)).await;
        assert_eq!(o.status, Status::Unknown);
        assert!(
            o.message.starts_with("program not executable"),
            "{}",
            o.message
        );

        let mut c = check(&["/bin/true"]);
        c.working_dir = Some(dir.path().join("missing-dir"));
        let o = c.run(Duration::from_secs(5)).await;
        assert_eq!(o.status, Status::Unknown);
        assert!(o.message.contains("working_dir"), "{}", o.message);
    }

    #[tokio::test]
    async fn no_stdout_uses_stderr_or_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), "err", "echo 'boom: config missing' >&2\nexit 2");
        let o = run(&[&p], Duration::from_secs(5)).await;
        assert_eq!(o.status, Status::Critical);
        assert_eq!(o.message, "(stderr) boom: config missing");
        let p = script(dir.path(), "silent", "exit 2");
        let o = run(&[&p], Duration::from_secs(5)).await;
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message.ends_with("exit code 2, no output"),
            "{}",
            o.message
        );
    }

    #[test]
    fn validate_rejects_bad_specs() {
        assert!(check(&[]).validate().is_err());
        assert!(check(&[""]).validate().is_err());
        assert!(check(&["a\0b"]).validate().is_err());
        let mut c = check(&["/bin/true"]);
        c.env.insert("A=B".into(), "x".into());
        assert!(c.validate().is_err());
        assert!(check(&["/bin/true", "-x"]).validate().is_ok());
    }

    #[test]
    fn spec_deserializes_and_rejects_unknown_fields() {
        let spec: CheckSpec = serde_json::from_value(serde_json::json!({
            "type": "command",
            "interval": "1m",
            "timeout": "15s",
            "argv": ["/usr/lib/nagios/plugins/check_load", "-w", "5,4,3", "-c", "10,8,6"],
            "env": {"LC_ALL": "C"},
            "working_dir": "/tmp"
        }))
        .unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.timeout, Duration::from_secs(15));
        let CheckKind::Command(c) = &spec.kind else {
            panic!("{spec:?}")
        };
        assert_eq!(c.argv.len(), 5);
        assert_eq!(c.env["LC_ALL"], "C");

        let err = serde_json::from_value::<CheckSpec>(serde_json::json!({
            "type": "command", "argv": ["x"], "shell": "x; y"
        }))
        .unwrap_err();
        assert!(err.to_string().contains("shell"), "{err}");
        // A shell string is not an argument vector.
        assert!(
            serde_json::from_value::<CheckSpec>(serde_json::json!({
                "type": "command", "argv": "check_load -w 5"
            }))
            .is_err()
        );
    }

    #[test]
    fn internal_deadline_leaves_room() {
        assert_eq!(
            internal_deadline(Duration::from_secs(10)),
            Duration::from_millis(9500)
        );
        assert_eq!(
            internal_deadline(Duration::from_secs(1)),
            Duration::from_millis(900)
        );
        assert!(internal_deadline(Duration::from_millis(1)) <= Duration::from_millis(1));
    }
}
