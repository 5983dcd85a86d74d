//! Durable, seq-numbered outbox of check results (redb): written before sending, deleted on ack.
//!
//! Every result gets the next `seq` (starting at 1) and is committed with fsync before anyone can
//! send it. The collector acknowledges `(epoch, up_to_seq)` once results are stored; acknowledged
//! results are deleted. `epoch` is a random non-zero id created with the outbox, so that the
//! collector can tell a fresh outbox (seq restarting at 1) from the old one.
//! All methods block on disk I/O: call them from `spawn_blocking` in async code.

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use vigil_proto::CheckResult;

const RESULTS: TableDefinition<u64, &[u8]> = TableDefinition::new("results");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_EPOCH: &str = "epoch";
const META_NEXT_SEQ: &str = "next_seq";

/// File name of the outbox inside the state dir.
pub const FILE_NAME: &str = "outbox.redb";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot open outbox {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("outbox {path}: {message}")]
    Storage { path: PathBuf, message: String },
    #[error("outbox {path}: stored result {seq} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        seq: u64,
        #[source]
        source: prost::DecodeError,
    },
}

/// The outbox. Cheap to share behind an `Arc`; redb serialises writers.
pub struct Outbox {
    db: Database,
    path: PathBuf,
    epoch: u64,
    max_results: u64,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Outbox {
    /// Opens (or creates) the outbox file `path`, keeping at most `max_results` results.
    pub fn open(path: &Path, max_results: u64) -> Result<Self, OutboxError> {
        let db = Database::create(path).map_err(|e| OutboxError::Open {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let mut outbox = Outbox {
            db,
            path: path.to_path_buf(),
            epoch: 0,
            max_results: max_results.max(1),
        };
        outbox.epoch = outbox.init_epoch()?;
        Ok(outbox)
    }

    fn err(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, OutboxError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.err(e))?;
        Ok(txn)
    }

    fn init_epoch(&self) -> Result<u64, OutboxError> {
        let txn = self.begin_write()?;
        let epoch = {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            txn.open_table(RESULTS).map_err(|e| self.err(e))?;
            let existing = meta
                .get(META_EPOCH)
                .map_err(|e| self.err(e))?
                .map(|v| v.value());
            match existing {
                Some(epoch) if epoch != 0 => epoch,
                _ => {
                    let mut epoch = 0;
                    while epoch == 0 {
                        epoch = rand::random::<u64>();
                    }
                    meta.insert(META_EPOCH, epoch).map_err(|e| self.err(e))?;
                    meta.insert(META_NEXT_SEQ, 1).map_err(|e| self.err(e))?;
                    tracing::info!(epoch, path = %self.path.display(), "created a new outbox");
                    epoch
                }
            }
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(epoch)
    }

    /// The random non-zero identity of this outbox.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Stores `result` under the next seq, durably (fsync), and returns that seq. When the outbox is
    /// full the oldest results are dropped, with an error log.
    pub fn append(&self, mut result: CheckResult) -> Result<u64, OutboxError> {
        let txn = self.begin_write()?;
        let (seq, dropped) = {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let mut results = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
            let seq = meta
                .get(META_NEXT_SEQ)
                .map_err(|e| self.err(e))?
                .map(|v| v.value())
                .unwrap_or(1)
                .max(1);
            result.seq = seq;
            results
                .insert(seq, result.encode_to_vec().as_slice())
                .map_err(|e| self.err(e))?;
            meta.insert(META_NEXT_SEQ, seq + 1)
                .map_err(|e| self.err(e))?;
            let len = results.len().map_err(|e| self.err(e))?;
            let mut dropped = 0u64;
            if len > self.max_results {
                for _ in 0..len - self.max_results {
                    if results.pop_first().map_err(|e| self.err(e))?.is_none() {
                        break;
                    }
                    dropped += 1;
                }
            }
            (seq, dropped)
        };
        txn.commit().map_err(|e| self.err(e))?;
        if dropped > 0 {
            tracing::error!(
                dropped,
                max_results = self.max_results,
                "outbox full: dropped the oldest results that the collector never acknowledged"
            );
        }
        Ok(seq)
    }

    /// Up to `limit` stored results with seq > `after_seq`, in seq order.
    pub fn pending(&self, after_seq: u64, limit: usize) -> Result<Vec<CheckResult>, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let results = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        if after_seq == u64::MAX {
            return Ok(out);
        }
        for entry in results.range(after_seq + 1..).map_err(|e| self.err(e))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let seq = k.value();
            let mut r = CheckResult::decode(v.value()).map_err(|source| OutboxError::Corrupt {
                path: self.path.clone(),
                seq,
                source,
            })?;
            r.seq = seq;
            out.push(r);
        }
        Ok(out)
    }

    /// Deletes every result with seq <= `up_to_seq`. An ack for another epoch is ignored (with a
    /// warning). Returns how many results were deleted.
    pub fn ack(&self, epoch: u64, up_to_seq: u64) -> Result<u64, OutboxError> {
        if epoch != self.epoch {
            tracing::warn!(
                ack_epoch = epoch,
                outbox_epoch = self.epoch,
                up_to_seq,
                "ignoring an ack for another outbox epoch"
            );
            return Ok(0);
        }
        let txn = self.begin_write()?;
        let deleted = {
            let mut results = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
            let mut deleted = 0u64;
            results
                .retain_in(..=up_to_seq, |_, _| {
                    deleted += 1;
                    false
                })
                .map_err(|e| self.err(e))?;
            deleted
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(deleted)
    }

    /// Lowest seq still stored (unacknowledged), if any.
    pub fn first_unacked(&self) -> Result<Option<u64>, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let results = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
        let first = results.first().map_err(|e| self.err(e))?;
        Ok(first.map(|(k, _)| k.value()))
    }

    /// Number of results stored.
    pub fn len(&self) -> Result<u64, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let results = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
        results.len().map_err(|e| self.err(e))
    }

    /// Whether no result is stored.
    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self.len()? == 0)
    }

    /// The seq the next appended result will get.
    pub fn next_seq(&self) -> Result<u64, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(meta
            .get(META_NEXT_SEQ)
            .map_err(|e| self.err(e))?
            .map(|v| v.value())
            .unwrap_or(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(service: &str) -> CheckResult {
        CheckResult {
            service_id: service.into(),
            message: format!("{service} ok"),
            status: vigil_proto::Status::Ok as i32,
            ..Default::default()
        }
    }

    #[test]
    fn append_pending_ack() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join(FILE_NAME), 100).unwrap();
        assert_ne!(ob.epoch(), 0);
        assert_eq!(ob.first_unacked().unwrap(), None);
        for i in 1..=5 {
            assert_eq!(ob.append(result(&format!("s{i}"))).unwrap(), i);
        }
        let p = ob.pending(0, 3).unwrap();
        assert_eq!(p.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(p[0].service_id, "s1");
        let p = ob.pending(3, 10).unwrap();
        assert_eq!(p.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);

        // An ack for another epoch changes nothing.
        assert_eq!(ob.ack(ob.epoch().wrapping_add(1), 5).unwrap(), 0);
        assert_eq!(ob.len().unwrap(), 5);

        assert_eq!(ob.ack(ob.epoch(), 3).unwrap(), 3);
        assert_eq!(ob.first_unacked().unwrap(), Some(4));
        assert_eq!(ob.pending(0, 10).unwrap().len(), 2);
        assert_eq!(ob.ack(ob.epoch(), 5).unwrap(), 2);
        assert!(ob.is_empty().unwrap());
        assert_eq!(ob.first_unacked().unwrap(), None);
        // seq keeps counting after everything was acked.
        assert_eq!(ob.append(result("s6")).unwrap(), 6);
    }

    #[test]
    fn reopen_keeps_data_epoch_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let epoch = {
            let ob = Outbox::open(&path, 100).unwrap();
            for _ in 0..4 {
                ob.append(result("a")).unwrap();
            }
            ob.ack(ob.epoch(), 2).unwrap();
            ob.epoch()
        };
        let ob = Outbox::open(&path, 100).unwrap();
        assert_eq!(ob.epoch(), epoch);
        assert_eq!(ob.first_unacked().unwrap(), Some(3));
        assert_eq!(ob.append(result("b")).unwrap(), 5);
        drop(ob);

        // Everything acked: seq still continues after the highest acked one.
        let ob = Outbox::open(&path, 100).unwrap();
        ob.ack(epoch, 5).unwrap();
        drop(ob);
        let ob = Outbox::open(&path, 100).unwrap();
        assert!(ob.is_empty().unwrap());
        assert_eq!(ob.append(result("c")).unwrap(), 6);
    }

    #[test]
    fn a_new_outbox_gets_a_new_epoch() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ea = Outbox::open(&a.path().join(FILE_NAME), 10).unwrap().epoch();
        let eb = Outbox::open(&b.path().join(FILE_NAME), 10).unwrap().epoch();
        assert_ne!(ea, eb);
    }

    #[test]
    fn bound_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join(FILE_NAME), 3).unwrap();
        for _ in 0..5 {
            ob.append(result("x")).unwrap();
        }
        assert_eq!(ob.len().unwrap(), 3);
        assert_eq!(ob.first_unacked().unwrap(), Some(3));
        let seqs: Vec<u64> = ob.pending(0, 10).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        drop(ob);
        // A smaller bound on reopen trims at the next append.
        let ob = Outbox::open(&dir.path().join(FILE_NAME), 1).unwrap();
        ob.append(result("y")).unwrap();
        let seqs: Vec<u64> = ob.pending(0, 10).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [6]);
    }
}
