//! The benchmark's surroundings: a private PostgreSQL (deploy/pg.sh) or the one named by
//! `VIGIL_BENCH_DATABASE_URL`, a fresh database per scenario, a workspace with certificates and
//! configs, the collector and agent as subprocesses, and figures read from /proc.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_postgres::NoTls;

/// Admin URL of a running PostgreSQL (a role that may CREATE DATABASE); when unset the bench
/// starts its own cluster with deploy/pg.sh.
pub const DATABASE_URL_ENV: &str = "VIGIL_BENCH_DATABASE_URL";

/// The repository root (for deploy/pg.sh).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A free TCP port on 127.0.0.1 (released at once; good enough on a quiet machine).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A PostgreSQL server for the whole run.
pub struct Pg {
    pub admin_url: String,
    /// The cluster directory when this process started it (stopped on drop).
    dir: Option<PathBuf>,
}

impl Pg {
    pub fn start() -> anyhow::Result<Pg> {
        if let Ok(url) = std::env::var(DATABASE_URL_ENV) {
            return Ok(Pg {
                admin_url: url,
                dir: None,
            });
        }
        let dir = PathBuf::from(format!("/tmp/vigil-bench-pg-{}", std::process::id()));
        let port = free_port()?.to_string();
        let pg_sh = repo_root().join("deploy/pg.sh");
        let dir_s = dir.to_string_lossy().to_string();
        let out = Command::new(&pg_sh)
            .args(["start", &dir_s, &port])
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("run {}", pg_sh.display()))?;
        if !out.status.success() {
            bail!("deploy/pg.sh start failed ({})", out.status);
        }
        let out = Command::new(&pg_sh)
            .args(["admin-url", &dir_s, &port])
            .output()?;
        let admin_url = String::from_utf8(out.stdout)?.trim().to_string();
        Ok(Pg {
            admin_url,
            dir: Some(dir),
        })
    }

    /// Pid of the postmaster when this process started the cluster.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let dir = self.dir.as_ref()?;
        let text = std::fs::read_to_string(dir.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Creates a fresh database and returns its URL.
    pub async fn fresh_db(&self, name: &str) -> anyhow::Result<String> {
        let client = connect(&self.admin_url).await?;
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let mut cfg: tokio_postgres::Config = self.admin_url.parse()?;
        cfg.dbname(name);
        Ok(url_of(&cfg))
    }

    pub async fn drop_db(&self, name: &str) {
        if let Ok(client) = connect(&self.admin_url).await {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }

    /// The server's version and the settings that matter for write speed.
    pub async fn describe(&self) -> anyhow::Result<String> {
        let client = connect(&self.admin_url).await?;
        let mut s = String::new();
        let v: String = client.query_one("SHOW server_version", &[]).await?.get(0);
        write!(s, "PostgreSQL {v}")?;
        for name in [
            "fsync",
            "synchronous_commit",
            "shared_buffers",
            "wal_level",
            "max_wal_size",
        ] {
            let v: String = client.query_one(&format!("SHOW {name}"), &[]).await?.get(0);
            write!(s, ", {name}={v}")?;
        }
        Ok(s)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = Command::new(repo_root().join("deploy/pg.sh"))
                .args(["stop", &dir.to_string_lossy()])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn url_of(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let db = cfg.get_dbname().unwrap_or("postgres");
    match cfg.get_password() {
        Some(p) => format!(
            "postgres://{user}:{}@{host}:{port}/{db}",
            String::from_utf8_lossy(p)
        ),
        None => format!("postgres://{user}@{host}:{port}/{db}"),
    }
}

/// A connection driven by a spawned task.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// One service in the collector's config.
pub struct ServiceDef {
    pub id: String,
    pub node: String,
    /// The `check:` block's lines (indented by two spaces); `None`: `/bin/true` every hour (the
    /// simulated agents never run checks).
    pub check: Option<String>,
    /// `on_failure: {action: restart, after: 1}` with a `true` restart step run by the agent.
    pub restart: bool,
}

/// A directory with the CA, node certificates, collector.yaml and service files.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    /// Creates the CA and a certificate for every node (in parallel).
    pub fn new(nodes: &[String]) -> anyhow::Result<Workspace> {
        let dir = tempfile::Builder::new().prefix("vigil-bench-").tempdir()?;
        let certs = dir.path().join("certs");
        vigil_collector::ca::init(&certs, &[])?;
        std::fs::create_dir(dir.path().join("services"))?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunk = nodes.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .chunks(chunk)
                .map(|part| {
                    let certs = &certs;
                    s.spawn(move || -> anyhow::Result<()> {
                        for n in part {
                            vigil_collector::ca::issue(certs, n)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("issuer panicked"))??;
            }
            anyhow::Ok(())
        })?;
        Ok(Workspace { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn certs(&self) -> PathBuf {
        self.path().join("certs")
    }

    /// Writes collector.yaml and one service file per service (grouped per node).
    pub fn write_collector(
        &self,
        database_url: &str,
        listen: SocketAddr,
        pool_size: usize,
        nodes: &[String],
        services: &[ServiceDef],
    ) -> anyhow::Result<PathBuf> {
        let mut text = format!(
            "grpc_listen: {listen}\nhttp: {{ listen: null }}\nmetrics: {{ listen: null }}\n\
             database: {{ url: \"{database_url}\", pool_size: {pool_size} }}\n\
             tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\n\
             services_dir: services\n\
             nodes:\n"
        );
        for n in nodes {
            writeln!(text, "  - {{ name: {n}, address: 127.0.0.1 }}")?;
        }
        let path = self.path().join("collector.yaml");
        std::fs::write(&path, text)?;
        for s in services {
            let check = s
                .check
                .as_deref()
                .unwrap_or("  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\n");
            let mut y = format!(
                "id: {}\ncategory: system\nnode: {}\ncheck:\n{check}",
                s.id, s.node
            );
            if s.restart {
                y.push_str(
                    "control:\n  via: agent\n  restart: [[\"true\"]]\n\
                     on_failure:\n  action: restart\n  after: 1\n  grace: 0s\n  max_restarts: 1000\n",
                );
            }
            std::fs::write(
                self.path().join("services").join(format!("{}.yaml", s.id)),
                y,
            )?;
        }
        Ok(path)
    }

    /// Writes an agent.yaml for a real `vigil-agent`.
    pub fn write_agent(&self, node: &str, collector: SocketAddr) -> anyhow::Result<PathBuf> {
        let text = format!(
            "node: {node}\n\
             collector:\n  url: https://{collector}\n  server_name: localhost\n  connect_timeout: 5s\n\
             tls: {{ ca: certs/ca.pem, cert: certs/{node}.pem, key: certs/{node}.key }}\n\
             state_dir: agent-{node}\n"
        );
        let path = self.path().join(format!("agent-{node}.yaml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// A workspace binary next to this one (`cargo build --release -p vigil-collector -p vigil-agent`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("no executable directory")?.join(name);
    if !path.exists() {
        bail!(
            "{} is missing; build it next to vigil-bench: cargo build --release -p vigil-bench -p vigil-collector -p vigil-agent",
            path.display()
        );
    }
    Ok(path)
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(
        bin: &Path,
        args: &[&str],
        cwd: &Path,
        log: PathBuf,
        rust_log: &str,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", rust_log)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Proc { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts TCP connections; fails if the process exits first.
    pub fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                bail!(
                    "process exited ({st}) before listening on {addr}; log tail:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {addr} after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's open-file limit to its hard limit (children inherit it); returns it.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

/// Clock ticks per second (for /proc/PID/stat times).
pub fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// CPU and memory of one process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// utime + stime, in seconds.
    pub cpu_s: f64,
    /// cutime + cstime (reaped children), in seconds.
    pub children_cpu_s: f64,
    pub rss_kb: u64,
    /// The part of `rss_kb` that is heap and stacks (the rest: the mapped binary and libraries).
    pub rss_anon_kb: u64,
    pub hwm_kb: u64,
    pub threads: u64,
    pub at: Option<Instant>,
}

pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15, cutime 16, cstime 17.
    let num = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let tck = clk_tck();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_s: (num(14) + num(15)) / tck,
        children_cpu_s: (num(16) + num(17)) / tck,
        rss_kb: kb("VmRSS:"),
        rss_anon_kb: kb("RssAnon:"),
        hwm_kb: kb("VmHWM:"),
        threads: kb("Threads:"),
        at: Some(Instant::now()),
    })
}

/// CPU seconds of a process and all its descendants that are alive now (for PostgreSQL: the
/// postmaster and its backends), plus what reaped children used.
pub fn tree_cpu(root: u32) -> f64 {
    let mut total = 0.0;
    let mut pids = vec![root];
    let mut i = 0;
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                    let rest = stat.rsplit_once(')')?.1;
                    let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
                    Some((pid, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    while i < pids.len() {
        let p = pids[i];
        pids.extend(all.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    for p in pids {
        if let Ok(s) = sample(p) {
            total += s.cpu_s + if p == root { s.children_cpu_s } else { 0.0 };
        }
    }
    total
}

/// This process's CPU seconds.
pub fn self_cpu() -> f64 {
    sample(std::process::id()).map_or(0.0, |s| s.cpu_s)
}
