//! Private PostgreSQL for tests: every test gets a fresh database, on the server named by
//! `VIGIL_TEST_DATABASE_URL` or on a throwaway cluster this process starts with `initdb`/`postgres`.
//!
//! `deploy/test.sh` starts one cluster for the whole test run and exports `VIGIL_TEST_DATABASE_URL`;
//! the private-cluster path is for developers running `cargo nextest run` by hand. The private
//! cluster is started once per process (nextest runs every test in its own process) and lives in a
//! temp dir; a small `sh` watchdog holding a pipe from this process shuts it down
//! (`SIGQUIT`, immediate) and deletes the directory as soon as this process exits, however it exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use tokio_postgres::NoTls;

/// Admin URL of a running server (a role that may `CREATE DATABASE`), e.g.
/// `postgres://postgres@127.0.0.1:5432/postgres`.
pub const DATABASE_URL_ENV: &str = "VIGIL_TEST_DATABASE_URL";
/// Set to `1` to keep the per-test databases (for debugging a failed test).
pub const KEEP_DB_ENV: &str = "VIGIL_TEST_KEEP_DB";
/// Directory holding `initdb`, `postgres` and `pg_isready`, overriding the search.
pub const PG_BIN_ENV: &str = "VIGIL_PG_BIN";

const MISSING_BINARIES: &str = "PostgreSQL server binaries not found; run deploy/pg.sh install or apt-get install postgresql \
     (or set VIGIL_PG_BIN to the directory holding initdb and postgres, or VIGIL_TEST_DATABASE_URL to a running server)";

/// A fresh, uniquely named database. Dropping it drops the database (best effort, `WITH (FORCE)`),
/// unless `VIGIL_TEST_KEEP_DB=1`.
#[derive(Debug)]
pub struct TestDb {
    /// URL of the fresh database, for `tokio_postgres::connect` / deadpool / the collector config.
    pub url: String,
    /// Name of the fresh database (`vigil_test_<random>`).
    pub name: String,
    admin_url: String,
}

impl TestDb {
    /// URL of the admin database on the same server.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Connects to the fresh database; the connection is driven by a spawned task.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var(KEEP_DB_ENV).is_ok_and(|v| v == "1") {
            eprintln!("keeping test database {}", self.url);
            return;
        }
        let admin = self.admin_url.clone();
        let sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&self.name)
        );
        // A fresh thread with its own runtime: Drop may run inside any kind of runtime (or none).
        let worker = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    if let Ok(client) = connect(&admin).await {
                        let _ = client.batch_execute(&sql).await;
                    }
                })
                .await;
            });
        });
        let _ = worker.join();
    }
}

/// Creates a fresh database on `VIGIL_TEST_DATABASE_URL`, or on this process's private cluster
/// (started on first use).
pub async fn test_db() -> anyhow::Result<TestDb> {
    let admin_url = admin_url().await?;
    let name = format!("vigil_test_{:016x}", rand::random::<u64>());
    let client = connect(&admin_url)
        .await
        .with_context(|| format!("connecting to the test server {}", redact(&admin_url)))?;
    client
        .batch_execute(&format!(
            "CREATE DATABASE {} TEMPLATE template0",
            quote_ident(&name)
        ))
        .await
        .with_context(|| format!("creating test database {name}"))?;
    Ok(TestDb {
        url: with_database(&admin_url, &name),
        name,
        admin_url,
    })
}

/// The admin URL tests create their databases on: `VIGIL_TEST_DATABASE_URL`, or the private
/// cluster of this process (started on first call).
pub async fn admin_url() -> anyhow::Result<String> {
    if let Ok(url) = std::env::var(DATABASE_URL_ENV)
        && !url.trim().is_empty()
    {
        return Ok(url.trim().to_owned());
    }
    let cluster = tokio::task::spawn_blocking(|| {
        CLUSTER
            .get_or_init(|| start_private_cluster().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map(|c| c.admin_url.clone())
            .map_err(|e| anyhow!("starting the private PostgreSQL cluster: {e}"))
    })
    .await
    .context("cluster start task panicked")??;
    Ok(cluster)
}

/// The directory holding the PostgreSQL server binaries (`initdb`, `postgres`, `pg_ctl`):
/// `VIGIL_PG_BIN`, else the newest `/usr/lib/postgresql/<version>/bin`, else `initdb` on `PATH`.
pub fn ensure_postgres_binaries() -> anyhow::Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os(PG_BIN_ENV) {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
        bail!(
            "{PG_BIN_ENV}={} holds no initdb/postgres; {MISSING_BINARIES}",
            dir.display()
        );
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let initdb = dir.join("initdb");
        if initdb.is_file() {
            // Follow symlinks such as /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb.
            let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
            if let Some(parent) = real.parent()
                && has_server(parent)
            {
                return Ok(parent.to_path_buf());
            }
        }
    }
    bail!("{MISSING_BINARIES}")
}

/// Connects with `NoTls` and drives the connection on a spawned task.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with its database replaced by `db` (URL form `postgres://…/db?…` or key=value form).
pub fn with_database(url: &str, db: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return format!("{url} dbname={db}");
    };
    let (base, query) = match url.find('?') {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &base[..authority_end])
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn redact(url: &str) -> String {
    // postgres://user:secret@host -> postgres://user:***@host
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if url[s + 3..at].contains(':') => {
            let colon = s + 3 + url[s + 3..at].find(':').unwrap_or(0);
            format!("{}:***{}", &url[..colon], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The private cluster. The watchdog shell exits (stopping postgres and deleting `dir`) when
/// `watchdog_stdin` is closed, which the kernel does when this process exits.
struct Cluster {
    admin_url: String,
    _watchdog: Mutex<(Child, ChildStdin)>,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// Runs initdb and postgres, waits for EOF on stdin, then stops postgres and removes the cluster
/// directory — also when this process is killed during initdb. On an initdb failure it writes
/// `initdb.failed` and waits for EOF before removing the directory, so its log can be read.
/// Arguments: $1 binaries directory, $2 cluster dir, $3 port.
const WATCHDOG: &str = r#"
if ! "$1/initdb" -D "$2/data" -A trust -U postgres -E UTF8 --locale=C --no-sync \
    </dev/null >"$2/initdb.log" 2>&1; then
    : >"$2/initdb.failed"
    cat >/dev/null
    rm -rf "$2"
    exit 1
fi
"$1/postgres" -D "$2/data" -p "$3" -k "$2" -F \
    -c listen_addresses=127.0.0.1 -c max_connections=200 \
    -c synchronous_commit=off -c full_page_writes=off \
    </dev/null >"$2/postgres.log" 2>&1 &
pg=$!
alive() { [ -d "/proc/$pg" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pg/status" 2>/dev/null; }
cat >/dev/null
# sh starts background jobs with SIGQUIT ignored; postgres installs its handlers before it
# writes postmaster.pid, so wait for that file (bounded) before asking for an immediate shutdown.
i=0
while alive && [ ! -f "$2/data/postmaster.pid" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
kill -QUIT "$pg" 2>/dev/null
i=0
while alive && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
kill -KILL "$pg" 2>/dev/null
wait "$pg"
rm -rf "$2"
"#;

fn start_private_cluster() -> anyhow::Result<Cluster> {
    let bin = ensure_postgres_binaries()?;
    let mut last_error = None;
    // Retry: the free port we picked may be taken before postgres binds it.
    for _ in 0..3 {
        match try_start_cluster(&bin) {
            Ok(cluster) => return Ok(cluster),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("no attempt made")))
}

fn try_start_cluster(bin: &Path) -> anyhow::Result<Cluster> {
    let as_root = nix::unistd::geteuid().is_root();
    let dir = tempfile::Builder::new()
        .prefix("vigil-pg-")
        .tempdir_in(cluster_parent(as_root))
        .context("creating the cluster directory")?
        .keep();
    if as_root {
        let user = nix::unistd::User::from_name("postgres")
            .context("looking up the postgres user")?
            .ok_or_else(|| {
                anyhow!("running as root but there is no `postgres` user to run the server as; {MISSING_BINARIES}")
            })?;
        std::os::unix::fs::chown(&dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .with_context(|| format!("chown postgres {}", dir.display()))?;
    }
    let result = init_and_run(bin, &dir, as_root);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn init_and_run(bin: &Path, dir: &Path, as_root: bool) -> anyhow::Result<Cluster> {
    let port = free_port()?;
    let mut watchdog = pg_command(Path::new("/bin"), "sh", as_root)
        .args(["-c", WATCHDOG, "vigil-pg-watchdog"])
        .arg(bin)
        .arg(dir)
        .arg(port.to_string())
        .stdin(Stdio::piped())
        // Not inherited: a test runner waits for its test's stdout/stderr to close.
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting initdb and postgres")?;
    let stdin = watchdog.stdin.take().context("watchdog stdin")?;

    let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    if let Err(e) = wait_ready(bin, dir, port, as_root) {
        drop(stdin); // stops postgres and removes the directory
        let _ = watchdog.wait();
        return Err(e);
    }
    Ok(Cluster {
        admin_url,
        _watchdog: Mutex::new((watchdog, stdin)),
    })
}

fn wait_ready(bin: &Path, dir: &Path, port: u16, as_root: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let log = dir.join("postgres.log");
    loop {
        if dir.join("initdb.failed").exists() {
            let out = std::fs::read_to_string(dir.join("initdb.log")).unwrap_or_default();
            bail!("initdb failed:\n{out}");
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("could not create any TCP/IP sockets")
            || text.contains("database system is shut down")
        {
            bail!("postgres failed to start on port {port}:\n{text}");
        }
        // No postmaster.pid: initdb still runs, or postgres has not started yet.
        if dir.join("data").join("postmaster.pid").exists()
            && pg_command(bin, "pg_isready", as_root)
                .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-t", "2"])
                .args(["-d", "postgres", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running pg_isready")?
                .success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("postgres not ready on port {port} within 90 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where the cluster directory goes: the temp dir, unless root's temp dir is not traversable
/// by the postgres user, in which case /tmp.
fn cluster_parent(as_root: bool) -> PathBuf {
    let tmp = std::env::temp_dir();
    if !as_root {
        return tmp;
    }
    // Every ancestor must be searchable by "others" (the postgres user).
    use std::os::unix::fs::PermissionsExt as _;
    let traversable = tmp
        .ancestors()
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if traversable {
        tmp
    } else {
        PathBuf::from("/tmp")
    }
}

/// `bin/prog`, run as the postgres user when we are root (initdb and postgres refuse to run as
/// root), from `/` so the postgres user can always access its working directory.
fn pg_command(bin: &Path, prog: &str, as_root: bool) -> Command {
    let mut cmd = if as_root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(bin.join(prog));
        cmd
    } else {
        Command::new(bin.join(prog))
    };
    cmd.current_dir("/");
    cmd
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_database_in_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgresql://h", "x"), "postgresql://h/x");
        assert_eq!(with_database("postgres://h?a=b", "x"), "postgres://h/x?a=b");
        assert_eq!(
            with_database("host=h user=u", "x"),
            "host=h user=u dbname=x"
        );
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn finds_binaries() {
        let bin = ensure_postgres_binaries().expect("postgres installed on the test machine");
        assert!(bin.join("initdb").is_file());
    }

    #[tokio::test]
    async fn creates_a_fresh_database() {
        let a = test_db().await.expect("test db");
        let b = test_db().await.expect("second test db");
        assert_ne!(a.name, b.name);
        let client = a.connect().await.expect("connect");
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        let db: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(db, a.name);
        let name = a.name.clone();
        let admin = a.admin_url().to_owned();
        drop(client);
        drop(a);
        let admin = connect(&admin).await.expect("admin connect");
        let left = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .unwrap();
        let kept = std::env::var(KEEP_DB_ENV).is_ok_and(|v| v == "1");
        assert_eq!(left.is_some(), kept, "database {name} dropped iff not kept");
    }
}
