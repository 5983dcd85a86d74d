//! On-disk cache of the last `ConfigUpdate` (state_dir/config.pb), so checks run without a collector.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use vigil_proto::ConfigUpdate;

/// File name of the cached config inside the state dir.
pub const FILE_NAME: &str = "config.pb";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read cached config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cached config {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("cannot write cached config {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cached config file.
#[derive(Debug, Clone)]
pub struct ConfigCache {
    path: PathBuf,
}

impl ConfigCache {
    /// The cache in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        ConfigCache {
            path: state_dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached config, or `None` if there is none yet.
    pub fn load(&self) -> Result<Option<ConfigUpdate>, CacheError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        ConfigUpdate::decode(bytes.as_slice())
            .map(Some)
            .map_err(|source| CacheError::Corrupt {
                path: self.path.clone(),
                source,
            })
    }

    /// Replaces the cached config atomically: temp file, fsync, rename, fsync of the directory.
    pub fn store(&self, update: &ConfigUpdate) -> Result<(), CacheError> {
        let werr = |source| CacheError::Write {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("pb.tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(werr)?;
            f.write_all(&update.encode_to_vec()).map_err(werr)?;
            f.sync_all().map_err(werr)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(werr)?;
        if let Some(dir) = self.path.parent() {
            // Makes the rename itself durable; not every platform allows opening a directory.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::CheckAssignment;

    #[test]
    fn store_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ConfigCache::new(dir.path());
        assert_eq!(cache.load().unwrap(), None);
        let mut update = ConfigUpdate {
            version: 7,
            checks: vec![CheckAssignment {
                service_id: "web".into(),
                spec_json: r#"{"type":"command","argv":["/bin/true"]}"#.into(),
            }],
            ..Default::default()
        };
        update.files.insert("data/a.pdf".into(), vec![1, 2, 3]);
        cache.store(&update).unwrap();
        assert_eq!(cache.load().unwrap(), Some(update.clone()));

        update.version = 8;
        update.checks.clear();
        cache.store(&update).unwrap();
        let again = ConfigCache::new(dir.path()).load().unwrap().unwrap();
        assert_eq!(again.version, 8);
        assert!(again.checks.is_empty());
        assert!(!dir.path().join("config.pb.tmp").exists());
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ConfigCache::new(dir.path());
        std::fs::write(cache.path(), b"\xff\xff\xff\xff").unwrap();
        let msg = cache.load().unwrap_err().to_string();
        assert!(msg.contains("config.pb"), "{msg}");
    }
}
