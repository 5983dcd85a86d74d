//! The one list of check kinds: the `type:` tag, its spec and its runner.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    Attachments, Outcome, SpecError, command, docker, gpu, grpc, http, presets, process, system,
    systemd, tcp, web,
};

/// Every check kind, tagged by `type:` in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(
    clippy::large_enum_variant,
    reason = "specs are built once per config load and not moved in hot loops; boxing would \
              only make matching on them clumsier"
)]
pub enum CheckKind {
    Http(http::HttpCheck),
    Tcp(tcp::TcpCheck),
    Command(command::CommandCheck),
    System(system::SystemCheck),
    Process(process::ProcessCheck),
    Systemd(systemd::SystemdCheck),
    Docker(docker::DockerCheck),
    Gpu(gpu::GpuCheck),
    Grpc(grpc::GrpcCheck),
    Web(web::WebCheck),
    DockerEngine(presets::DockerEngineCheck),
    Lxd(presets::LxdCheck),
    Incus(presets::LxdCheck),
    Proxmox(presets::ProxmoxCheck),
}

/// The `type:` names, for error messages and the agent's capabilities.
pub const KINDS: &[&str] = &[
    "http",
    "tcp",
    "command",
    "system",
    "process",
    "systemd",
    "docker",
    "gpu",
    "grpc",
    "web",
    "docker_engine",
    "lxd",
    "incus",
    "proxmox",
];

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Http(_) => "http",
            CheckKind::Tcp(_) => "tcp",
            CheckKind::Command(_) => "command",
            CheckKind::System(_) => "system",
            CheckKind::Process(_) => "process",
            CheckKind::Systemd(_) => "systemd",
            CheckKind::Docker(_) => "docker",
            CheckKind::Gpu(_) => "gpu",
            CheckKind::Grpc(_) => "grpc",
            CheckKind::Web(_) => "web",
            CheckKind::DockerEngine(_) => "docker_engine",
            CheckKind::Lxd(_) => "lxd",
            CheckKind::Incus(_) => "incus",
            CheckKind::Proxmox(_) => "proxmox",
        }
    }

    /// Deserializes the fields of kind `name` (a `type:` value, the tag itself removed) straight
    /// into that kind's struct, so that a deserializer that tracks positions or paths sees every
    /// field (the tagged enum buffers them to read `type:` first). `None` for an unknown kind.
    pub fn deserialize_as<'de, D: serde::Deserializer<'de>>(
        name: &str,
        d: D,
    ) -> Result<Option<CheckKind>, D::Error> {
        Ok(Some(match name {
            "http" => CheckKind::Http(Deserialize::deserialize(d)?),
            "tcp" => CheckKind::Tcp(Deserialize::deserialize(d)?),
            "command" => CheckKind::Command(Deserialize::deserialize(d)?),
            "system" => CheckKind::System(Deserialize::deserialize(d)?),
            "process" => CheckKind::Process(Deserialize::deserialize(d)?),
            "systemd" => CheckKind::Systemd(Deserialize::deserialize(d)?),
            "docker" => CheckKind::Docker(Deserialize::deserialize(d)?),
            "gpu" => CheckKind::Gpu(Deserialize::deserialize(d)?),
            "grpc" => CheckKind::Grpc(Deserialize::deserialize(d)?),
            "web" => CheckKind::Web(Deserialize::deserialize(d)?),
            "docker_engine" => CheckKind::DockerEngine(Deserialize::deserialize(d)?),
            "lxd" => CheckKind::Lxd(Deserialize::deserialize(d)?),
            "incus" => CheckKind::Incus(Deserialize::deserialize(d)?),
            "proxmox" => CheckKind::Proxmox(Deserialize::deserialize(d)?),
            _ => return Ok(None),
        }))
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        match self {
            CheckKind::Http(c) => c.validate(),
            CheckKind::Tcp(c) => c.validate(),
            CheckKind::Command(c) => c.validate(),
            CheckKind::System(c) => c.validate(),
            CheckKind::Process(c) => c.validate(),
            CheckKind::Systemd(c) => c.validate(),
            CheckKind::Docker(c) => c.validate(),
            CheckKind::Gpu(c) => c.validate(),
            CheckKind::Grpc(c) => c.validate(),
            CheckKind::Web(c) => c.validate(),
            CheckKind::DockerEngine(c) => c.validate(),
            CheckKind::Lxd(c) => c.validate(),
            CheckKind::Incus(c) => c.validate(),
            CheckKind::Proxmox(c) => c.validate(),
        }
    }

    pub(crate) fn attachments(&self) -> Vec<String> {
        match self {
            CheckKind::Http(c) => c.attachments(),
            CheckKind::Tcp(_)
            | CheckKind::Command(_)
            | CheckKind::System(_)
            | CheckKind::Process(_)
            | CheckKind::Systemd(_)
            | CheckKind::Docker(_)
            | CheckKind::Gpu(_)
            | CheckKind::Grpc(_)
            | CheckKind::Web(_)
            | CheckKind::DockerEngine(_)
            | CheckKind::Lxd(_)
            | CheckKind::Incus(_)
            | CheckKind::Proxmox(_) => Vec::new(),
        }
    }

    pub(crate) async fn run(&self, timeout: Duration, files: &Attachments) -> Outcome {
        match self {
            CheckKind::Http(c) => c.run(timeout, files).await,
            CheckKind::Tcp(c) => c.run(timeout).await,
            CheckKind::Command(c) => c.run(timeout).await,
            CheckKind::System(c) => c.run(timeout).await,
            CheckKind::Process(c) => c.run(timeout).await,
            CheckKind::Systemd(c) => c.run(timeout).await,
            CheckKind::Docker(c) => c.run(timeout).await,
            CheckKind::Gpu(c) => c.run(timeout).await,
            CheckKind::Grpc(c) => c.run(timeout).await,
            CheckKind::Web(c) => c.run(timeout, files).await,
            CheckKind::DockerEngine(c) => c.run(timeout).await,
            CheckKind::Lxd(c) => c.run("LXD", timeout).await,
            CheckKind::Incus(c) => c.run("Incus", timeout).await,
            CheckKind::Proxmox(c) => c.run(timeout).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde lists every variant in its "unknown variant" error: that list must equal KINDS,
    /// and each name must round-trip through `name()`.
    #[test]
    fn kinds_matches_the_enum() {
        let err = serde_json::from_value::<CheckKind>(serde_json::json!({"type": "vigil-nope"}))
            .unwrap_err()
            .to_string();
        let listed: Vec<String> = err
            .split("expected one of ")
            .nth(1)
            .unwrap_or_else(|| panic!("unexpected error text: {err}"))
            .split(", ")
            .map(|s| s.trim().trim_matches('`').to_string())
            .collect();
        assert_eq!(listed, KINDS, "{err}");
        for name in KINDS {
            // A bare tag fails on a missing field of the kind, never on an unknown variant.
            let e = serde_json::from_value::<CheckKind>(serde_json::json!({"type": name}));
            if let Err(e) = e {
                assert!(!e.to_string().contains("unknown variant"), "{name}: {e}");
            }
        }
    }

    #[test]
    fn deserialize_as_knows_every_kind() {
        for name in KINDS {
            // An empty mapping fails on a missing field or succeeds; never "unknown kind".
            let r = CheckKind::deserialize_as(name, serde_json::json!({}));
            assert!(!matches!(r, Ok(None)), "{name}");
            if let Ok(Some(k)) = r {
                assert_eq!(k.name(), *name);
            }
        }
        assert!(matches!(
            CheckKind::deserialize_as("nope", serde_json::json!({})),
            Ok(None)
        ));
    }

    #[test]
    fn name_agrees_with_the_tag() {
        for (v, name) in [
            (
                serde_json::json!({"type": "http", "request": {"url": "http://a/"}}),
                "http",
            ),
            (serde_json::json!({"type": "tcp", "address": "a:1"}), "tcp"),
            (
                serde_json::json!({"type": "command", "argv": ["true"]}),
                "command",
            ),
            (
                serde_json::json!({"type": "system", "memory": {}}),
                "system",
            ),
            (
                serde_json::json!({"type": "process", "name": "x"}),
                "process",
            ),
            (
                serde_json::json!({"type": "systemd", "unit": "ssh.service"}),
                "systemd",
            ),
            (
                serde_json::json!({"type": "docker", "container": "x"}),
                "docker",
            ),
            (serde_json::json!({"type": "gpu"}), "gpu"),
            (
                serde_json::json!({"type": "grpc", "address": "a:1"}),
                "grpc",
            ),
            (
                serde_json::json!({"type": "web", "url": "http://a/"}),
                "web",
            ),
            (
                serde_json::json!({"type": "docker_engine", "url": "http://a:2375"}),
                "docker_engine",
            ),
            (
                serde_json::json!({"type": "lxd", "url": "https://a:8443", "tls": {"client_cert": "/c", "client_key": "/k"}}),
                "lxd",
            ),
            (
                serde_json::json!({"type": "incus", "url": "https://a:8443", "tls": {"client_cert": "/c", "client_key": "/k"}}),
                "incus",
            ),
            (
                serde_json::json!({"type": "proxmox", "url": "https://a:8006", "token_id": "root@pam!mon", "token_secret_env": "PVE_SECRET"}),
                "proxmox",
            ),
        ] {
            let k: CheckKind =
                serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(k.name(), name);
            k.validate().unwrap_or_else(|e| panic!("{v}: {e}"));
            assert!(KINDS.contains(&k.name()));
        }
    }
}
