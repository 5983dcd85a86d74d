//! Real Docker containers for tests: the docker CLI, the local busybox image (built by
//! `deploy/images/busybox.sh` from the host's static busybox, never pulled) and containers with
//! unique names, always removed when dropped. Docker is a real dependency of the tests that use
//! these: an unreachable engine fails them, naming the error.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

/// Runs the docker CLI; its trimmed standard output, or an error with its output.
pub fn try_docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("cannot run docker (is Docker installed and running?)")?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// [`try_docker`], panicking on failure.
pub fn docker(args: &[&str]) -> String {
    try_docker(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Builds (once; the script reuses the image) and returns the local busybox image name.
pub fn busybox_image() -> anyhow::Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/busybox.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .context("cannot run deploy/images/busybox.sh")?;
    if !out.status.success() {
        bail!(
            "building the busybox image failed (is the Docker engine running?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last() {
        Some(name) if !name.trim().is_empty() => Ok(name.trim().to_string()),
        _ => bail!("deploy/images/busybox.sh printed no image name"),
    }
}

/// A name no other test container has: `vigil-test-<pid>-<nanos>-<n>`.
pub fn unique_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "vigil-test-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A container of the busybox image, removed (`docker rm -f`) when dropped, however the test
/// ends.
pub struct Container {
    pub name: String,
    /// Host port on 127.0.0.1 published to the container's port 8080 (0: none).
    pub port: u16,
}

impl Container {
    /// `docker run -d --name NAME [options] IMAGE [command]`, the image being the busybox image.
    pub fn run(options: &[&str], command: &[&str]) -> anyhow::Result<Container> {
        let image = busybox_image()?;
        let name = unique_name();
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend_from_slice(options);
        args.push(&image);
        args.extend_from_slice(command);
        // Removed even if `docker run` created it and then failed.
        let container = Container {
            name: name.clone(),
            port: 0,
        };
        try_docker(&args)?;
        Ok(container)
    }

    /// A container with no network that runs `sh -c script`.
    pub fn run_sh(script: &str) -> anyhow::Result<Container> {
        Container::run(&["--network", "none"], &["sh", "-c", script])
    }

    /// Runs `busybox httpd` serving "vigil busybox ok" on a free 127.0.0.1 port.
    pub async fn run_busybox_httpd() -> anyhow::Result<Container> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let publish = format!("127.0.0.1:{port}:8080");
        let mut c =
            tokio::task::spawn_blocking(move || Container::run(&["-p", &publish], &[])).await??;
        c.port = port;
        Ok(c)
    }

    pub fn kill(&self) -> anyhow::Result<()> {
        try_docker(&["kill", &self.name]).map(|_| ())
    }

    pub fn running(&self) -> anyhow::Result<bool> {
        Ok(try_docker(&["inspect", "-f", "{{.State.Running}}", &self.name])? == "true")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}
