//! Test fixtures of the Vigil workspace, each written once and used as a dev-dependency by the
//! crates' tests: the test PKI ([`pki`]), tonic servers on 127.0.0.1 with (mutual) TLS — the
//! transport of the agents' fake collector ([`grpc`]), a minimal HTTPS server ([`https`]) and
//! real Docker containers of the local busybox image ([`docker`]). It depends on no Vigil crate,
//! so any crate of the workspace can use it without a dependency cycle.

#![forbid(unsafe_code)]

pub mod docker;
pub mod grpc;
pub mod https;
pub mod pki;
