//! Durable, seq-numbered outbox of check results (redb): written before sending, deleted on ack.
//!
//! Every result gets the next `seq` (starting at 1) and is committed with fsync before anyone can
//! send it. The collector acknowledges `(epoch, up_to_seq)` once results are stored; acknowledged
//! results are deleted. `epoch` is a random id in `1..=i64::MAX` created with the outbox, so that
//! the collector can tell a fresh outbox (seq restarting at 1) from the old one; an outbox of an
//! older agent whose epoch is above `i64::MAX` gets a new epoch when opened, starting at its
//! lowest held seq (`epoch_start_seq`).
//!
//! When the outbox is full the oldest results are dropped on purpose, and the drop is recorded
//! (`dropped_total`, `dropped_through_seq`) in the same transaction, so that the agent can tell
//! the collector before it sends the results after the gap. Results are sanitised
//! ([`vigil_proto::sanitize::result`]) when stored and again when read, so a result read from the
//! outbox is bounded even if an older agent stored it unbounded.
//! All methods block on disk I/O: call them from `spawn_blocking` in async code.

use std::path::{Path, PathBuf};

use prost::Message;
use rand::Rng;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use vigil_proto::{AgentStatus, CheckResult, sanitize};

const RESULTS: TableDefinition<u64, &[u8]> = TableDefinition::new("results");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_EPOCH: &str = "epoch";
const META_NEXT_SEQ: &str = "next_seq";
const META_EPOCH_START_SEQ: &str = "epoch_start_seq";
const META_DROPPED_TOTAL: &str = "dropped_total";
const META_DROPPED_THROUGH_SEQ: &str = "dropped_through_seq";

/// File name of the outbox inside the state dir.
pub const FILE_NAME: &str = "outbox.redb";
/// redb's page cache (its default is 1 GiB, which a large backlog fills with pages read once).
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Largest epoch the collector accepts (it stores epochs as PostgreSQL `bigint`).
pub const MAX_EPOCH: u64 = i64::MAX as u64;

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

/// The outbox as it stood at one moment: every field is read in the same read transaction, so
/// every seq in `[first_unacked, next_seq)` is held (when `first_unacked` is not 0), and every
/// seq below `first_unacked` (below `next_seq` when nothing is held) was acknowledged or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Lowest seq held (0: none is held).
    pub first_unacked: u64,
    /// The seq the next result will get.
    pub next_seq: u64,
    /// Results held.
    pub depth: u64,
    /// `started_at_ms` of the oldest result held (None: none is held, or it cannot be read).
    pub oldest_started_at_ms: Option<i64>,
    /// Results dropped on purpose because the outbox was full, since it was created.
    pub dropped_total: u64,
    /// Highest seq among them (0: none).
    pub dropped_through_seq: u64,
    /// The first seq of this epoch.
    pub epoch_start_seq: u64,
}

impl Snapshot {
    /// Every seq up to this one is gone from the outbox (acknowledged or dropped): what a new
    /// session may treat as acknowledged.
    pub fn acked_through(&self) -> u64 {
        if self.first_unacked > 0 {
            self.first_unacked - 1
        } else {
            self.next_seq.saturating_sub(1)
        }
    }

    /// The wire status, the age of the oldest result measured against `now_ms` (the agent's
    /// clock, ms since the Unix epoch; 0 if that result claims to start in the future).
    pub fn status(&self, now_ms: i64) -> AgentStatus {
        let age = self
            .oldest_started_at_ms
            .map_or(0, |t| u64::try_from(now_ms.saturating_sub(t)).unwrap_or(0));
        AgentStatus {
            outbox_depth: self.depth,
            oldest_unacked_age_ms: age,
            dropped_total: self.dropped_total,
            dropped_through_seq: self.dropped_through_seq,
        }
    }
}

/// What [`Outbox::pending`] read: the results (sanitised) and the outbox as it stood when they
/// were read (same transaction).
#[derive(Debug, Clone)]
pub struct Pending {
    pub results: Vec<CheckResult>,
    /// Sum of [`sanitize::encoded_len`] of the results.
    pub bytes: usize,
    pub outbox: Snapshot,
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

/// A random epoch in `1..=MAX_EPOCH`.
fn new_epoch() -> u64 {
    rand::rng().random_range(1..=MAX_EPOCH)
}

fn meta_get(
    meta: &impl ReadableTable<&'static str, u64>,
    key: &str,
) -> Result<Option<u64>, redb::StorageError> {
    Ok(meta.get(key)?.map(|v| v.value()))
}

impl Outbox {
    /// Opens (or creates) the outbox file `path`, keeping at most `max_results` results.
    pub fn open(path: &Path, max_results: u64) -> Result<Self, OutboxError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| OutboxError::Open {
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

    /// Reads the epoch, creating one for a new outbox and replacing one out of range.
    fn init_epoch(&self) -> Result<u64, OutboxError> {
        let txn = self.begin_write()?;
        let epoch = {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let results = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
            let existing = meta_get(&meta, META_EPOCH).map_err(|e| self.err(e))?;
            match existing {
                Some(epoch) if (1..=MAX_EPOCH).contains(&epoch) => {
                    // Older agents did not store it: their epochs always started at 1.
                    if meta_get(&meta, META_EPOCH_START_SEQ)
                        .map_err(|e| self.err(e))?
                        .is_none()
                    {
                        meta.insert(META_EPOCH_START_SEQ, 1)
                            .map_err(|e| self.err(e))?;
                    }
                    epoch
                }
                Some(old) if old != 0 => {
                    // An older agent drew the epoch from the whole u64 range; the collector takes
                    // only 1..=i64::MAX. The held results continue under a new epoch that starts
                    // at the lowest of them.
                    let next_seq = meta_get(&meta, META_NEXT_SEQ)
                        .map_err(|e| self.err(e))?
                        .unwrap_or(1)
                        .max(1);
                    let first = results
                        .first()
                        .map_err(|e| self.err(e))?
                        .map(|(k, _)| k.value());
                    let start = first.unwrap_or(next_seq);
                    let epoch = new_epoch();
                    meta.insert(META_EPOCH, epoch).map_err(|e| self.err(e))?;
                    meta.insert(META_EPOCH_START_SEQ, start)
                        .map_err(|e| self.err(e))?;
                    tracing::info!(
                        old_epoch = old,
                        epoch,
                        epoch_start_seq = start,
                        path = %self.path.display(),
                        "outbox epoch was above i64::MAX (made by an older agent); the held results continue under a new epoch"
                    );
                    epoch
                }
                _ => {
                    let epoch = new_epoch();
                    meta.insert(META_EPOCH, epoch).map_err(|e| self.err(e))?;
                    meta.insert(META_NEXT_SEQ, 1).map_err(|e| self.err(e))?;
                    meta.insert(META_EPOCH_START_SEQ, 1)
                        .map_err(|e| self.err(e))?;
                    tracing::info!(epoch, path = %self.path.display(), "created a new outbox");
                    epoch
                }
            }
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(epoch)
    }

    /// The random identity of this outbox, in `1..=i64::MAX`.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sanitises `result`, stores it under the next seq, durably (fsync), and returns that seq.
    /// When the outbox is full the oldest results are dropped (with an error log) and the drop is
    /// added to `dropped_total` / `dropped_through_seq` in the same transaction.
    pub fn append(&self, result: CheckResult) -> Result<u64, OutboxError> {
        Ok(*self.append_all(vec![result])?.start())
    }

    /// [`Outbox::append`] for many results in one transaction (one fsync): they get consecutive
    /// seqs, returned as a range (empty when `results` is). For loading a backlog in bulk (the
    /// benchmark); the agent appends one result at a time.
    pub fn append_all(
        &self,
        mut results: Vec<CheckResult>,
    ) -> Result<std::ops::RangeInclusive<u64>, OutboxError> {
        for r in &mut results {
            sanitize::result(r);
        }
        let txn = self.begin_write()?;
        let (seqs, dropped, dropped_total, dropped_through) = {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let mut table = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
            let first = meta_get(&meta, META_NEXT_SEQ)
                .map_err(|e| self.err(e))?
                .unwrap_or(1)
                .max(1);
            let mut seq = first;
            for mut result in results {
                result.seq = seq;
                table
                    .insert(seq, result.encode_to_vec().as_slice())
                    .map_err(|e| self.err(e))?;
                seq += 1;
            }
            meta.insert(META_NEXT_SEQ, seq).map_err(|e| self.err(e))?;
            let len = table.len().map_err(|e| self.err(e))?;
            let mut dropped = 0u64;
            let mut highest = 0u64;
            if len > self.max_results {
                for _ in 0..len - self.max_results {
                    match table.pop_first().map_err(|e| self.err(e))? {
                        Some((k, _)) => highest = highest.max(k.value()),
                        None => break,
                    }
                    dropped += 1;
                }
            }
            let mut total = meta_get(&meta, META_DROPPED_TOTAL)
                .map_err(|e| self.err(e))?
                .unwrap_or(0);
            let mut through = meta_get(&meta, META_DROPPED_THROUGH_SEQ)
                .map_err(|e| self.err(e))?
                .unwrap_or(0);
            if dropped > 0 {
                total = total.saturating_add(dropped);
                through = through.max(highest);
                meta.insert(META_DROPPED_TOTAL, total)
                    .map_err(|e| self.err(e))?;
                meta.insert(META_DROPPED_THROUGH_SEQ, through)
                    .map_err(|e| self.err(e))?;
            }
            (first..=seq - 1, dropped, total, through)
        };
        txn.commit().map_err(|e| self.err(e))?;
        if dropped > 0 {
            tracing::error!(
                dropped,
                dropped_total,
                dropped_through_seq = dropped_through,
                max_results = self.max_results,
                "outbox full: dropped the oldest results that the collector never acknowledged"
            );
        }
        Ok(seqs)
    }

    /// Reads the snapshot fields inside `txn`.
    fn snapshot_in(&self, txn: &redb::ReadTransaction) -> Result<Snapshot, OutboxError> {
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let results = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
        let get = |key| meta_get(&meta, key).map_err(|e| self.err(e));
        let next_seq = get(META_NEXT_SEQ)?.unwrap_or(1).max(1);
        let (first_unacked, oldest_started_at_ms) = match results
            .first()
            .map_err(|e| self.err(e))?
        {
            None => (0, None),
            Some((k, v)) => {
                let seq = k.value();
                let started = match CheckResult::decode(v.value()) {
                    Ok(r) => Some(r.started_at_ms),
                    Err(e) => {
                        tracing::warn!(seq, error = %e, "oldest outbox result is unreadable; its age is reported as 0");
                        None
                    }
                };
                (seq, started)
            }
        };
        Ok(Snapshot {
            first_unacked,
            next_seq,
            depth: results.len().map_err(|e| self.err(e))?,
            oldest_started_at_ms,
            dropped_total: get(META_DROPPED_TOTAL)?.unwrap_or(0),
            dropped_through_seq: get(META_DROPPED_THROUGH_SEQ)?.unwrap_or(0),
            epoch_start_seq: get(META_EPOCH_START_SEQ)?.unwrap_or(1),
        })
    }

    /// The outbox as it stands, read in one transaction (see [`Snapshot`]).
    pub fn snapshot(&self) -> Result<Snapshot, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        self.snapshot_in(&txn)
    }

    /// Stored results with seq > `after_seq`, in seq order, sanitised: at most `limit` of them and,
    /// past the first, at most `max_bytes` in all ([`sanitize::encoded_len`]). At least one is
    /// returned when any is stored (a sanitised result is at most
    /// [`sanitize::MAX_RESULT_BYTES`]). The snapshot is read in the same transaction.
    pub fn pending(
        &self,
        after_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Pending, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let outbox = self.snapshot_in(&txn)?;
        let mut out = Pending {
            results: Vec::new(),
            bytes: 0,
            outbox,
        };
        if after_seq == u64::MAX {
            return Ok(out);
        }
        let results = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
        for entry in results.range(after_seq + 1..).map_err(|e| self.err(e))? {
            if out.results.len() >= limit.max(1) {
                break;
            }
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let seq = k.value();
            // A stored result that cannot be decoded must not stop the ones behind it: it is
            // sent as a stand-in without a service, which the collector refuses with a reason
            // (a node event) and acknowledges.
            let mut r = CheckResult::decode(v.value()).unwrap_or_else(|source| {
                let e = OutboxError::Corrupt {
                    path: self.path.clone(),
                    seq,
                    source,
                };
                tracing::error!(seq, error = %e, "sending a stand-in for a corrupt stored result");
                CheckResult {
                    message: format!("stored result {seq} is corrupt in the agent's outbox"),
                    status: vigil_proto::Status::Unknown as i32,
                    ..Default::default()
                }
            });
            r.seq = seq;
            // An older agent stored results as the check made them.
            if sanitize::result(&mut r) {
                tracing::debug!(seq, "sanitised a stored result before sending it");
            }
            let len = sanitize::encoded_len(&r);
            if !out.results.is_empty() && out.bytes.saturating_add(len) > max_bytes {
                break;
            }
            out.bytes += len;
            out.results.push(r);
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

    #[test]
    fn a_corrupt_stored_result_does_not_stop_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let ob = Outbox::open(&path, 100).unwrap();
        for i in 1..=3 {
            ob.append(CheckResult {
                service_id: format!("s{i}"),
                ..Default::default()
            })
            .unwrap();
        }
        // Seq 2's bytes are not a CheckResult (a truncated length-delimited field).
        let txn = ob.begin_write().unwrap();
        txn.open_table(RESULTS)
            .unwrap()
            .insert(2u64, [0x12u8, 0xff].as_slice())
            .unwrap();
        txn.commit().unwrap();
        let p = ob.pending(0, 10, 1 << 20).unwrap();
        let got: Vec<(u64, String)> = p
            .results
            .iter()
            .map(|r| (r.seq, r.service_id.clone()))
            .collect();
        assert_eq!(
            got,
            [(1, "s1".into()), (2, String::new()), (3, "s3".into())]
        );
        assert!(p.results[1].message.contains("corrupt"));
    }

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use vigil_proto::Metric;
    use vigil_proto::sanitize::MAX_RESULT_BYTES;

    use crate::client::MAX_BATCH_BYTES;

    fn seqs(ob: &Outbox, after: u64) -> Vec<u64> {
        ob.pending(after, usize::MAX, usize::MAX)
            .unwrap()
            .results
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    /// What a check printing ~1,200 perfdata metrics and a lot of output makes, before
    /// sanitising (several MB encoded).
    fn huge(service: &str, output_bytes: usize) -> CheckResult {
        CheckResult {
            service_id: service.into(),
            message: "m".repeat(5000),
            output: "o".repeat(output_bytes),
            metrics: (0..1200)
                .map(|i| Metric {
                    label: format!("metric_{i}_{}", "l".repeat(200)),
                    value: f64::from(i),
                    unit: "B".into(),
                    warn: "w".repeat(100),
                    crit: "c".repeat(100),
                    min: Some(0.0),
                    max: Some(1e9),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Writes an outbox as an older agent left it: its epoch (any u64), its next seq, and
    /// results stored as they were made (not sanitised); no drop counters, no epoch start.
    fn write_old_outbox(path: &Path, epoch: u64, next_seq: u64, held: &[(u64, CheckResult)]) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(META_EPOCH, epoch).unwrap();
            meta.insert(META_NEXT_SEQ, next_seq).unwrap();
            let mut results = txn.open_table(RESULTS).unwrap();
            for (seq, r) in held {
                results.insert(*seq, r.encode_to_vec().as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

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
        let p = ob.pending(0, 3, usize::MAX).unwrap().results;
        assert_eq!(p.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(p[0].service_id, "s1");
        let p = ob.pending(3, 10, usize::MAX).unwrap().results;
        assert_eq!(p.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);

        // An ack for another epoch changes nothing.
        assert_eq!(ob.ack(ob.epoch().wrapping_add(1), 5).unwrap(), 0);
        assert_eq!(ob.len().unwrap(), 5);

        assert_eq!(ob.ack(ob.epoch(), 3).unwrap(), 3);
        assert_eq!(ob.first_unacked().unwrap(), Some(4));
        assert_eq!(ob.pending(0, 10, usize::MAX).unwrap().results.len(), 2);
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
    fn a_new_outbox_gets_a_new_epoch_in_range_starting_at_seq_1() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let oa = Outbox::open(&a.path().join(FILE_NAME), 10).unwrap();
        let ob = Outbox::open(&b.path().join(FILE_NAME), 10).unwrap();
        assert_ne!(oa.epoch(), ob.epoch());
        for o in [&oa, &ob] {
            assert!((1..=MAX_EPOCH).contains(&o.epoch()), "{}", o.epoch());
            let s = o.snapshot().unwrap();
            assert_eq!(
                s,
                Snapshot {
                    first_unacked: 0,
                    next_seq: 1,
                    depth: 0,
                    oldest_started_at_ms: None,
                    dropped_total: 0,
                    dropped_through_seq: 0,
                    epoch_start_seq: 1,
                }
            );
            assert_eq!(s.acked_through(), 0);
        }
        // Many draws: never 0, never above i64::MAX.
        for _ in 0..10_000 {
            assert!((1..=MAX_EPOCH).contains(&new_epoch()));
        }
    }

    #[test]
    fn an_epoch_above_i64_max_is_replaced_once_starting_at_the_lowest_held_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let old = u64::MAX - 5;
        let held: Vec<(u64, CheckResult)> =
            (7..=9).map(|s| (s, result(&format!("r{s}")))).collect();
        write_old_outbox(&path, old, 10, &held);
        let ob = Outbox::open(&path, 100).unwrap();
        let epoch = ob.epoch();
        assert!((1..=MAX_EPOCH).contains(&epoch), "{epoch}");
        assert_ne!(epoch, old);
        let s = ob.snapshot().unwrap();
        assert_eq!(
            (s.epoch_start_seq, s.first_unacked, s.next_seq, s.depth),
            (7, 7, 10, 3)
        );
        // The held results are kept and continue under the new epoch.
        assert_eq!(seqs(&ob, 0), [7, 8, 9]);
        assert_eq!(
            ob.pending(0, 1, usize::MAX).unwrap().results[0].service_id,
            "r7"
        );
        assert_eq!(ob.append(result("new")).unwrap(), 10);
        // An ack for the old epoch is ignored; the new one works.
        assert_eq!(ob.ack(old, 9).unwrap(), 0);
        assert_eq!(ob.ack(epoch, 8).unwrap(), 2);
        drop(ob);
        // Rotated once: the next open keeps the new epoch and its start.
        let ob = Outbox::open(&path, 100).unwrap();
        assert_eq!(ob.epoch(), epoch);
        assert_eq!(ob.snapshot().unwrap().epoch_start_seq, 7);
    }

    #[test]
    fn an_empty_outbox_with_an_epoch_above_i64_max_starts_the_new_epoch_at_next_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        write_old_outbox(&path, i64::MAX as u64 + 1, 42, &[]);
        let ob = Outbox::open(&path, 100).unwrap();
        assert!((1..=MAX_EPOCH).contains(&ob.epoch()));
        let s = ob.snapshot().unwrap();
        assert_eq!(
            (s.epoch_start_seq, s.first_unacked, s.next_seq),
            (42, 0, 42)
        );
        assert_eq!(s.acked_through(), 41);
        assert_eq!(ob.append(result("x")).unwrap(), 42);
    }

    #[test]
    fn an_older_outbox_in_range_keeps_its_epoch_which_started_at_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        write_old_outbox(&path, 12345, 5, &[(4, result("a"))]);
        let ob = Outbox::open(&path, 100).unwrap();
        assert_eq!(ob.epoch(), 12345);
        let s = ob.snapshot().unwrap();
        assert_eq!((s.epoch_start_seq, s.first_unacked, s.next_seq), (1, 4, 5));
        assert_eq!(i64::MAX as u64, MAX_EPOCH);
    }

    #[test]
    fn drops_are_counted_durably_with_the_highest_dropped_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let ob = Outbox::open(&path, 3).unwrap();
        for _ in 0..5 {
            ob.append(result("x")).unwrap();
        }
        let s = ob.snapshot().unwrap();
        assert_eq!((s.dropped_total, s.dropped_through_seq), (2, 2));
        assert_eq!((s.first_unacked, s.next_seq, s.depth), (3, 6, 3));
        // Acks are not drops.
        ob.ack(ob.epoch(), 4).unwrap();
        let s = ob.snapshot().unwrap();
        assert_eq!((s.dropped_total, s.dropped_through_seq), (2, 2));
        drop(ob);
        // They survive a restart; a smaller bound drops (and counts) more at the next append.
        let ob = Outbox::open(&path, 1).unwrap();
        assert_eq!(ob.snapshot().unwrap().dropped_total, 2);
        ob.append(result("y")).unwrap();
        let s = ob.snapshot().unwrap();
        assert_eq!((s.dropped_total, s.dropped_through_seq), (3, 5));
        assert_eq!(seqs(&ob, 0), [6]);
        // pending reads the counters with the results.
        let p = ob.pending(0, 10, usize::MAX).unwrap();
        assert_eq!(p.outbox, s);
    }

    #[test]
    fn append_all_is_append_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join(FILE_NAME), 5).unwrap();
        assert_eq!(ob.append(result("a")).unwrap(), 1);
        let seqs = ob
            .append_all((0..6).map(|i| huge(&format!("b{i}"), 10)).collect())
            .unwrap();
        assert_eq!(seqs, 2..=7);
        // Bound 5: seqs 1 and 2 dropped and counted, the rest sanitised.
        let s = ob.snapshot().unwrap();
        assert_eq!((s.first_unacked, s.next_seq, s.depth), (3, 8, 5));
        assert_eq!((s.dropped_total, s.dropped_through_seq), (2, 2));
        let txn = ob.db.begin_read().unwrap();
        let table = txn.open_table(RESULTS).unwrap();
        for e in table.iter().unwrap() {
            let (_, v) = e.unwrap();
            let r = CheckResult::decode(v.value()).unwrap();
            assert_eq!(r.metrics.len(), sanitize::MAX_METRICS);
        }
        let empty = ob.append_all(Vec::new()).unwrap();
        assert!(empty.is_empty());
        assert_eq!(ob.append(result("c")).unwrap(), 8);
    }

    #[test]
    fn status_ages_the_oldest_result_by_the_agent_clock() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join(FILE_NAME), 10).unwrap();
        assert_eq!(
            ob.snapshot()
                .unwrap()
                .status(1_000_000)
                .oldest_unacked_age_ms,
            0
        );
        let mut r = result("a");
        r.started_at_ms = 1_000_000;
        ob.append(r).unwrap();
        let mut r = result("b");
        r.started_at_ms = 5_000_000;
        ob.append(r).unwrap();
        let s = ob.snapshot().unwrap();
        assert_eq!(s.oldest_started_at_ms, Some(1_000_000));
        let st = s.status(1_060_000);
        assert_eq!((st.outbox_depth, st.oldest_unacked_age_ms), (2, 60_000));
        // A clock that went backwards gives 0, not a wrapped age.
        assert_eq!(s.status(999_000).oldest_unacked_age_ms, 0);
    }

    /// The hello race: snapshots taken while results are appended (and dropped, and acked) in
    /// other threads always show every seq in [first_unacked, next_seq) held.
    #[test]
    fn snapshots_are_consistent_while_appending_and_acking() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Arc::new(Outbox::open(&dir.path().join(FILE_NAME), 40).unwrap());
        let done = Arc::new(AtomicBool::new(false));
        let appender = {
            let (ob, done) = (ob.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..300 {
                    ob.append(result(&format!("s{i}"))).unwrap();
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let acker = {
            let (ob, done) = (ob.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let s = ob.snapshot().unwrap();
                    if s.first_unacked > 0 {
                        ob.ack(ob.epoch(), (s.first_unacked + 2).min(s.next_seq - 1))
                            .unwrap();
                    }
                    std::thread::yield_now();
                }
            })
        };
        let mut checked = 0u64;
        let mut last = ob.snapshot().unwrap();
        loop {
            let finished = done.load(Ordering::SeqCst);
            let s = ob.snapshot().unwrap();
            if s.first_unacked > 0 {
                assert_eq!(s.depth, s.next_seq - s.first_unacked, "a gap in {s:?}");
                assert!(s.dropped_through_seq < s.first_unacked, "{s:?}");
                assert!(s.oldest_started_at_ms.is_some());
            } else {
                assert_eq!(s.depth, 0, "{s:?}");
            }
            assert!(s.acked_through() < s.next_seq);
            assert!(s.next_seq >= last.next_seq && s.acked_through() >= last.acked_through());
            assert!(s.dropped_total >= last.dropped_total);
            last = s;
            checked += 1;
            if finished {
                break;
            }
        }
        appender.join().unwrap();
        acker.join().unwrap();
        assert_eq!(last.next_seq, 301);
        assert!(checked > 10, "only {checked} snapshots");
    }

    #[test]
    fn pending_bounds_a_batch_by_bytes_and_returns_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join(FILE_NAME), 1000).unwrap();
        for i in 0..40 {
            ob.append(huge(&format!("big{i}"), 200_000)).unwrap();
        }
        let mut after = 0;
        let mut batches = 0;
        let mut all = Vec::new();
        loop {
            let p = ob.pending(after, 500, MAX_BATCH_BYTES).unwrap();
            let Some(last) = p.results.last() else { break };
            after = last.seq;
            batches += 1;
            let sum: usize = p.results.iter().map(sanitize::encoded_len).sum();
            assert_eq!(sum, p.bytes);
            assert!(p.bytes <= MAX_BATCH_BYTES, "{} bytes", p.bytes);
            // Full: the next result would not have fitted (unless this was the last).
            if let Some(n) = ob.pending(after, 1, usize::MAX).unwrap().results.first() {
                assert!(p.bytes + sanitize::encoded_len(n) > MAX_BATCH_BYTES);
            }
            for r in &p.results {
                assert!(sanitize::encoded_len(r) <= MAX_RESULT_BYTES);
                assert_eq!(r.metrics.len(), sanitize::MAX_METRICS);
            }
            all.extend(p.results.iter().map(|r| r.seq));
        }
        assert_eq!(all, (1..=40).collect::<Vec<_>>());
        assert!(batches > 1);
        // A budget smaller than one result still yields exactly one.
        for budget in [0, 1, 1000] {
            let p = ob.pending(0, 500, budget).unwrap();
            assert_eq!(p.results.len(), 1, "budget {budget}");
            assert_eq!(p.results[0].seq, 1);
        }
        // And a count limit of 0 is taken as 1.
        assert_eq!(ob.pending(0, 0, usize::MAX).unwrap().results.len(), 1);
        assert!(ob.pending(40, 500, usize::MAX).unwrap().results.is_empty());
    }

    #[test]
    fn the_outbox_never_holds_an_unbounded_result() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join(FILE_NAME), 10).unwrap();
        let mut r = huge("x\0y", 1_000_000);
        r.message.push('\0');
        assert!(r.encoded_len() > 1_000_000);
        ob.append(r).unwrap();
        // Read the stored bytes themselves, not through pending (which sanitises again).
        let txn = ob.db.begin_read().unwrap();
        let table = txn.open_table(RESULTS).unwrap();
        let stored = table.get(1).unwrap().unwrap();
        assert!(
            stored.value().len() <= MAX_RESULT_BYTES,
            "{}",
            stored.value().len()
        );
        let back = CheckResult::decode(stored.value()).unwrap();
        assert_eq!(back.metrics.len(), sanitize::MAX_METRICS);
        assert_eq!(back.service_id, "x\u{FFFD}y");
        assert!(!back.message.contains('\0'));
    }

    #[test]
    fn unbounded_results_of_an_older_agent_are_sanitised_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        // 10 MB of output: more than a whole gRPC message may hold.
        let mut nul = huge("nul\0", 10_000_000);
        nul.output.push('\0');
        let held = vec![(1, nul), (2, huge("b", 3_000_000)), (3, result("small"))];
        assert!(held[0].1.encoded_len() > vigil_proto::MAX_MESSAGE_BYTES);
        write_old_outbox(&path, 99, 4, &held);
        let ob = Outbox::open(&path, 100).unwrap();
        let p = ob.pending(0, 500, MAX_BATCH_BYTES).unwrap();
        assert_eq!(
            p.results.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(p.bytes <= MAX_BATCH_BYTES);
        for r in &p.results {
            assert!(sanitize::encoded_len(r) <= MAX_RESULT_BYTES);
            assert!(!r.output.contains('\0') && !r.service_id.contains('\0'));
        }
        assert_eq!(p.results[0].metrics.len(), sanitize::MAX_METRICS);
        assert_eq!(p.results[2].message, "small ok");
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
        assert_eq!(seqs(&ob, 0), [3, 4, 5]);
        drop(ob);
        // A smaller bound on reopen trims at the next append.
        let ob = Outbox::open(&dir.path().join(FILE_NAME), 1).unwrap();
        ob.append(result("y")).unwrap();
        assert_eq!(seqs(&ob, 0), [6]);
    }
}
