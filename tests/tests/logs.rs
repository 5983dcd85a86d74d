//! Logs for machines and for people: a real `vigil-agent` writing to a file (not a terminal)
//! writes no ANSI escape codes, and with `--log-format json` (or `VIGIL_LOG_FORMAT=json`) every
//! line is one JSON object with its level and fields, a hostile value kept inside its field.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use vigil_tests::{Workspace, binary, init, wait_for};

/// Starts an agent aimed at a collector that is not there, its output in `log`, until it has
/// logged `lines` lines; returns the log.
async fn agent_log(ws: &Workspace, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = ws.write_agent("logs", "n1", "n1", nobody)?;
    let log = ws
        .path()
        .join(format!("agent-{}.log", args.len() + env.len()));
    let out = std::fs::File::create(&log)?;
    let mut child = tokio::process::Command::new(binary("vigil-agent")?)
        .args(args)
        .arg("--config")
        .arg(&config)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .context("start vigil-agent")?;
    let text = wait_for("a few log lines", Duration::from_secs(30), || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log)?;
            Ok((text.contains("cannot connect to the collector")).then_some(text))
        }
    })
    .await?;
    child.kill().await?;
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_escape_codes_in_a_file_and_json_on_request() -> anyhow::Result<()> {
    init();
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let text = agent_log(&ws, &[], &[]).await?;
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a log file:\n{text}"
    );
    assert!(text.contains(" INFO "), "{text}");

    for (args, env) in [
        (vec!["--log-format", "json"], vec![]),
        (vec![], vec![("VIGIL_LOG_FORMAT", "json")]),
    ] {
        let text = agent_log(&ws, &args, &env).await?;
        assert!(!text.contains('\u{1b}'), "{text}");
        let mut n = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
            assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
            n += 1;
        }
        assert!(n >= 2, "{text}");
        assert!(text.contains("\"message\":\"agent started\""), "{text}");
    }
    Ok(())
}
