//! Real Docker containers for tests: the local busybox image (built by deploy/images/busybox.sh,
//! no registry needed), run with a published port, killed, inspected, always removed. The
//! fixtures live in `vigil-testkit` (shared with the crates' own tests); re-exported here.

pub use vigil_testkit::docker::{Container, busybox_image};
