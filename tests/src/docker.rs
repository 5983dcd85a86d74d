//! Real Docker containers for tests: the local busybox image (built by deploy/images/busybox.sh,
//! no registry needed), run with a published port, killed, inspected, always removed.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("cannot run docker (is Docker installed and running?)")?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds (once) and returns the local busybox image name.
pub fn busybox_image() -> anyhow::Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/busybox.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .context("cannot run deploy/images/busybox.sh")?;
    if !out.status.success() {
        bail!(
            "building the busybox image failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A container removed when dropped.
pub struct Container {
    pub name: String,
    /// Host port on 127.0.0.1 published to the container's port 8080.
    pub port: u16,
}

impl Container {
    /// Runs `busybox httpd` serving "vigil busybox ok" on a free 127.0.0.1 port.
    pub async fn run_busybox_httpd() -> anyhow::Result<Container> {
        let image = tokio::task::spawn_blocking(busybox_image).await??;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let name = format!("vigil-test-{:016x}", rand::random::<u64>());
        docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "-p",
            &format!("127.0.0.1:{port}:8080"),
            &image,
        ])?;
        Ok(Container { name, port })
    }

    pub fn kill(&self) -> anyhow::Result<()> {
        docker(&["kill", &self.name]).map(|_| ())
    }

    pub fn running(&self) -> anyhow::Result<bool> {
        Ok(docker(&["inspect", "-f", "{{.State.Running}}", &self.name])? == "true")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}
