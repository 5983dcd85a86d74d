//! A real OpenSSH server for tests: `/usr/sbin/sshd` on a free loopback port with its own host key,
//! a client key in `authorized_keys` and a known_hosts file, all in a temp dir; killed on drop.
//!
//! If `openssh-server` is missing and we are root, it is installed with apt-get (once, under a
//! file lock, since nextest runs tests in parallel processes).

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use vigil_collector::ssh::SshConfig;

/// Where Debian's `openssh-server` puts the daemon.
pub const SSHD: &str = "/usr/sbin/sshd";
/// How long sshd may take to accept connections after it is started.
const READY_LIMIT: Duration = Duration::from_secs(15);

/// A running sshd. Dropping it kills the daemon and every connection process it forked.
pub struct Sshd {
    /// Loopback port it listens on (127.0.0.1).
    pub port: u16,
    /// The user to log in as: the current user (root in CI).
    pub user: String,
    /// Private key (OpenSSH format, no passphrase) listed in the server's `authorized_keys`.
    pub client_key: PathBuf,
    /// The host key's fingerprint as `ssh-keygen -lf` prints it (`SHA256:...`).
    pub host_fingerprint: String,
    /// The host key's public line (`ssh-ed25519 AAAA... comment`).
    pub host_public_key: String,
    /// A known_hosts file with `[127.0.0.1]:PORT <host key>`.
    pub known_hosts: PathBuf,
    dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

/// Starts a fresh sshd (installing `openssh-server` first if needed and possible).
pub async fn start() -> anyhow::Result<Sshd> {
    ensure_installed().await?;
    let dir = tempfile::Builder::new().prefix("vigil-sshd-").tempdir()?;
    let host_key = dir.path().join("host_ed25519");
    keygen(&host_key, "vigil-test-host", "").await?;
    let client_key = dir.path().join("client_ed25519");
    keygen(&client_key, "vigil-test-client", "").await?;
    std::fs::copy(
        client_key.with_extension("pub"),
        dir.path().join("authorized_keys"),
    )?;
    let host_public_key = std::fs::read_to_string(host_key.with_extension("pub"))?
        .trim()
        .to_string();
    let host_fingerprint = fingerprint(&host_key.with_extension("pub")).await?;
    let uid = nix::unistd::geteuid();
    let user = nix::unistd::User::from_uid(uid)?
        .ok_or_else(|| anyhow!("no passwd entry for uid {uid}"))?
        .name;
    if uid.is_root() {
        // The privilege separation directory sshd insists on.
        std::fs::create_dir_all("/run/sshd").context("create /run/sshd")?;
    }
    let mut sshd = Sshd {
        port: 0,
        user,
        client_key,
        host_fingerprint,
        host_public_key,
        known_hosts: dir.path().join("known_hosts"),
        config: dir.path().join("sshd_config"),
        log: dir.path().join("sshd.log"),
        dir,
        child: None,
    };
    // The port is free when we pick it but another process may take it before sshd binds it:
    // try a few ports.
    let mut last = None;
    for _ in 0..5 {
        sshd.port = free_port()?;
        sshd.write_files()?;
        match sshd.spawn().await {
            Ok(()) => return Ok(sshd),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

impl Sshd {
    /// The temp dir holding keys, config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What sshd logged so far (`-e`: to stderr, kept in a file).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A config for the collector's [`vigil_collector::ssh::SshPool`]: this server's client
    /// key, its known_hosts file and its pinned fingerprint.
    pub fn ssh_config(&self) -> SshConfig {
        SshConfig {
            port: self.port,
            user: self.user.clone(),
            key: Some(self.client_key.clone()),
            key_passphrase_env: None,
            password_env: None,
            password_file: None,
            known_hosts: Some(self.known_hosts.clone()),
            host_key_fingerprint: Some(self.host_fingerprint.clone()),
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
        }
    }

    /// Generates another ed25519 key pair in the temp dir (not authorised on this server);
    /// returns the private key's path. `passphrase` may be empty.
    pub async fn generate_key(&self, name: &str, passphrase: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir().join(name);
        keygen(&path, name, passphrase).await?;
        Ok(path)
    }

    /// Kills sshd and every connection process it forked, and waits for sshd to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                kill_tree(pid);
            }
            child.wait().await?;
        }
        Ok(())
    }

    /// Freezes (SIGSTOP) every connection sshd has accepted so far, leaving the listener alive:
    /// those sessions hang without closing, new connections work.
    pub fn freeze_connections(&self) {
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id())
            && let Ok(root) = i32::try_from(pid)
        {
            for p in descendants(root) {
                let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
            }
        }
    }

    /// Stops sshd and starts a new one on the same port with the same keys.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.spawn().await
    }

    fn write_files(&self) -> anyhow::Result<()> {
        let d = self.dir().display();
        let config = format!(
            "# sshd for Vigil's tests\n\
             Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {d}/host_ed25519\n\
             PidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin yes\n\
             StrictModes no\n\
             UsePAM no\n\
             PrintMotd no\n\
             LogLevel VERBOSE\n",
            port = self.port,
        );
        std::fs::write(&self.config, config)?;
        std::fs::write(
            &self.known_hosts,
            format!("[127.0.0.1]:{} {}\n", self.port, self.host_public_key),
        )?;
        Ok(())
    }

    /// Starts `sshd -D -e -f CONFIG` and waits until it answers with an SSH banner.
    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = tokio::process::Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {SSHD}"))?;
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "sshd exited with {status} before accepting connections on port {}; its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            if banner(self.port).await {
                tracing::info!(port = self.port, pid = child.id(), "test sshd ready");
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                if let Some(pid) = child.id() {
                    kill_tree(pid);
                }
                let _ = child.wait().await;
                bail!(
                    "sshd did not answer on 127.0.0.1:{} within {READY_LIMIT:?}; its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(child) = &self.child
            && let Some(pid) = child.id()
        {
            kill_tree(pid);
        }
        // kill_on_drop reaps the daemon itself.
    }
}

/// Whether 127.0.0.1:`port` answers with an SSH identification line within a second.
async fn banner(port: u16) -> bool {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line.starts_with("SSH-2.0-"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(true))
    )
}

/// Stops `pid` (so it forks no more), then kills its descendants and itself. sshd puts each
/// connection in a new session, so a process-group kill would miss them.
fn kill_tree(pid: u32) {
    let Ok(root) = i32::try_from(pid) else {
        return;
    };
    let _ = kill(Pid::from_raw(root), Signal::SIGSTOP);
    for p in descendants(root) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let _ = kill(Pid::from_raw(root), Signal::SIGKILL);
}

/// Every process below `root`, from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// A port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `ssh-keygen -t ed25519` into `path` (and `path.pub`).
async fn keygen(path: &Path, comment: &str, passphrase: &str) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .context("run ssh-keygen (package openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen -f {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The `SHA256:...` fingerprint of a public key file, from `ssh-keygen -lf`.
async fn fingerprint(public: &Path) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(public)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no SHA256 fingerprint in `ssh-keygen -lf` output {text:?}"))
}

/// Makes sure `/usr/sbin/sshd` exists: as root, installs `openssh-server` with apt-get.
async fn ensure_installed() -> anyhow::Result<()> {
    if Path::new(SSHD).exists() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "{SSHD} not found and not root: install it with `sudo apt-get install openssh-server`"
        );
    }
    tokio::task::spawn_blocking(install).await?
}

fn install() -> anyhow::Result<()> {
    // nextest runs tests in parallel processes: one installs, the others wait.
    let lock = File::create(std::env::temp_dir().join("vigil-openssh-server-install.lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("lock for installing openssh-server: {e}"))?;
    if Path::new(SSHD).exists() {
        return Ok(());
    }
    eprintln!("{SSHD} not found: installing openssh-server with apt-get");
    for args in [
        &["-o", "DPkg::Lock::Timeout=300", "update"][..],
        &[
            "-o",
            "DPkg::Lock::Timeout=300",
            "install",
            "-y",
            "--no-install-recommends",
            "openssh-server",
        ][..],
    ] {
        let out = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .context("run apt-get")?;
        if !out.status.success() {
            bail!(
                "apt-get {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    if !Path::new(SSHD).exists() {
        bail!("apt-get installed openssh-server but {SSHD} is still missing");
    }
    Ok(())
}
