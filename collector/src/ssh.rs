//! SSH for agentless nodes: the collector runs checks and control commands on a node over one
//! reused, authenticated SSH session per (host, port, user), verifying every host key.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use russh::client::{self, AuthResult, Handle};
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::keys::{PublicKeyOrCertificate, ssh_key};
use russh::{ChannelMsg, Sig};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// How much of a command's output (stdout and stderr together) is kept: the last 64 KiB.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// How to reach one node over SSH (`ssh:` under a node in collector.yaml). Secrets are never
/// written here: a password comes from an environment variable or a file, a key from a file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    /// TCP port of the node's sshd.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Remote user to log in as.
    pub user: String,
    /// Private key file (OpenSSH format).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name of the environment variable holding the key's passphrase (if it is encrypted).
    #[serde(default)]
    pub key_passphrase_env: Option<String>,
    /// Name of the environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (one trailing newline is ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// known_hosts file listing the node's host key (`[host]:port` or, on port 22, `host`).
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
    /// Pinned host key fingerprint, `SHA256:...` as printed by `ssh-keygen -lf`.
    #[serde(default)]
    pub host_key_fingerprint: Option<String>,
    /// Limit for TCP connect, handshake and authentication.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit for one command when the caller gives none.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
}

fn default_port() -> u16 {
    22
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(60)
}

impl SshConfig {
    /// Checks what serde cannot: one authentication method, a way to verify the host key,
    /// a well-formed fingerprint, non-zero timeouts.
    pub fn validate(&self) -> Result<(), SshError> {
        let invalid = |field: &'static str, reason: String| SshError::Config { field, reason };
        if self.user.is_empty() {
            return Err(invalid("user", "must not be empty".into()));
        }
        if self.port == 0 {
            return Err(invalid("port", "must be 1-65535".into()));
        }
        let methods = [
            self.key.is_some(),
            self.password_env.is_some(),
            self.password_file.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if methods != 1 {
            return Err(invalid(
                "key",
                format!("set exactly one of key, password_env, password_file (found {methods})"),
            ));
        }
        if self.key_passphrase_env.is_some() && self.key.is_none() {
            return Err(invalid(
                "key_passphrase_env",
                "only makes sense together with key".into(),
            ));
        }
        for (field, name) in [
            ("key_passphrase_env", &self.key_passphrase_env),
            ("password_env", &self.password_env),
        ] {
            if let Some(name) = name
                && (name.is_empty() || name.contains(['=', '\0']))
            {
                return Err(invalid(
                    field,
                    format!("{name:?} is not an environment variable name"),
                ));
            }
        }
        if self.known_hosts.is_none() && self.host_key_fingerprint.is_none() {
            return Err(invalid(
                "host_key_fingerprint",
                format!(
                    "set known_hosts or host_key_fingerprint: a host key is never accepted \
                     blindly; get the fingerprint with `ssh-keyscan -p {} HOST | ssh-keygen -lf -`",
                    self.port
                ),
            ));
        }
        if let Some(fp) = &self.host_key_fingerprint
            && !valid_fingerprint(fp)
        {
            return Err(invalid(
                "host_key_fingerprint",
                format!(
                    "{fp:?} is not a SHA256 fingerprint (\"SHA256:\" and 43 base64 characters, \
                     as printed by `ssh-keyscan -p {} HOST | ssh-keygen -lf -`)",
                    self.port
                ),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("connect_timeout", "must be more than 0s".into()));
        }
        if self.command_timeout.is_zero() {
            return Err(invalid("command_timeout", "must be more than 0s".into()));
        }
        Ok(())
    }
}

fn valid_fingerprint(fp: &str) -> bool {
    fp.strip_prefix("SHA256:").is_some_and(|b64| {
        b64.len() == 43
            && b64
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    })
}

/// What a remote command did.
#[derive(Debug, Clone, PartialEq)]
pub struct SshOutput {
    /// The exit status, if the server reported one.
    pub exit_code: Option<i32>,
    /// The signal that ended the command (`KILL`, `TERM`, ...), if the server reported one.
    pub exit_signal: Option<String>,
    /// stdout and stderr as they arrived, the last [`OUTPUT_LIMIT`] bytes (lossy UTF-8).
    pub output: String,
    /// The command ran past its timeout; it was sent KILL and its channel closed. The KILL is
    /// best effort: OpenSSH delivers it to the command's process group, but refuses it for root
    /// logins, and cannot signal processes of another user (`sudo`); closing the channel alone
    /// does not stop a command that neither reads nor writes.
    pub timed_out: bool,
    /// From sending the command to its end (or its timeout).
    pub duration: Duration,
}

/// Everything that can go wrong running a command over SSH. No variant carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("ssh.{field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cannot run the command: {reason}")]
    Command { reason: String },
    #[error("cannot connect to {host}:{port}: {reason}")]
    Connect {
        host: String,
        port: u16,
        reason: String,
    },
    #[error("cannot connect to {host}:{port}: no SSH session within {}", humantime::format_duration(*timeout))]
    ConnectTimeout {
        host: String,
        port: u16,
        timeout: Duration,
    },
    /// The host key was refused; `message` says why (unknown, changed, unreadable known_hosts).
    #[error("{message}")]
    HostKey {
        host: String,
        port: u16,
        /// The fingerprint the server presented, if it got that far.
        fingerprint: Option<String>,
        message: String,
    },
    #[error("{host}:{port}: authentication as {user} failed{detail}")]
    Auth {
        host: String,
        port: u16,
        user: String,
        detail: String,
    },
    #[error("{host}:{port}: cannot load private key {}: {reason}", path.display())]
    KeyFile {
        host: String,
        port: u16,
        path: PathBuf,
        reason: String,
    },
    /// A password or passphrase could not be read (the message names the variable or file).
    #[error("{host}:{port}: {reason}")]
    Secret {
        host: String,
        port: u16,
        reason: String,
    },
    /// The command could not be started (no channel, or the server refused to run it).
    #[error("{host}:{port}: {reason}")]
    Channel {
        host: String,
        port: u16,
        reason: String,
    },
    /// The connection broke while the command ran: it may or may not have completed.
    #[error(
        "{host}:{port}: connection lost while the command was running (it may or may not have completed): {reason}"
    )]
    Lost {
        host: String,
        port: u16,
        reason: String,
    },
}

/// One authenticated SSH session per (host, port, user), reused by every command to that node.
/// Cloning is cheap and clones share the sessions.
#[derive(Clone, Default)]
pub struct SshPool {
    inner: Arc<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    slots: StdMutex<HashMap<SlotKey, Arc<Slot>>>,
    connections_made: AtomicU64,
}

type SlotKey = (String, u16, String);

/// The node's current session, if any; locked while connecting so that a node gets one at a time.
type Slot = Mutex<Option<Arc<Conn>>>;

/// An authenticated session and the config it was made with (a changed config reconnects).
struct Conn {
    handle: Handle<Client>,
    cfg: SshConfig,
}

impl std::fmt::Debug for SshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshPool")
            .field("connections_made", &self.connections_made())
            .finish_non_exhaustive()
    }
}

impl SshPool {
    pub fn new() -> SshPool {
        SshPool::default()
    }

    /// How many SSH sessions this pool has established (authenticated) so far.
    pub fn connections_made(&self) -> u64 {
        self.inner.connections_made.load(Ordering::Relaxed)
    }

    /// Runs `argv` on `host` (each argument POSIX-quoted, never interpolated raw), bounded by
    /// `timeout` (default `cfg.command_timeout`). Reuses the node's session; if the session turns
    /// out to be broken before the command started, reconnects once and retries.
    pub async fn run(
        &self,
        host: &str,
        cfg: &SshConfig,
        argv: &[String],
        timeout: Option<Duration>,
    ) -> Result<SshOutput, SshError> {
        cfg.validate()?;
        let command = shell_join(argv)?;
        let timeout = timeout.unwrap_or(cfg.command_timeout);
        let slot = self.slot(host, cfg);
        let mut retried = false;
        loop {
            let conn = self.session(&slot, host, cfg).await?;
            match start(&conn, &command, cfg.connect_timeout).await {
                Ok(channel) => {
                    let result = collect(channel, timeout).await;
                    if result.is_err() {
                        evict(&slot, &conn).await;
                    }
                    return result.map_err(|reason| SshError::Lost {
                        host: host.to_string(),
                        port: cfg.port,
                        reason,
                    });
                }
                Err(reason) => {
                    evict(&slot, &conn).await;
                    if retried {
                        return Err(SshError::Channel {
                            host: host.to_string(),
                            port: cfg.port,
                            reason,
                        });
                    }
                    tracing::warn!(host, port = cfg.port, user = %cfg.user, %reason,
                        "SSH session unusable before the command started; reconnecting once");
                    retried = true;
                }
            }
        }
    }

    fn slot(&self, host: &str, cfg: &SshConfig) -> Arc<Slot> {
        let mut slots = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slots
            .entry((host.to_string(), cfg.port, cfg.user.clone()))
            .or_default()
            .clone()
    }

    /// The node's live session, or a new one (one connect at a time per node).
    async fn session(
        &self,
        slot: &Slot,
        host: &str,
        cfg: &SshConfig,
    ) -> Result<Arc<Conn>, SshError> {
        let mut current = slot.lock().await;
        if let Some(conn) = current.as_ref() {
            if !conn.handle.is_closed() && conn.cfg == *cfg {
                return Ok(conn.clone());
            }
            tracing::debug!(
                host,
                port = cfg.port,
                closed = conn.handle.is_closed(),
                "replacing SSH session"
            );
            *current = None;
        }
        let handle = connect(host, cfg).await?;
        let made = self.inner.connections_made.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(host, port = cfg.port, user = %cfg.user, connections_made = made,
            "SSH session established");
        let conn = Arc::new(Conn {
            handle,
            cfg: cfg.clone(),
        });
        *current = Some(conn.clone());
        Ok(conn)
    }
}

/// Drops `conn` from its slot unless another task already replaced it.
async fn evict(slot: &Slot, conn: &Arc<Conn>) {
    let mut current = slot.lock().await;
    if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
        *current = None;
    }
}

/// Opens a session channel and sends the command. An error here means the command did not start.
async fn start(
    conn: &Conn,
    command: &str,
    limit: Duration,
) -> Result<russh::Channel<client::Msg>, String> {
    let channel = tokio::time::timeout(limit, conn.handle.channel_open_session())
        .await
        .map_err(|_| {
            format!(
                "no session channel within {}",
                humantime::format_duration(limit)
            )
        })?
        .map_err(|e| format!("cannot open a session channel: {e}"))?;
    channel
        .exec(true, command)
        .await
        .map_err(|e| format!("cannot send the command: {e}"))?;
    Ok(channel)
}

/// Reads the command's output and exit status until the channel closes or `timeout` passes.
/// An error means the connection broke after the command was sent.
async fn collect(
    mut channel: russh::Channel<client::Msg>,
    timeout: Duration,
) -> Result<SshOutput, String> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tail = Tail::default();
    let mut exit_code = None;
    let mut exit_signal = None;
    let mut closed = false;
    loop {
        let msg = match tokio::time::timeout_at(deadline, channel.wait()).await {
            Ok(msg) => msg,
            Err(_) => {
                // KILL the remote command (OpenSSH signals its process group), then close.
                let _ = channel.signal(Sig::KILL).await;
                let _ = channel.close().await;
                return Ok(SshOutput {
                    exit_code,
                    exit_signal,
                    output: tail.into_string(),
                    timed_out: true,
                    duration: started.elapsed(),
                });
            }
        };
        match msg {
            Some(ChannelMsg::Data { data }) => tail.push(&data),
            Some(ChannelMsg::ExtendedData { data, .. }) => tail.push(&data),
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                exit_code = Some(i32::try_from(exit_status).unwrap_or(i32::MAX));
            }
            Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                exit_signal = Some(signal_name_of(&signal_name));
            }
            Some(ChannelMsg::Failure) => {
                let _ = channel.close().await;
                return Err("the server refused to execute the command".into());
            }
            Some(ChannelMsg::Close) => {
                closed = true;
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    if !closed && exit_code.is_none() && exit_signal.is_none() {
        return Err("the channel ended without an exit status".into());
    }
    Ok(SshOutput {
        exit_code,
        exit_signal,
        output: tail.into_string(),
        timed_out: false,
        duration: started.elapsed(),
    })
}

fn signal_name_of(sig: &Sig) -> String {
    match sig {
        Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}

/// The last [`OUTPUT_LIMIT`] bytes of a stream.
#[derive(Default)]
struct Tail {
    buf: Vec<u8>,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > 2 * OUTPUT_LIMIT {
            let cut = self.buf.len() - OUTPUT_LIMIT;
            self.buf.drain(..cut);
        }
    }

    fn into_string(self) -> String {
        let mut bytes = &self.buf[self.buf.len().saturating_sub(OUTPUT_LIMIT)..];
        if bytes.len() < self.buf.len() {
            // Do not start in the middle of a UTF-8 character.
            while let Some((first, rest)) = bytes.split_first()
                && (first & 0b1100_0000) == 0b1000_0000
            {
                bytes = rest;
            }
        }
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// Joins `argv` into one POSIX shell command line: every argument that is not plainly safe is
/// single-quoted, an embedded `'` becoming `'\''`. Refuses an empty argv and NUL bytes.
pub fn shell_join(argv: &[String]) -> Result<String, SshError> {
    if argv.is_empty() {
        return Err(SshError::Command {
            reason: "empty argv".into(),
        });
    }
    let mut line = String::new();
    for (i, arg) in argv.iter().enumerate() {
        if arg.contains('\0') {
            return Err(SshError::Command {
                reason: format!("argument {i} contains a NUL byte"),
            });
        }
        if i > 0 {
            line.push(' ');
        }
        line.push_str(&shell_quote(arg));
    }
    Ok(line)
}

fn shell_quote(arg: &str) -> Cow<'_, str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        return Cow::Borrowed(arg);
    }
    Cow::Owned(format!("'{}'", arg.replace('\'', r"'\''")))
}

/// Errors of the russh handler: ours (host key refused) or the library's.
#[derive(Debug)]
enum HandlerError {
    HostKey(SshError),
    Russh(russh::Error),
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Russh(e)
    }
}

/// The russh client handler: verifies the host key, nothing else.
struct Client {
    host: String,
    port: u16,
    check: HostKeyCheck,
}

/// What the host key must match. Every configured source must accept it.
struct HostKeyCheck {
    pinned: Option<String>,
    /// The known_hosts file and the keys it lists for this host (line number, key).
    known_hosts: Option<(PathBuf, Vec<(usize, PublicKey)>)>,
}

impl client::Handler for Client {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                let message = format!(
                    "host key for {}:{} is a certificate; host certificates are not supported, \
                     pin the host key instead",
                    self.host, self.port
                );
                tracing::error!(host = %self.host, port = self.port, "SSH host key refused: {message}");
                return Err(HandlerError::HostKey(SshError::HostKey {
                    host: self.host.clone(),
                    port: self.port,
                    fingerprint: None,
                    message,
                }));
            }
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        match self.check.verify(&self.host, self.port, key, &fingerprint) {
            Ok(()) => {
                tracing::debug!(host = %self.host, port = self.port, %fingerprint, "SSH host key verified");
                Ok(true)
            }
            Err(message) => {
                tracing::error!(host = %self.host, port = self.port, %fingerprint,
                    "SSH host key refused: {message}");
                Err(HandlerError::HostKey(SshError::HostKey {
                    host: self.host.clone(),
                    port: self.port,
                    fingerprint: Some(fingerprint),
                    message,
                }))
            }
        }
    }
}

impl HostKeyCheck {
    fn verify(
        &self,
        host: &str,
        port: u16,
        key: &PublicKey,
        fingerprint: &str,
    ) -> Result<(), String> {
        if let Some(pinned) = &self.pinned
            && pinned != fingerprint
        {
            return Err(format!(
                "host key for {host}:{port} changed: expected {pinned}, got {fingerprint}"
            ));
        }
        if let Some((path, known)) = &self.known_hosts {
            if known.iter().any(|(_, k)| k.key_data() == key.key_data()) {
                return Ok(());
            }
            if let Some((line, old)) = known.iter().find(|(_, k)| k.algorithm() == key.algorithm())
            {
                return Err(format!(
                    "host key for {host}:{port} changed: expected {}, got {fingerprint} \
                     (known_hosts {} line {line})",
                    old.fingerprint(HashAlg::Sha256),
                    path.display()
                ));
            }
            return Err(format!(
                "host key for {host}:{port} is not in known_hosts {} (the server offered {fingerprint}; \
                 check it with `ssh-keyscan -p {port} {host} | ssh-keygen -lf -`)",
                path.display()
            ));
        }
        Ok(())
    }
}

/// Reads the keys `path` lists for `host:port` (`[host]:port`, or `host` on port 22; hashed
/// entries included). A missing or unreadable file is an error, never "no keys".
fn known_keys(host: &str, port: u16, path: &Path) -> Result<Vec<(usize, PublicKey)>, String> {
    std::fs::File::open(path)
        .map_err(|e| format!("cannot read known_hosts {}: {e}", path.display()))?;
    russh::keys::known_hosts::known_host_keys_path(host, port, path)
        .map_err(|e| format!("cannot read known_hosts {}: {e}", path.display()))
}

/// The default host key algorithms, those the known_hosts file lists for this host first (as
/// OpenSSH does), so that a host with several keys offers the one we know.
fn preferred_host_keys(known: &[(usize, PublicKey)]) -> Vec<Algorithm> {
    let same_type = |a: &Algorithm, b: &Algorithm| {
        a == b || (matches!(a, Algorithm::Rsa { .. }) && matches!(b, Algorithm::Rsa { .. }))
    };
    let mut algs = russh::Preferred::DEFAULT.key.to_vec();
    algs.sort_by_key(|alg| !known.iter().any(|(_, k)| same_type(alg, &k.algorithm())));
    algs
}

enum Credentials {
    Key(Arc<PrivateKey>),
    Password(String),
}

/// Loads the key or password the config names; the error names the file or variable, never
/// its content.
async fn credentials(host: &str, cfg: &SshConfig) -> Result<Credentials, SshError> {
    let secret_err = |reason: String| SshError::Secret {
        host: host.to_string(),
        port: cfg.port,
        reason,
    };
    let env = |field: &str, name: &str| {
        std::env::var(name).map_err(|e| {
            secret_err(format!(
                "{field}: environment variable {name} is {}",
                match e {
                    std::env::VarError::NotPresent => "not set",
                    std::env::VarError::NotUnicode(_) => "not valid UTF-8",
                }
            ))
        })
    };
    if let Some(path) = &cfg.key {
        let passphrase = match &cfg.key_passphrase_env {
            Some(name) => Some(env("key_passphrase_env", name)?),
            None => None,
        };
        let key_path = path.clone();
        // Decrypting a key runs bcrypt-pbkdf: keep it off the async threads.
        let loaded = tokio::task::spawn_blocking(move || {
            russh::keys::load_secret_key(&key_path, passphrase.as_deref())
        })
        .await;
        let key_err = |reason: String| SshError::KeyFile {
            host: host.to_string(),
            port: cfg.port,
            path: path.clone(),
            reason,
        };
        return match loaded {
            Ok(Ok(key)) => Ok(Credentials::Key(Arc::new(key))),
            Ok(Err(russh::keys::Error::KeyIsEncrypted)) => Err(key_err(
                "the key is encrypted; name the variable holding its passphrase in key_passphrase_env"
                    .into(),
            )),
            Ok(Err(e)) => Err(key_err(e.to_string())),
            Err(e) => Err(key_err(format!("loading task failed: {e}"))),
        };
    }
    if let Some(name) = &cfg.password_env {
        return Ok(Credentials::Password(env("password_env", name)?));
    }
    if let Some(path) = &cfg.password_file {
        let text = tokio::fs::read_to_string(path).await.map_err(|e| {
            secret_err(format!(
                "password_file: cannot read {}: {e}",
                path.display()
            ))
        })?;
        let password = text
            .strip_suffix('\n')
            .map(|p| p.strip_suffix('\r').unwrap_or(p))
            .unwrap_or(&text);
        return Ok(Credentials::Password(password.to_string()));
    }
    Err(SshError::Config {
        field: "key",
        reason: "set exactly one of key, password_env, password_file".into(),
    })
}

/// TCP connect, handshake with host key verification, and authentication, all within
/// `cfg.connect_timeout`.
async fn connect(host: &str, cfg: &SshConfig) -> Result<Handle<Client>, SshError> {
    let port = cfg.port;
    let creds = credentials(host, cfg).await?;
    let known_hosts = match &cfg.known_hosts {
        Some(path) => {
            let keys = known_keys(host, port, path).map_err(|message| {
                tracing::error!(host, port, known_hosts = %path.display(), "{message}");
                SshError::HostKey {
                    host: host.to_string(),
                    port,
                    fingerprint: None,
                    message: format!("host key for {host}:{port} cannot be verified: {message}"),
                }
            })?;
            Some((path.clone(), keys))
        }
        None => None,
    };
    let mut preferred = russh::Preferred::default();
    if let Some((_, keys)) = &known_hosts {
        preferred.key = Cow::Owned(preferred_host_keys(keys));
    }
    let config = Arc::new(client::Config {
        preferred,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    });
    let handler = Client {
        host: host.to_string(),
        port,
        check: HostKeyCheck {
            pinned: cfg.host_key_fingerprint.clone(),
            known_hosts,
        },
    };
    tracing::debug!(host, port, user = %cfg.user, "connecting over SSH");
    let attempt = async {
        let mut handle = client::connect(config, (host, port), handler)
            .await
            .map_err(|e| match e {
                HandlerError::HostKey(e) => e,
                HandlerError::Russh(russh::Error::IO(e)) => SshError::Connect {
                    host: host.to_string(),
                    port,
                    reason: e.to_string(),
                },
                HandlerError::Russh(e) => SshError::Connect {
                    host: host.to_string(),
                    port,
                    reason: format!("SSH handshake failed: {e}"),
                },
            })?;
        authenticate(&mut handle, host, cfg, creds).await?;
        Ok(handle)
    };
    match tokio::time::timeout(cfg.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(SshError::ConnectTimeout {
            host: host.to_string(),
            port,
            timeout: cfg.connect_timeout,
        }),
    }
}

async fn authenticate(
    handle: &mut Handle<Client>,
    host: &str,
    cfg: &SshConfig,
    creds: Credentials,
) -> Result<(), SshError> {
    let auth_err = |detail: String| SshError::Auth {
        host: host.to_string(),
        port: cfg.port,
        user: cfg.user.clone(),
        detail,
    };
    let result = match creds {
        Credentials::Key(key) => {
            let hash = if key.algorithm().is_rsa() {
                handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(|e| auth_err(format!(": {e}")))?
                    .unwrap_or(Some(HashAlg::Sha256))
            } else {
                None
            };
            handle
                .authenticate_publickey(cfg.user.clone(), PrivateKeyWithHashAlg::new(key, hash))
                .await
        }
        Credentials::Password(password) => {
            handle
                .authenticate_password(cfg.user.clone(), password)
                .await
        }
    };
    match result {
        Ok(AuthResult::Success) => Ok(()),
        Ok(AuthResult::Failure {
            remaining_methods, ..
        }) => {
            let methods: Vec<&str> = remaining_methods.iter().map(|m| m.into()).collect();
            let err = auth_err(format!(
                " (the server accepts: {})",
                if methods.is_empty() {
                    "nothing more".to_string()
                } else {
                    methods.join(", ")
                }
            ));
            tracing::warn!(host, port = cfg.port, user = %cfg.user, "SSH authentication failed");
            Err(err)
        }
        Err(e) => Err(auth_err(format!(": {e}"))),
    }
}

/// The SHA256 fingerprint of an OpenSSH public key line (`ssh-ed25519 AAAA... comment`), as
/// `ssh-keygen -lf` prints it.
pub fn fingerprint_of_public_key(line: &str) -> Option<String> {
    let key = ssh_key::PublicKey::from_openssh(line.trim()).ok()?;
    Some(key.fingerprint(HashAlg::Sha256).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SshConfig {
        SshConfig {
            port: 22,
            user: "vigil".into(),
            key: Some("/etc/vigil/id_ed25519".into()),
            key_passphrase_env: None,
            password_env: None,
            password_file: None,
            known_hosts: None,
            host_key_fingerprint: Some(format!("SHA256:{}", "A".repeat(43))),
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn yaml_defaults_and_unknown_fields() {
        let c: SshConfig =
            serde_norway::from_str("user: vigil\nkey: /k\nknown_hosts: /kh\nconnect_timeout: 3s\n")
                .unwrap();
        assert_eq!(c.port, 22);
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.command_timeout, Duration::from_secs(60));
        c.validate().unwrap();
        let err = serde_norway::from_str::<SshConfig>("user: vigil\npassword: hunter2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `password`"), "{err}");
    }

    #[test]
    fn validate_auth_methods() {
        cfg().validate().unwrap();
        let mut none = cfg();
        none.key = None;
        assert!(matches!(
            none.validate(),
            Err(SshError::Config { field: "key", .. })
        ));
        let mut two = cfg();
        two.password_env = Some("PW".into());
        let err = two.validate().unwrap_err().to_string();
        assert!(err.contains("exactly one"), "{err}");
        let mut pw = cfg();
        pw.key = None;
        pw.password_file = Some("/pw".into());
        pw.validate().unwrap();
        pw.key_passphrase_env = Some("X".into());
        assert!(pw.validate().is_err());
        let mut bad_env = cfg();
        bad_env.key_passphrase_env = Some("A=B".into());
        assert!(bad_env.validate().is_err());
    }

    #[test]
    fn validate_host_key_source() {
        let mut blind = cfg();
        blind.host_key_fingerprint = None;
        blind.port = 2222;
        let err = blind.validate().unwrap_err().to_string();
        assert!(
            err.contains("ssh-keyscan -p 2222 HOST | ssh-keygen -lf -"),
            "{err}"
        );
        let mut kh = blind.clone();
        kh.known_hosts = Some("/kh".into());
        kh.validate().unwrap();
        for bad in [
            "abc",
            "MD5:aa:bb",
            "SHA256:short",
            "256 SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA x (ED25519)",
        ] {
            let mut c = cfg();
            c.host_key_fingerprint = Some(bad.into());
            assert!(c.validate().is_err(), "{bad}");
        }
        let mut zero = cfg();
        zero.connect_timeout = Duration::ZERO;
        assert!(zero.validate().is_err());
    }

    #[test]
    fn quoting() {
        let j = |a: &[&str]| shell_join(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(j(&["echo", "hello world"]).unwrap(), "echo 'hello world'");
        assert_eq!(j(&["a'b"]).unwrap(), r"'a'\''b'");
        assert_eq!(j(&["", "x"]).unwrap(), "'' x");
        assert_eq!(
            j(&["/usr/bin/env", "A=b,c:d"]).unwrap(),
            "/usr/bin/env A=b,c:d"
        );
        assert!(j(&[]).is_err());
        assert!(j(&["a\0b"]).is_err());
    }

    /// The joined line, run by a real POSIX shell, gives back exactly the arguments.
    #[test]
    fn quoting_round_trips_through_sh() {
        let args: Vec<String> = [
            "plain",
            "with space",
            "it's",
            "'",
            "''",
            "$HOME",
            "`id`",
            "$(id)",
            "a;b|c&d",
            "*",
            "~",
            "\\n\\",
            "line\nbreak",
            "\"dq\"",
            "!",
            "",
            "ünï",
            "-n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut argv = vec!["printf".to_string(), "<%s>\\n".to_string()];
        argv.extend(args.iter().cloned());
        let line = shell_join(&argv).unwrap();
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&line)
            .output()
            .unwrap();
        assert!(out.status.success());
        let expected: String = args.iter().map(|a| format!("<{a}>\n")).collect();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    }

    #[test]
    fn tail_keeps_last_bytes_on_char_boundary() {
        let mut t = Tail::default();
        t.push(b"start");
        for _ in 0..(3 * OUTPUT_LIMIT / 3) {
            t.push("é".as_bytes());
        }
        t.push(b"END");
        let s = t.into_string();
        assert!(s.len() <= OUTPUT_LIMIT);
        assert!(s.ends_with("END"));
        assert!(s.starts_with('é'), "{:?}", &s[..8]);
        let mut small = Tail::default();
        small.push(b"hello ");
        small.push(b"world");
        assert_eq!(small.into_string(), "hello world");
    }

    #[test]
    fn fingerprint_matches_ssh_keygen() {
        // `ssh-keygen -lf` printed: 256 SHA256:SWfcKO1WRpvG07DlCIFQKkaNVX9w7Bf911BoD3ua1T0 t (ED25519)
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILOL0ssiaBED4LW872eydoAP5EJOvs6chjyACl1vG9E3 t";
        let fp = fingerprint_of_public_key(line).unwrap();
        assert_eq!(fp, "SHA256:SWfcKO1WRpvG07DlCIFQKkaNVX9w7Bf911BoD3ua1T0");
        assert!(valid_fingerprint(&fp), "{fp}");
        assert!(fingerprint_of_public_key("not a key").is_none());
    }

    #[tokio::test]
    async fn missing_password_env_fails_before_connecting() {
        let pool = SshPool::new();
        let mut c = cfg();
        c.key = None;
        c.password_env = Some("VIGIL_TEST_SURELY_UNSET_PASSWORD".into());
        c.port = 1;
        let err = pool
            .run("127.0.0.1", &c, &["true".to_string()], None)
            .await
            .unwrap_err();
        assert!(matches!(err, SshError::Secret { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("environment variable VIGIL_TEST_SURELY_UNSET_PASSWORD is not set"),
            "{err}"
        );
        assert_eq!(pool.connections_made(), 0);
    }

    #[tokio::test]
    async fn missing_key_file_is_a_key_file_error() {
        let mut c = cfg();
        c.key = Some("/nonexistent/vigil/key".into());
        let err = SshPool::new()
            .run("127.0.0.1", &c, &["true".to_string()], None)
            .await
            .unwrap_err();
        assert!(matches!(err, SshError::KeyFile { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/vigil/key"), "{err}");
    }
}
