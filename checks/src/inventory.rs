//! What a node is: OS, kernel, CPUs, memory, Docker version and GPUs, collected once by the
//! agent and sent in its hello. Every part is best effort: a missing fact is empty or `None`,
//! never an error, and the whole collection is bounded in time (Docker 2 s, NVML on a blocking
//! thread).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The facts about one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// `PRETTY_NAME` of `/etc/os-release` (`Debian GNU/Linux 12 (bookworm)`).
    pub os: String,
    /// Kernel release (`6.1.0-18-amd64`).
    pub kernel: String,
    /// Machine architecture (`x86_64`).
    pub arch: String,
    /// Online CPUs.
    pub cpu_count: u64,
    /// Physical memory (`MemTotal`).
    pub memory_bytes: u64,
    /// Docker engine version, when an engine answers on the local socket within 2 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_version: Option<String>,
    /// NVIDIA GPUs seen by NVML (empty without a driver).
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
}

/// One GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub model: String,
    pub memory_bytes: u64,
    pub driver_version: String,
}

/// Longest wait for the Docker engine.
const DOCKER_BOUND: Duration = Duration::from_secs(2);
/// Longest wait for NVML.
const NVML_BOUND: Duration = Duration::from_secs(5);

fn os_pretty_name(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix("PRETTY_NAME=")?;
        Some(v.trim().trim_matches('"').to_string())
    })
}

fn gpus() -> Vec<GpuInfo> {
    let Ok(nvml) = crate::gpu::nvml() else {
        return Vec::new();
    };
    let driver = nvml.sys_driver_version().unwrap_or_default();
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok())
        .map(|d| GpuInfo {
            model: d.name().unwrap_or_default(),
            memory_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
            driver_version: driver.clone(),
        })
        .collect()
}

async fn docker_version() -> Option<String> {
    let v = tokio::time::timeout(DOCKER_BOUND, async {
        let docker = crate::docker::connect(None, DOCKER_BOUND).await.ok()?;
        docker.version().await.ok()?.version
    })
    .await;
    v.ok().flatten()
}

/// Collects the inventory of this machine.
pub async fn collect() -> Inventory {
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| os_pretty_name(&t))
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    let (kernel, arch) = match nix::sys::utsname::uname() {
        Ok(u) => (
            u.release().to_string_lossy().into_owned(),
            u.machine().to_string_lossy().into_owned(),
        ),
        Err(_) => (String::new(), std::env::consts::ARCH.to_string()),
    };
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| crate::system::parse_meminfo(&t).ok())
        .map_or(0, |m| m.total);
    let gpu_job = tokio::task::spawn_blocking(gpus);
    let (docker_version, gpus) = tokio::join!(docker_version(), async {
        tokio::time::timeout(NVML_BOUND, gpu_job)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    });
    let inv = Inventory {
        os,
        kernel,
        arch,
        cpu_count: crate::system::online_cpus(),
        memory_bytes,
        docker_version,
        gpus,
    };
    tracing::debug!(os = %inv.os, kernel = %inv.kernel, cpus = inv.cpu_count,
        docker = ?inv.docker_version, gpus = inv.gpus.len(), "inventory collected");
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_parsing() {
        let t = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            os_pretty_name(t).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(os_pretty_name("ID=x"), None);
    }

    #[tokio::test]
    async fn filled_on_this_machine() {
        let inv = collect().await;
        assert!(!inv.os.is_empty(), "{inv:?}");
        assert!(!inv.kernel.is_empty(), "{inv:?}");
        assert!(!inv.arch.is_empty(), "{inv:?}");
        assert!(inv.cpu_count >= 1);
        assert!(inv.memory_bytes > 0);
        // The development machines run a Docker engine and have no GPU.
        assert!(
            inv.docker_version.as_deref().is_some_and(|v| !v.is_empty()),
            "Docker engine expected on this machine: {inv:?}"
        );
        if !std::path::Path::new("/proc/driver/nvidia/version").exists() {
            assert!(inv.gpus.is_empty(), "{inv:?}");
        }
        let json = serde_json::to_value(&inv).unwrap();
        assert!(json.get("cpu_count").is_some());
        let back: Inventory = serde_json::from_value(json).unwrap();
        assert_eq!(back, inv);
    }
}
