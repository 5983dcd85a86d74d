//! End-to-end test of the docker compose deployment: builds the images locally
//! (deploy/docker/build-images.sh, from the debug binaries; no registry), runs the repository's
//! docker-compose.yml under a unique project name, waits until the agent has reported the demo
//! service healthy, kills the demo container and waits until Vigil has restarted it (an automatic
//! restart succeeded in `commands`, the container runs again, the service is healthy again).
//! Everything is torn down with `down -v`, whatever happens.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Bound for each wait (the whole test takes about a minute once the images are cached).
const LIMIT: Duration = Duration::from_secs(90);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// Runs a command; its stdout on success, an error with its stderr otherwise.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Polls `f` until it returns `Some`, at most `limit`; the error says what was awaited.
fn poll<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("; last error: {e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}{last}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `docker compose` (v2 plugin) when present, else `docker-compose` (v1).
fn compose_program() -> anyhow::Result<Vec<String>> {
    let works = |argv: &[&str]| {
        Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if works(&["docker", "compose", "version"]) {
        Ok(vec!["docker".into(), "compose".into()])
    } else if works(&["docker-compose", "version"]) {
        Ok(vec!["docker-compose".into()])
    } else {
        bail!("neither `docker compose` nor `docker-compose` is installed")
    }
}

/// One compose project; `down -v` when dropped (logs first if the test failed).
struct Project {
    program: Vec<String>,
    name: String,
    file: PathBuf,
    env: Vec<(String, String)>,
    _config: tempfile::TempDir,
}

impl Project {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(&self.file)
            .args(args)
            .current_dir(repo_root())
            .env_remove("COMPOSE_FILE")
            .env_remove("COMPOSE_PROJECT_NAME")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&mut self.cmd(args))
    }

    /// One value from the deployment's database (psql inside the postgres container).
    fn sql(&self, query: &str) -> anyhow::Result<String> {
        self.compose(&[
            "exec",
            "-T",
            "postgres",
            "psql",
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "vigil",
            "-d",
            "vigil",
            "-c",
            query,
        ])
    }

    fn app_container(&self) -> String {
        format!("{}-app", self.name)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = self.cmd(&["ps"]).output() {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
            if let Ok(out) = self.cmd(&["logs", "--no-color", "--tail", "60"]).output() {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        match self
            .cmd(&["down", "-v", "--remove-orphans", "-t", "5"])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "compose down -v of {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run compose down -v for {}: {e}", self.name),
        }
    }
}

/// Copies config/compose into a world-readable temporary directory (the containers run as uid
/// 10001), with the demo container's name made unique to this project.
fn config_copy(container: &str) -> anyhow::Result<tempfile::TempDir> {
    let src = repo_root().join("config/compose");
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let services = dir.path().join("services");
    std::fs::create_dir(&services)?;
    std::fs::set_permissions(&services, std::fs::Permissions::from_mode(0o755))?;
    let mut replaced = false;
    for rel in ["collector.yaml", "agent.yaml", "services/demo-app.yaml"] {
        let mut text = std::fs::read_to_string(src.join(rel))
            .with_context(|| format!("read config/compose/{rel}"))?;
        if rel == "services/demo-app.yaml" {
            let from = "container: vigil-demo-app";
            replaced = text.contains(from);
            text = text.replace(from, &format!("container: {container}"));
        }
        let to = dir.path().join(rel);
        std::fs::write(&to, text)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
    }
    if !replaced {
        bail!("config/compose/services/demo-app.yaml no longer says `container: vigil-demo-app`");
    }
    Ok(dir)
}

/// Builds the local images; returns the compose variables that select them.
fn build_images() -> anyhow::Result<Vec<(String, String)>> {
    let bin_dir = vigil_tests::binary("vigil-collector")?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    for b in ["vigil-agent", "vigil-testsvc"] {
        vigil_tests::binary(b)?;
    }
    let script = repo_root().join("deploy/docker/build-images.sh");
    let out = run(Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(&bin_dir))?;
    let vars: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if vars.len() != 4 {
        bail!("unexpected output of build-images.sh: {out}");
    }
    Ok(vars)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[test]
fn compose_deployment_restarts_a_killed_container() -> anyhow::Result<()> {
    let started = Instant::now();
    let program = compose_program()?;
    let mut env = build_images()?;
    eprintln!("images built in {:?}", started.elapsed());

    let name = format!("vigil-e2e-{:08x}", rand::random::<u32>());
    let container = format!("{name}-app");
    let config = config_copy(&container)?;
    let docker_gid = std::fs::metadata("/var/run/docker.sock")
        .context("the Docker socket /var/run/docker.sock")?
        .gid();
    env.extend(
        [
            ("VIGIL_CONFIG_DIR", config.path().display().to_string()),
            ("VIGIL_DEMO_CONTAINER", container.clone()),
            ("VIGIL_GRPC_PORT", free_port()?.to_string()),
            ("VIGIL_HTTP_PORT", free_port()?.to_string()),
            ("VIGIL_METRICS_PORT", free_port()?.to_string()),
            (
                "VIGIL_DB_PASSWORD",
                format!("pw-{:016x}", rand::random::<u64>()),
            ),
            // The agent as the image's unprivileged user, with the socket's group.
            ("VIGIL_AGENT_USER", "10001:10001".to_string()),
            ("VIGIL_DOCKER_GID", docker_gid.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let project = Project {
        program,
        name,
        file: repo_root().join("docker-compose.yml"),
        env,
        _config: config,
    };
    assert_eq!(project.app_container(), container);

    project.compose(&["up", "-d"])?;
    eprintln!("compose up done at {:?}", started.elapsed());

    // The agent reports: the demo service becomes healthy.
    poll("the demo service healthy", LIMIT, || {
        let state = project.sql("SELECT state FROM service_state WHERE service_id = 'demo-app'")?;
        Ok((state == "healthy").then_some(()))
    })?;
    let table = project.compose(&[
        "exec",
        "-T",
        "collector",
        "vigil-collector",
        "status",
        "--config",
        "/etc/vigil/collector.yaml",
    ])?;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("demo-app") && l.contains("HEALTHY")),
        "status table: {table}"
    );
    eprintln!("demo-app healthy at {:?}", started.elapsed());

    // Kill the demo container (no restart policy): Vigil must bring it back.
    run(Command::new("docker").args(["kill", &container]))?;
    poll("an automatic restart that succeeded", LIMIT, || {
        let n = project.sql(
            "SELECT count(*) FROM commands WHERE service_id = 'demo-app' AND action = 'restart' \
             AND origin = 'auto' AND status = 'succeeded' AND via = 'agent'",
        )?;
        Ok((n != "0").then_some(()))
    })?;
    eprintln!("restarted at {:?}", started.elapsed());
    poll("the demo container running again", LIMIT, || {
        let running =
            run(Command::new("docker").args(["inspect", "-f", "{{.State.Running}}", &container]))?;
        Ok((running == "true").then_some(()))
    })?;
    poll(
        "the demo service healthy again after being down",
        LIMIT,
        || {
            let ok = project.sql(
            "SELECT (SELECT state FROM service_state WHERE service_id = 'demo-app') = 'healthy' \
             AND EXISTS (SELECT 1 FROM events e WHERE e.service_id = 'demo-app' \
               AND e.to_state = 'healthy' AND e.at > (SELECT max(at) FROM events \
               WHERE service_id = 'demo-app' AND to_state = 'down'))",
        )?;
            Ok((ok == "t").then_some(()))
        },
    )?;
    eprintln!("healthy again at {:?}", started.elapsed());
    drop(project);
    eprintln!("torn down at {:?}", started.elapsed());
    Ok(())
}
