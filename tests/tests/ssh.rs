//! The collector's SSH client against a real OpenSSH server (`tests/src/sshd.rs`): commands,
//! quoting, exit codes, timeouts, connection reuse and reconnect, host key and auth failures.

use std::time::Duration;

use vigil_collector::ssh::{SshConfig, SshError, SshPool, fingerprint_of_public_key};
use vigil_tests::{init, sshd, wait_for};

const HOST: &str = "127.0.0.1";

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

async fn run(
    pool: &SshPool,
    cfg: &SshConfig,
    args: &[&str],
) -> Result<vigil_collector::ssh::SshOutput, SshError> {
    pool.run(HOST, cfg, &argv(args), None).await
}

#[tokio::test]
async fn echo_runs_and_reports_exit_zero() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let pool = SshPool::new();
    let out = run(&pool, &sshd.ssh_config(), &["echo", "hello world"]).await?;
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert_eq!(out.output, "hello world\n");
    assert_eq!(out.exit_signal, None);
    assert!(!out.timed_out);
    Ok(())
}

#[tokio::test]
async fn arguments_arrive_literally() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let args = [
        "with space",
        "it's \"quoted\"",
        "$HOME",
        "`id`",
        "$(id)",
        "a;b|c&&d",
        "*",
        "",
        "back\\slash",
        "new\nline",
    ];
    let mut cmd = vec!["printf", "<%s>\\n"];
    cmd.extend(args);
    let out = run(&SshPool::new(), &sshd.ssh_config(), &cmd).await?;
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    let expected: String = args.iter().map(|a| format!("<{a}>\n")).collect();
    assert_eq!(out.output, expected);
    Ok(())
}

#[tokio::test]
async fn nonzero_exit_and_stderr_are_reported() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let out = run(
        &SshPool::new(),
        &sshd.ssh_config(),
        &["sh", "-c", "echo out; echo oops >&2; exit 3"],
    )
    .await?;
    assert_eq!(out.exit_code, Some(3), "{out:?}");
    assert!(
        out.output.contains("out\n") && out.output.contains("oops\n"),
        "{out:?}"
    );
    assert!(!out.timed_out);
    Ok(())
}

#[tokio::test]
async fn command_past_its_timeout_is_killed() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let cfg = sshd.ssh_config();
    let pool = SshPool::new();
    // A distinctive duration so that pgrep finds exactly this sleep.
    let out = pool
        .run(
            HOST,
            &cfg,
            &argv(&["sleep", "37.25"]),
            Some(Duration::from_millis(500)),
        )
        .await?;
    assert!(out.timed_out, "{out:?}");
    assert_eq!(out.exit_code, None);
    // OpenSSH refuses the SSH signal request for root logins ("session signalling requires
    // privilege separation"): then the sleep runs on after its channel is closed (the harness
    // kills it with sshd). For any other user the KILL arrives.
    if sshd.user != "root" {
        wait_for("remote sleep killed", Duration::from_secs(10), || {
            let pool = pool.clone();
            let cfg = cfg.clone();
            async move {
                let out = run(&pool, &cfg, &["pgrep", "-x", "-f", "sleep 37.25"]).await?;
                Ok((out.exit_code == Some(1)).then_some(()))
            }
        })
        .await?;
    }
    // The session is still usable after a timed-out command.
    assert_eq!(run(&pool, &cfg, &["true"]).await?.exit_code, Some(0));
    assert_eq!(pool.connections_made(), 1);
    Ok(())
}

#[tokio::test]
async fn commands_reuse_one_connection() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let cfg = sshd.ssh_config();
    let pool = SshPool::new();
    assert_eq!(run(&pool, &cfg, &["true"]).await?.exit_code, Some(0));
    assert_eq!(run(&pool, &cfg, &["false"]).await?.exit_code, Some(1));
    assert_eq!(pool.connections_made(), 1);
    // Concurrent commands share it too (sshd allows 10 sessions per connection by default).
    let runs = (0..4).map(|i| {
        let pool = pool.clone();
        let cfg = cfg.clone();
        async move {
            pool.run(HOST, &cfg, &argv(&["echo", &i.to_string()]), None)
                .await
        }
    });
    for (i, out) in futures::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(out?.output, format!("{i}\n"));
    }
    assert_eq!(pool.connections_made(), 1);
    Ok(())
}

#[tokio::test]
async fn reconnects_after_sshd_restart() -> anyhow::Result<()> {
    init();
    let mut sshd = sshd::start().await?;
    let cfg = sshd.ssh_config();
    let pool = SshPool::new();
    assert_eq!(run(&pool, &cfg, &["true"]).await?.exit_code, Some(0));
    sshd.restart().await?;
    let out = run(&pool, &cfg, &["echo", "again"]).await?;
    assert_eq!(out.output, "again\n", "{out:?}");
    assert_eq!(pool.connections_made(), 2);
    Ok(())
}

#[tokio::test]
async fn hung_session_is_replaced_before_the_command_starts() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let cfg = SshConfig {
        connect_timeout: Duration::from_secs(1),
        ..sshd.ssh_config()
    };
    let pool = SshPool::new();
    assert_eq!(run(&pool, &cfg, &["true"]).await?.exit_code, Some(0));
    // The pooled session still looks open but never answers: opening a channel on it times
    // out, and the command runs once on a new session.
    sshd.freeze_connections();
    let out = run(&pool, &cfg, &["echo", "fresh"]).await?;
    assert_eq!(out.output, "fresh\n", "{out:?}");
    assert_eq!(pool.connections_made(), 2);
    Ok(())
}

#[tokio::test]
async fn wrong_pinned_fingerprint_is_refused_and_nothing_runs() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let other = sshd.generate_key("other_host", "").await?;
    let other_fp =
        fingerprint_of_public_key(&std::fs::read_to_string(other.with_extension("pub"))?)
            .expect("valid public key");
    let marker = sshd.dir().join("must-not-exist");
    let cfg = SshConfig {
        known_hosts: None,
        host_key_fingerprint: Some(other_fp.clone()),
        ..sshd.ssh_config()
    };
    let pool = SshPool::new();
    let err = run(&pool, &cfg, &["touch", marker.to_str().unwrap()])
        .await
        .unwrap_err();
    let SshError::HostKey { fingerprint, .. } = &err else {
        panic!("expected a host key error, got {err}");
    };
    assert_eq!(fingerprint.as_deref(), Some(sshd.host_fingerprint.as_str()));
    let expected = format!(
        "host key for 127.0.0.1:{} changed: expected {other_fp}, got {}",
        sshd.port, sshd.host_fingerprint
    );
    assert_eq!(err.to_string(), expected);
    assert!(!marker.exists());
    assert_eq!(pool.connections_made(), 0);

    // The right pin alone (no known_hosts) is enough.
    let pinned = SshConfig {
        known_hosts: None,
        ..sshd.ssh_config()
    };
    assert_eq!(run(&pool, &pinned, &["true"]).await?.exit_code, Some(0));
    Ok(())
}

#[tokio::test]
async fn host_missing_from_known_hosts_is_refused() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let known_hosts = sshd.dir().join("known_hosts_other");
    // The right key, but for other names: neither matches [127.0.0.1]:PORT.
    std::fs::write(
        &known_hosts,
        format!(
            "127.0.0.1 {key}\n[127.0.0.2]:{port} {key}\n",
            key = sshd.host_public_key,
            port = sshd.port
        ),
    )?;
    let cfg = SshConfig {
        known_hosts: Some(known_hosts.clone()),
        host_key_fingerprint: None,
        ..sshd.ssh_config()
    };
    let err = run(&SshPool::new(), &cfg, &["true"]).await.unwrap_err();
    assert!(matches!(err, SshError::HostKey { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "host key for 127.0.0.1:{} is not in known_hosts {}",
            sshd.port,
            known_hosts.display()
        )),
        "{text}"
    );

    // The known_hosts file alone (no pin) is enough.
    let listed = SshConfig {
        host_key_fingerprint: None,
        ..sshd.ssh_config()
    };
    assert_eq!(
        run(&SshPool::new(), &listed, &["true"]).await?.exit_code,
        Some(0)
    );
    Ok(())
}

#[tokio::test]
async fn changed_host_key_in_known_hosts_is_refused() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let other = sshd.generate_key("old_host", "").await?;
    let old_line = std::fs::read_to_string(other.with_extension("pub"))?;
    let old_fp = fingerprint_of_public_key(&old_line).expect("valid public key");
    let known_hosts = sshd.dir().join("known_hosts_changed");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{} {old_line}", sshd.port),
    )?;
    let cfg = SshConfig {
        known_hosts: Some(known_hosts),
        host_key_fingerprint: None,
        ..sshd.ssh_config()
    };
    let err = run(&SshPool::new(), &cfg, &["true"]).await.unwrap_err();
    assert!(matches!(err, SshError::HostKey { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "host key for 127.0.0.1:{} changed: expected {old_fp}, got {}",
            sshd.port, sshd.host_fingerprint
        )),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn missing_known_hosts_file_is_refused() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let cfg = SshConfig {
        known_hosts: Some(sshd.dir().join("no_such_known_hosts")),
        ..sshd.ssh_config()
    };
    let err = run(&SshPool::new(), &cfg, &["true"]).await.unwrap_err();
    assert!(matches!(err, SshError::HostKey { .. }), "{err}");
    assert!(err.to_string().contains("cannot read known_hosts"), "{err}");
    Ok(())
}

#[tokio::test]
async fn wrong_client_key_fails_authentication() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let cfg = SshConfig {
        key: Some(sshd.generate_key("stranger", "").await?),
        ..sshd.ssh_config()
    };
    let pool = SshPool::new();
    let err = run(&pool, &cfg, &["true"]).await.unwrap_err();
    let SshError::Auth { user, .. } = &err else {
        panic!("expected an auth error, got {err}");
    };
    assert_eq!(user, &sshd.user);
    assert!(
        err.to_string()
            .contains(&format!("authentication as {} failed", sshd.user)),
        "{err}"
    );
    assert_eq!(pool.connections_made(), 0);
    Ok(())
}

#[tokio::test]
async fn encrypted_key_uses_the_passphrase_from_the_environment() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    // Tests cannot set environment variables (that needs unsafe): use one that is always set.
    let passphrase = std::env::var("PATH")?;
    let key = sshd.generate_key("encrypted", &passphrase).await?;
    std::fs::write(
        sshd.dir().join("authorized_keys"),
        std::fs::read_to_string(key.with_extension("pub"))?,
    )?;
    let cfg = SshConfig {
        key: Some(key.clone()),
        key_passphrase_env: Some("PATH".into()),
        ..sshd.ssh_config()
    };
    let out = run(&SshPool::new(), &cfg, &["echo", "unlocked"]).await?;
    assert_eq!(out.output, "unlocked\n");

    let no_passphrase = SshConfig {
        key: Some(key),
        ..sshd.ssh_config()
    };
    let err = run(&SshPool::new(), &no_passphrase, &["true"])
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::KeyFile { .. }), "{err}");
    assert!(err.to_string().contains("key_passphrase_env"), "{err}");
    assert!(!err.to_string().contains(&passphrase));
    Ok(())
}

#[tokio::test]
async fn closed_port_is_a_connect_error() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg = SshConfig {
        port,
        connect_timeout: Duration::from_secs(2),
        ..sshd.ssh_config()
    };
    let err = run(&SshPool::new(), &cfg, &["true"]).await.unwrap_err();
    assert!(
        matches!(&err, SshError::Connect { port: p, .. } if *p == port),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn silent_server_is_a_connect_timeout() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    // Accepts TCP (the kernel does) but never speaks SSH.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = silent.local_addr()?.port();
    let cfg = SshConfig {
        port,
        connect_timeout: Duration::from_millis(500),
        ..sshd.ssh_config()
    };
    let err = run(&SshPool::new(), &cfg, &["true"]).await.unwrap_err();
    assert!(
        matches!(&err, SshError::ConnectTimeout { timeout, .. } if *timeout == cfg.connect_timeout),
        "{err}"
    );
    drop(silent);
    Ok(())
}
