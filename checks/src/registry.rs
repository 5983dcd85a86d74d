//! The one list of check kinds: the `type:` tag, its spec and its runner.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Attachments, Outcome, SpecError, command, http, tcp};

/// Every check kind, tagged by `type:` in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[allow(
    clippy::large_enum_variant,
    reason = "specs are built once per config load and not moved in hot loops; boxing would \
              only make matching on them clumsier"
)]
pub enum CheckKind {
    Http(http::HttpCheck),
    Tcp(tcp::TcpCheck),
    Command(command::CommandCheck),
}

/// The `type:` names, for error messages and the agent's capabilities.
pub const KINDS: &[&str] = &["http", "tcp", "command"];

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Http(_) => "http",
            CheckKind::Tcp(_) => "tcp",
            CheckKind::Command(_) => "command",
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        match self {
            CheckKind::Http(c) => c.validate(),
            CheckKind::Tcp(c) => c.validate(),
            CheckKind::Command(c) => c.validate(),
        }
    }

    pub(crate) fn attachments(&self) -> Vec<String> {
        match self {
            CheckKind::Http(c) => c.attachments(),
            CheckKind::Tcp(_) | CheckKind::Command(_) => Vec::new(),
        }
    }

    pub(crate) async fn run(&self, timeout: Duration, files: &Attachments) -> Outcome {
        match self {
            CheckKind::Http(c) => c.run(timeout, files).await,
            CheckKind::Tcp(c) => c.run(timeout).await,
            CheckKind::Command(c) => c.run(timeout).await,
        }
    }
}
