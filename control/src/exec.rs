//! Carries out a [`Plan`]: argument vectors run one after another (never through a shell), each
//! in its own process group that is killed as a whole at the step timeout or when the run is
//! dropped; containers go to [`crate::docker`].
//!
//! A step that exits normally is not killed afterwards, even if it left processes behind in its
//! group: a start script that puts a server in the background is the usual case. Output of the
//! steps (stdout and stderr through one pipe, so in the order written) is bounded: the last
//! [`MAX_OUTPUT`] bytes of the step that ran last and the last [`EARLIER_STEP_OUTPUT`] bytes of each
//! step before it, each section headed by `$ argv...`.

use std::io;
use std::os::fd::OwnedFd;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::{Execution, How, Plan};

/// Most bytes of output kept for the step that ran last (its tail: that is where a failing start
/// script says why).
pub const MAX_OUTPUT: usize = 8 * 1024;
/// Most bytes of output kept for each step before the last one.
pub const EARLIER_STEP_OUTPUT: usize = 1024;
/// How long output is still read after a step exited, for processes it left behind that keep the
/// pipe open.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Why a step did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("empty command (no program)")]
    Empty,
    #[error("{program}: program not found")]
    NotFound { program: String },
    #[error("{program}: cannot run: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("exited with code {0}")]
    Exit(i32),
    #[error("killed by signal {0}")]
    Signal(String),
    #[error("timed out after {0}; its process group was killed")]
    TimedOut(String),
    #[error("lost track of the process: {0}")]
    Wait(#[source] io::Error),
}

/// Runs `plan` and reports what happened; never panics, every failure is in the [`Execution`].
pub async fn execute(plan: &Plan) -> Execution {
    match &plan.how {
        How::Steps { steps } => run_steps(steps, plan.step_timeout).await,
        How::Container { name } => {
            crate::docker::execute_container(plan.action, name, plan.step_timeout).await
        }
    }
}

/// One step's section of the output.
struct Section {
    header: String,
    body: Tail,
    trailer: Option<String>,
}

/// Runs `steps` in order, each limited to `step_timeout`, stopping at the first failure.
pub async fn run_steps(steps: &[Vec<String>], step_timeout: Duration) -> Execution {
    let started = Instant::now();
    let total = steps.len();
    let mut sections: Vec<Section> = Vec::with_capacity(total);
    let mut exit_code = -1;
    let mut timed_out = false;
    let mut success = total > 0;
    for (i, argv) in steps.iter().enumerate() {
        let mut body = Tail::new(MAX_OUTPUT);
        let result = run_step(argv, step_timeout, &mut body).await;
        let mut section = Section {
            header: format!("$ {}", display_argv(argv)),
            body,
            trailer: None,
        };
        match result {
            Ok(()) => {
                exit_code = 0;
                sections.push(section);
            }
            Err(e) => {
                exit_code = match e {
                    StepError::Exit(code) => code,
                    _ => -1,
                };
                timed_out = matches!(e, StepError::TimedOut(_));
                success = false;
                tracing::debug!(step = i + 1, steps = total, error = %e, "step failed");
                section.trailer = Some(format!("step {}/{total}: {e}", i + 1));
                sections.push(section);
                break;
            }
        }
    }
    let mut output = String::new();
    if total == 0 {
        output.push_str("the plan has no steps");
    }
    let last = sections.len().saturating_sub(1);
    for (i, s) in sections.iter().enumerate() {
        output.push_str(&s.header);
        output.push('\n');
        let body = s.body.render(if i == last {
            MAX_OUTPUT
        } else {
            EARLIER_STEP_OUTPUT
        });
        output.push_str(&body);
        if !body.is_empty() && !body.ends_with('\n') {
            output.push('\n');
        }
        if let Some(t) = &s.trailer {
            output.push_str(t);
            output.push('\n');
        }
    }
    Execution {
        success,
        exit_code,
        output,
        timed_out,
        duration: started.elapsed(),
    }
}

/// Kills a process group when dropped while armed: the step timed out or its run was cancelled.
struct GroupKill {
    pgid: Option<Pid>,
}

impl GroupKill {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // ESRCH: the group is already empty.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        if self.pgid.is_some() {
            tracing::debug!(pgid = ?self.pgid, "step cancelled; killing its process group");
        }
        self.kill();
    }
}

/// Starts `argv` in a new process group with stdout and stderr on one pipe.
fn spawn(argv: &[String]) -> Result<(Child, pipe::Receiver), StepError> {
    let program = argv
        .first()
        .filter(|p| !p.is_empty())
        .ok_or(StepError::Empty)?;
    let spawn_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            StepError::NotFound {
                program: program.clone(),
            }
        } else {
            StepError::Spawn {
                program: program.clone(),
                source,
            }
        }
    };
    let (reader, writer) = io::pipe().map_err(spawn_err)?;
    let writer2 = writer.try_clone().map_err(spawn_err)?;
    // The command (and with it our copies of the pipe's write end) is dropped at the end of this
    // function, so the reader sees end-of-file once the step and what it started are gone.
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer2))
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(spawn_err)?;
    let rx = pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).map_err(spawn_err)?;
    Ok((child, rx))
}

/// Runs one step, appending its output to `out`.
async fn run_step(argv: &[String], timeout: Duration, out: &mut Tail) -> Result<(), StepError> {
    let (mut child, mut rx) = spawn(argv)?;
    let mut guard = GroupKill {
        pgid: child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
    };
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    let mut eof = false;
    let mut status: Option<io::Result<ExitStatus>> = None;
    let mut timed_out = false;
    let mut drain_until = deadline;
    loop {
        if eof && status.is_some() {
            break;
        }
        tokio::select! {
            r = rx.read(&mut buf), if !eof => match r {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => out.push(&buf[..n]),
            },
            s = child.wait(), if status.is_none() => {
                // The leader is reaped: its pid (the group id) may be reused from now on.
                guard.disarm();
                status = Some(s);
                drain_until = Instant::now() + DRAIN_GRACE;
            }
            _ = tokio::time::sleep_until(deadline), if status.is_none() => {
                timed_out = true;
                guard.kill();
                status = Some(child.wait().await);
                drain_until = Instant::now() + DRAIN_GRACE;
            }
            _ = tokio::time::sleep_until(drain_until), if status.is_some() => break,
        }
    }
    let status = status.unwrap_or_else(|| Err(io::Error::other("no exit status")));
    if timed_out {
        return Err(StepError::TimedOut(
            humantime::format_duration(timeout).to_string(),
        ));
    }
    let status = status.map_err(StepError::Wait)?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(StepError::Exit(code)),
        None => {
            use std::os::unix::process::ExitStatusExt;
            let sig = status.signal().unwrap_or(0);
            let name = Signal::try_from(sig)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| sig.to_string());
            Err(StepError::Signal(name))
        }
    }
}

/// The last bytes written, and how many came before them.
pub(crate) struct Tail {
    buf: Vec<u8>,
    limit: usize,
    dropped: u64,
}

impl Tail {
    pub(crate) fn new(limit: usize) -> Self {
        Tail {
            buf: Vec::new(),
            limit,
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        // Trim in chunks, not on every write.
        if self.buf.len() > 2 * self.limit {
            let cut = self.buf.len() - self.limit;
            self.buf.drain(..cut);
            self.dropped += cut as u64;
        }
    }

    /// The last `limit` bytes (at most the tail's own limit) as text, preceded by a note of how
    /// much was left out.
    pub(crate) fn render(&self, limit: usize) -> String {
        let limit = limit.min(self.limit);
        let mut start = self.buf.len().saturating_sub(limit);
        let mut dropped = self.dropped + start as u64;
        // Do not start in the middle of a UTF-8 character.
        while start < self.buf.len() && start > 0 && (self.buf[start] & 0xC0) == 0x80 {
            start += 1;
            dropped += 1;
        }
        let text = String::from_utf8_lossy(&self.buf[start..]);
        if dropped > 0 {
            format!("[... {dropped} bytes of output omitted ...]\n{text}")
        } else {
            text.into_owned()
        }
    }
}

/// `argv` as an operator would type it (arguments quoted where a shell would need it); for
/// display only, never executed.
pub fn display_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./:=,@%+".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Action;

    fn sv(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    fn sh(script: &str) -> Vec<String> {
        sv(&["/bin/sh", "-c", script])
    }

    /// True when `pid` no longer runs (gone, or a zombie nobody has reaped yet).
    fn gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    async fn wait_gone(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone(pid) {
            assert!(Instant::now() < deadline, "process {pid} still runs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn read_pid(path: &std::path::Path) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = std::fs::read_to_string(path)
                && let Ok(pid) = s.trim().parse()
            {
                return pid;
            }
            assert!(Instant::now() < deadline, "no pid in {}", path.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn steps_succeed_with_output_of_each_under_its_command() {
        let e = run_steps(
            &[
                sh("echo one; echo err >&2; echo two"),
                sv(&["echo", "it's"]),
            ],
            Duration::from_secs(10),
        )
        .await;
        assert!(e.success, "{e:?}");
        assert_eq!(e.exit_code, 0);
        assert!(!e.timed_out);
        assert_eq!(
            e.output,
            "$ /bin/sh -c 'echo one; echo err >&2; echo two'\none\nerr\ntwo\n$ echo 'it'\\''s'\nit's\n"
        );
    }

    #[tokio::test]
    async fn stops_at_the_first_failing_step_with_its_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let e = run_steps(
            &[
                sh("echo starting"),
                sh("echo 'config broken' >&2; exit 3"),
                sv(&["touch", marker.to_str().unwrap()]),
            ],
            Duration::from_secs(10),
        )
        .await;
        assert!(!e.success);
        assert_eq!(e.exit_code, 3);
        assert!(!e.timed_out);
        assert!(
            e.output
                .contains("config broken\nstep 2/3: exited with code 3"),
            "{}",
            e.output
        );
        assert!(!e.output.contains("touch"), "{}", e.output);
        assert!(!marker.exists(), "the step after the failure ran");
    }

    #[tokio::test]
    async fn missing_program_is_named() {
        let e = run_steps(
            &[sv(&["true"]), sv(&["vigil-no-such-program", "x"])],
            Duration::from_secs(10),
        )
        .await;
        assert!(!e.success);
        assert_eq!(e.exit_code, -1);
        assert!(
            e.output
                .contains("step 2/2: vigil-no-such-program: program not found"),
            "{}",
            e.output
        );
        let e = run_steps(&[vec![]], Duration::from_secs(1)).await;
        assert!(!e.success);
        assert!(e.output.contains("step 1/1: empty command"), "{}", e.output);
        let e = run_steps(&[], Duration::from_secs(1)).await;
        assert!(!e.success);
    }

    #[tokio::test]
    async fn a_signal_is_a_failure() {
        let e = run_steps(&[sh("kill -TERM $$")], Duration::from_secs(10)).await;
        assert!(!e.success);
        assert_eq!(e.exit_code, -1);
        assert!(
            e.output.contains("killed by signal SIGTERM"),
            "{}",
            e.output
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "echo before; sleep 60 & echo $! > {}; wait",
            pidfile.display()
        );
        let started = Instant::now();
        let e = run_steps(&[sh(&script)], Duration::from_millis(500)).await;
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!e.success);
        assert!(e.timed_out);
        assert_eq!(e.exit_code, -1);
        assert!(e.output.contains("before\n"), "{}", e.output);
        assert!(
            e.output.contains("step 1/1: timed out after 500ms"),
            "{}",
            e.output
        );
        // The grandchild (sleep, in the step's group) is gone too.
        wait_gone(read_pid(&pidfile).await).await;
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let plan = Plan {
            action: Action::Restart,
            how: How::Steps {
                steps: vec![sh(&script)],
            },
            step_timeout: Duration::from_secs(60),
        };
        let mut run = Box::pin(execute(&plan));
        let pid = tokio::select! {
            e = &mut run => panic!("finished early: {e:?}"),
            pid = read_pid(&pidfile) => pid,
        };
        assert!(!gone(pid));
        drop(run);
        wait_gone(pid).await;
    }

    #[tokio::test]
    async fn output_keeps_the_tail_and_never_blocks_the_step() {
        // About 100 KiB: more than a pipe buffer, so the step would hang if nobody read.
        let e = run_steps(
            &[
                sh("i=0; while [ $i -lt 3000 ]; do echo early-$i; i=$((i+1)); done"),
                sh("i=0; while [ $i -lt 10000 ]; do echo line-$i; i=$((i+1)); done; exit 1"),
            ],
            Duration::from_secs(30),
        )
        .await;
        assert!(!e.success);
        assert_eq!(e.exit_code, 1);
        assert!(
            e.output.len() <= MAX_OUTPUT + EARLIER_STEP_OUTPUT + 400,
            "{} bytes",
            e.output.len()
        );
        assert!(e.output.contains("early-2999\n"));
        assert!(!e.output.contains("early-0\n"));
        assert!(e.output.contains("line-9999\nstep 2/2: exited with code 1"));
        assert!(!e.output.contains("line-0\n"));
        assert!(e.output.contains("bytes of output omitted"), "{}", e.output);
    }

    #[tokio::test]
    async fn a_background_server_left_by_a_step_survives_and_does_not_hold_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // Keeps the output pipe open: the step must still end right after its shell exits.
        let script = format!("sleep 60 & echo $! > {}; echo started", pidfile.display());
        let e = run_steps(&[sh(&script)], Duration::from_secs(30)).await;
        assert!(e.success, "{e:?}");
        assert!(e.duration < Duration::from_secs(5), "{:?}", e.duration);
        let pid = read_pid(&pidfile).await;
        assert!(!gone(pid), "the started server was killed");
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }

    #[test]
    fn tail_skips_a_cut_character() {
        let mut t = Tail::new(4);
        t.push("aé€".as_bytes()); // 1 + 2 + 3 bytes
        assert_eq!(t.render(4), "[... 3 bytes of output omitted ...]\n€");
        let mut t = Tail::new(100);
        t.push(b"ok");
        assert_eq!(t.render(100), "ok");
    }
}
