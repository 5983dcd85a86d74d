//! The shipped platform-preset examples (`config/services/preset-*.yaml`) parse, validate, and
//! belong to `gpu-01` rather than the demo node.

use std::path::Path;

use vigil_checks::CheckSpec;

#[test]
fn preset_examples_are_valid_checks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/services");
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("preset-") && name.ends_with(".yaml")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: serde_json::Value =
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(doc["node"], "gpu-01", "{name}");
        let spec: CheckSpec =
            serde_json::from_value(doc["check"].clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        spec.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        kinds.push(spec.kind.name());
    }
    kinds.sort_unstable();
    assert_eq!(kinds, ["docker_engine", "incus", "lxd", "proxmox"]);
}
