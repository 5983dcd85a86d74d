//! Refused TLS handshakes on the agent port: each logged with its real reason and the peer, and
//! a flood of them logged in a bounded number of lines; values sent by an agent are logged
//! escaped, so that they cannot forge log lines (the collector binary's own log).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use vigil_proto::v1::agent_service_client::AgentServiceClient;
use vigil_proto::v1::{self, AgentMessage, agent_message::Msg as In};
use vigil_tests::{Workspace, init, pg, wait_for};

/// The collector binary with its log in a file, killed (SIGKILL) on drop.
struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_collector(config: &Path, log: &Path) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(log)?;
    Ok(Proc(
        std::process::Command::new(vigil_tests::binary("vigil-collector")?)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?,
    ))
}

fn refusals(log: &Path, reason: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("TLS handshake refused") && l.contains(reason))
        .count()
}

/// Sends `bytes` and waits until the collector closes the connection (it logs a refusal
/// before it closes).
async fn send_and_wait_closed(port: u16, bytes: &[u8]) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(bytes).await?;
    let mut buf = [0u8; 256];
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_are_logged_with_their_reason_and_rate_limited() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let path = ws.write_collector(&db.url, &["n1"])?;
    let text = std::fs::read_to_string(&path)?.replace(
        "grpc_listen: 127.0.0.1:0",
        &format!("grpc_listen: 127.0.0.1:{port}"),
    );
    std::fs::write(&path, text)?;
    let log = ws.path().join("collector.log");
    let _collector = spawn_collector(&path, &log)?;

    // A TCP connect that closes at once (the readiness probe itself): a port scan.
    wait_for("the agent port", Duration::from_secs(60), || async {
        Ok(TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop))
    })
    .await?;
    wait_for("the port-scan line", Duration::from_secs(15), || async {
        Ok((refusals(&log, "closed_before_handshake") >= 1).then_some(()))
    })
    .await?;

    // A connection that sends nothing and stays open: the handshake times out.
    let silent = TcpStream::connect(("127.0.0.1", port)).await?;
    send_and_wait_closed(port, b"\x00\x01\x02garbage\r\n").await?;
    send_and_wait_closed(port, b"GET / HTTP/1.1\r\nHost: vigil\r\n\r\n").await?;
    assert_eq!(refusals(&log, "reason=not_tls"), 1, "{}", read(&log));
    assert_eq!(refusals(&log, "reason=plain_http"), 1, "{}", read(&log));
    wait_for("the timeout line", Duration::from_secs(30), || async {
        Ok((refusals(&log, "reason=handshake_timeout") >= 1).then_some(()))
    })
    .await?;
    drop(silent);

    // 200 more garbage connections: still one line for that reason within the minute.
    for _ in 0..200 {
        send_and_wait_closed(port, b"\x00garbage").await?;
    }
    let text = read(&log);
    assert_eq!(refusals(&log, "reason=not_tls"), 1, "{text}");
    let refused_lines = text
        .lines()
        .filter(|l| l.contains("TLS handshake refused"))
        .count();
    assert!(refused_lines <= 6, "{refused_lines} lines:\n{text}");
    // Each line names its peer, and none blames the CA for what is not a certificate problem.
    for l in text.lines().filter(|l| l.contains("TLS handshake refused")) {
        assert!(l.contains("peer=127.0.0.1:"), "{l}");
        assert!(!l.contains("CA"), "{l}");
    }
    Ok(())
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// A command id with a newline, as an agent may send it: logged as one escaped field, never as a
/// line of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_from_agents_cannot_forge_log_lines() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let path = ws.write_collector(&db.url, &["n1"])?;
    let text = std::fs::read_to_string(&path)?.replace(
        "grpc_listen: 127.0.0.1:0",
        &format!("grpc_listen: 127.0.0.1:{port}"),
    );
    std::fs::write(&path, text)?;
    let log = ws.path().join("collector.log");
    let _collector = spawn_collector(&path, &log)?;

    let ca = std::fs::read(ws.certs().join("ca.pem"))?;
    let cert = std::fs::read(ws.certs().join("n1.pem"))?;
    let key = std::fs::read(ws.certs().join("n1.key"))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost")
        .identity(Identity::from_pem(cert, key));
    let endpoint = Channel::from_shared(format!("https://127.0.0.1:{port}"))?.tls_config(tls)?;
    let ch = wait_for("the agent port", Duration::from_secs(60), || async {
        Ok(endpoint.connect().await.ok())
    })
    .await?;
    let forged = "x\n2026-01-01T00:00:00.000000Z ERROR vigil_collector: FORGED LINE";
    let (tx, rx) = mpsc::channel(4);
    tx.send(AgentMessage {
        msg: Some(In::Hello(v1::Hello {
            node: "n1".into(),
            agent_version: "test\nFORGED VERSION".into(),
            outbox_epoch: 7,
            ..Default::default()
        })),
    })
    .await?;
    tx.send(AgentMessage {
        msg: Some(In::CommandResult(v1::CommandResult {
            command_id: forged.into(),
            ..Default::default()
        })),
    })
    .await?;
    let _inbound = AgentServiceClient::new(ch)
        .session(ReceiverStream::new(rx))
        .await?;
    wait_for(
        "the unknown command id line",
        Duration::from_secs(20),
        || async {
            Ok(read(&log)
                .contains("result for an unknown command id")
                .then_some(()))
        },
    )
    .await?;
    let text = read(&log);
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("2026-01-01") || l.starts_with("FORGED")),
        "{text}"
    );
    assert!(text.contains(r"x\n2026-01-01"), "{text}");
    drop(tx);
    Ok(())
}
