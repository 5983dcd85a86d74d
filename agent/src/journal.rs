//! Durable journal of the commands this agent received (redb, next to the outbox): a command id
//! is started at most once, and its outcome is kept until the collector acknowledges it.
//!
//! An entry is keyed by (issuer, command id) — the issuer is the identity of the collector's
//! database — and is written with fsync *before* the command starts ([`Journal::begin`]). Its
//! outcome is written when it ends ([`Journal::finish`]) and sent on every new stream until the
//! collector answers `CommandAck` ([`Journal::delivered`]). A command sent again is answered
//! from here: the recorded outcome, or "still running". An entry found running when the journal
//! is opened belongs to an agent that died while the command ran: its outcome becomes
//! "unknown" (the steps may or may not have completed) rather than being run again.
//! Delivered entries are forgotten after [`KEEP_DELIVERED_MS`].
//! All methods block on disk I/O: call them from `spawn_blocking` in async code.

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use vigil_proto::CommandResult;

/// File name of the journal inside the state dir.
pub const FILE_NAME: &str = "commands.redb";
/// How long an entry whose outcome the collector acknowledged is kept (to answer a late resend).
pub const KEEP_DELIVERED_MS: i64 = 7 * 24 * 3600 * 1000;

/// key -> entry as JSON.
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// key -> the outcome (a prost-encoded `CommandResult`).
const OUTCOMES: TableDefinition<&str, &[u8]> = TableDefinition::new("outcomes");

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open the command journal {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("command journal {path}: {message}")]
    Storage { path: PathBuf, message: String },
}

/// What the journal holds about one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub service_id: String,
    pub action: String,
    /// When it was started (ms since the Unix epoch, this agent's clock).
    pub started_at_ms: i64,
    /// When it ended (0: still running).
    pub finished_at_ms: i64,
    /// When the collector acknowledged the outcome (0: not yet).
    pub delivered_at_ms: i64,
}

/// What [`Journal::begin`] found.
#[derive(Debug, PartialEq)]
pub enum Begin {
    /// Recorded as started now: run it.
    Started,
    /// Started before and still running: do not start it again.
    Running(Entry),
    /// Started before and ended: this is its outcome.
    Done(Entry, Box<CommandResult>),
}

/// The journal key of a command.
pub fn key(issuer: &str, command_id: &str) -> String {
    format!("{issuer}/{command_id}")
}

pub struct Journal {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

/// The outcome recorded for a command that was running when its agent died.
pub fn unknown_outcome(issuer: &str, command_id: &str, started_at_ms: i64) -> CommandResult {
    CommandResult {
        command_id: command_id.to_string(),
        success: false,
        exit_code: -1,
        output: "outcome unknown: the agent stopped while this command ran (its steps may or may \
                 not have completed); not run again"
            .into(),
        duration_ms: 0,
        timed_out: false,
        check: None,
        running: false,
        started_at_ms,
        outcome_unknown: true,
        issuer: issuer.to_string(),
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path`. Entries left running by a previous run become
    /// outcome-unknown; delivered entries older than [`KEEP_DELIVERED_MS`] are forgotten.
    pub fn open(path: &Path, now_ms: i64) -> Result<Journal, JournalError> {
        let db = Database::create(path).map_err(|e| JournalError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let j = Journal {
            db,
            path: path.to_path_buf(),
        };
        j.recover(now_ms)?;
        j.prune(now_ms)?;
        Ok(j)
    }

    fn err(&self, e: impl std::fmt::Display) -> JournalError {
        JournalError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, JournalError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.err(e))?;
        Ok(txn)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Entry, JournalError> {
        serde_json::from_slice(bytes).map_err(|e| self.err(format!("corrupt entry: {e}")))
    }

    /// Forgets entries delivered more than [`KEEP_DELIVERED_MS`] before `now_ms`; returns how
    /// many.
    pub fn prune(&self, now_ms: i64) -> Result<usize, JournalError> {
        let txn = self.begin_write()?;
        let n = {
            let mut entries = txn.open_table(ENTRIES).map_err(|e| self.err(e))?;
            let mut outcomes = txn.open_table(OUTCOMES).map_err(|e| self.err(e))?;
            let mut old = Vec::new();
            for item in entries.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                if let Ok(entry) = self.decode(v.value())
                    && entry.delivered_at_ms > 0
                    && now_ms - entry.delivered_at_ms > KEEP_DELIVERED_MS
                {
                    old.push(k.value().to_string());
                }
            }
            for key in &old {
                entries.remove(key.as_str()).map_err(|e| self.err(e))?;
                outcomes.remove(key.as_str()).map_err(|e| self.err(e))?;
            }
            old.len()
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(n)
    }

    fn recover(&self, now_ms: i64) -> Result<(), JournalError> {
        let txn = self.begin_write()?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(|e| self.err(e))?;
            let mut outcomes = txn.open_table(OUTCOMES).map_err(|e| self.err(e))?;
            let mut interrupted = Vec::new();
            let mut forget = Vec::new();
            for item in entries.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let key = k.value().to_string();
                let Ok(entry) = self.decode(v.value()) else {
                    tracing::warn!(%key, "forgetting a corrupt command journal entry");
                    forget.push(key);
                    continue;
                };
                if entry.finished_at_ms == 0 {
                    interrupted.push((key, entry));
                }
            }
            for key in forget {
                entries.remove(key.as_str()).map_err(|e| self.err(e))?;
                outcomes.remove(key.as_str()).map_err(|e| self.err(e))?;
            }
            for (key, mut entry) in interrupted {
                let (issuer, id) = key.split_once('/').unwrap_or(("", key.as_str()));
                tracing::warn!(
                    command_id = id, service = %entry.service_id, action = %entry.action,
                    "the agent stopped while this command ran: its outcome is unknown; it is not run again"
                );
                let outcome = unknown_outcome(issuer, id, entry.started_at_ms);
                entry.finished_at_ms = now_ms;
                let json = serde_json::to_vec(&entry).map_err(|e| self.err(e))?;
                entries
                    .insert(key.as_str(), json.as_slice())
                    .map_err(|e| self.err(e))?;
                outcomes
                    .insert(key.as_str(), outcome.encode_to_vec().as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Records `key` as started at `now_ms`, durably, unless it was started before (then says
    /// how it stands). Exactly one of several callers with the same key gets `Started`.
    pub fn begin(
        &self,
        key: &str,
        service_id: &str,
        action: &str,
        now_ms: i64,
    ) -> Result<Begin, JournalError> {
        let txn = self.begin_write()?;
        let found = {
            let mut entries = txn.open_table(ENTRIES).map_err(|e| self.err(e))?;
            let existing = entries
                .get(key)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec());
            match existing {
                Some(bytes) => Some(self.decode(&bytes)?),
                None => {
                    let entry = Entry {
                        service_id: service_id.to_string(),
                        action: action.to_string(),
                        started_at_ms: now_ms,
                        finished_at_ms: 0,
                        delivered_at_ms: 0,
                    };
                    let json = serde_json::to_vec(&entry).map_err(|e| self.err(e))?;
                    entries
                        .insert(key, json.as_slice())
                        .map_err(|e| self.err(e))?;
                    None
                }
            }
        };
        match found {
            None => {
                txn.commit().map_err(|e| self.err(e))?;
                Ok(Begin::Started)
            }
            Some(entry) => {
                drop(txn);
                self.state_of(key, entry)
            }
        }
    }

    fn state_of(&self, key: &str, entry: Entry) -> Result<Begin, JournalError> {
        if entry.finished_at_ms == 0 {
            return Ok(Begin::Running(entry));
        }
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let outcomes = txn.open_table(OUTCOMES).map_err(|e| self.err(e))?;
        let bytes = outcomes
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec())
            .unwrap_or_default();
        let outcome =
            CommandResult::decode(bytes.as_slice()).map_err(|e| self.err(format!("{e}")))?;
        Ok(Begin::Done(entry, Box::new(outcome)))
    }

    /// How `key` stands, without starting anything.
    pub fn get(&self, key: &str) -> Result<Option<Begin>, JournalError> {
        let entry = {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let entries = match txn.open_table(ENTRIES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(self.err(e)),
            };
            let Some(v) = entries.get(key).map_err(|e| self.err(e))? else {
                return Ok(None);
            };
            self.decode(v.value())?
        };
        self.state_of(key, entry).map(Some)
    }

    /// Records the outcome of `key` (durably, before it is sent).
    pub fn finish(
        &self,
        key: &str,
        outcome: &CommandResult,
        now_ms: i64,
    ) -> Result<(), JournalError> {
        let txn = self.begin_write()?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(|e| self.err(e))?;
            let mut outcomes = txn.open_table(OUTCOMES).map_err(|e| self.err(e))?;
            let existing = entries
                .get(key)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec());
            let mut entry = match existing {
                Some(bytes) => self.decode(&bytes)?,
                None => Entry {
                    service_id: String::new(),
                    action: String::new(),
                    started_at_ms: now_ms,
                    finished_at_ms: 0,
                    delivered_at_ms: 0,
                },
            };
            entry.finished_at_ms = now_ms;
            let json = serde_json::to_vec(&entry).map_err(|e| self.err(e))?;
            entries
                .insert(key, json.as_slice())
                .map_err(|e| self.err(e))?;
            outcomes
                .insert(key, outcome.encode_to_vec().as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The collector has recorded the outcome of `key`: stop sending it. False if unknown.
    pub fn delivered(&self, key: &str, now_ms: i64) -> Result<bool, JournalError> {
        let txn = self.begin_write()?;
        let known = {
            let mut entries = txn.open_table(ENTRIES).map_err(|e| self.err(e))?;
            let existing = entries
                .get(key)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec());
            match existing {
                Some(bytes) => {
                    let mut entry = self.decode(&bytes)?;
                    if entry.delivered_at_ms == 0 && entry.finished_at_ms > 0 {
                        entry.delivered_at_ms = now_ms;
                        let json = serde_json::to_vec(&entry).map_err(|e| self.err(e))?;
                        entries
                            .insert(key, json.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    true
                }
                None => false,
            }
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(known)
    }

    /// Outcomes recorded and not yet acknowledged by the collector, oldest first.
    pub fn undelivered(&self) -> Result<Vec<CommandResult>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let (entries, outcomes) = match (txn.open_table(ENTRIES), txn.open_table(OUTCOMES)) {
            (Ok(e), Ok(o)) => (e, o),
            (Err(redb::TableError::TableDoesNotExist(_)), _)
            | (_, Err(redb::TableError::TableDoesNotExist(_))) => return Ok(Vec::new()),
            (Err(e), _) | (_, Err(e)) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for item in entries.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let Ok(entry) = self.decode(v.value()) else {
                continue;
            };
            if entry.finished_at_ms == 0 || entry.delivered_at_ms > 0 {
                continue;
            }
            if let Some(o) = outcomes.get(k.value()).map_err(|e| self.err(e))?
                && let Ok(r) = CommandResult::decode(o.value())
            {
                out.push((entry.finished_at_ms, r));
            }
        }
        out.sort_by_key(|(at, _)| *at);
        Ok(out.into_iter().map(|(_, r)| r).collect())
    }

    /// How many entries the journal holds.
    pub fn len(&self) -> Result<u64, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        match txn.open_table(ENTRIES) {
            Ok(t) => redb::ReadableTableMetadata::len(&t).map_err(|e| self.err(e)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Whether the journal holds no entry.
    pub fn is_empty(&self) -> Result<bool, JournalError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(id: &str, ok: bool) -> CommandResult {
        CommandResult {
            command_id: id.into(),
            success: ok,
            exit_code: if ok { 0 } else { 3 },
            output: format!("ran {id}"),
            issuer: "db".into(),
            started_at_ms: 1,
            ..Default::default()
        }
    }

    #[test]
    fn a_key_starts_once_and_answers_with_its_state_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join(FILE_NAME), 1_000).unwrap();
        let k = key("db", "7");
        assert_eq!(
            j.begin(&k, "svc", "restart", 1_000).unwrap(),
            Begin::Started
        );
        match j.begin(&k, "svc", "restart", 2_000).unwrap() {
            Begin::Running(e) => assert_eq!((e.started_at_ms, e.finished_at_ms), (1_000, 0)),
            other => panic!("{other:?}"),
        }
        j.finish(&k, &outcome("7", true), 3_000).unwrap();
        match j.begin(&k, "svc", "restart", 4_000).unwrap() {
            Begin::Done(e, r) => {
                assert_eq!(e.finished_at_ms, 3_000);
                assert!(r.success);
                assert_eq!(r.output, "ran 7");
            }
            other => panic!("{other:?}"),
        }
        // The same id from another database is another command.
        assert_eq!(
            j.begin(&key("other-db", "7"), "svc", "restart", 5_000)
                .unwrap(),
            Begin::Started
        );
    }

    #[test]
    fn outcomes_are_kept_until_acknowledged_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            let j = Journal::open(&path, 0).unwrap();
            for (id, at) in [("2", 20), ("1", 10)] {
                let k = key("db", id);
                j.begin(&k, "svc", "start", at).unwrap();
                j.finish(&k, &outcome(id, true), at + 1).unwrap();
            }
            let ids: Vec<String> = j
                .undelivered()
                .unwrap()
                .into_iter()
                .map(|r| r.command_id)
                .collect();
            assert_eq!(ids, ["1", "2"], "oldest first");
            assert!(j.delivered(&key("db", "1"), 50).unwrap());
            assert!(!j.delivered(&key("db", "nope"), 50).unwrap());
        }
        let j = Journal::open(&path, 100).unwrap();
        let ids: Vec<String> = j
            .undelivered()
            .unwrap()
            .into_iter()
            .map(|r| r.command_id)
            .collect();
        assert_eq!(ids, ["2"]);
        // A delivered entry still answers a resend until it is old enough to forget.
        assert!(matches!(
            j.begin(&key("db", "1"), "svc", "start", 200).unwrap(),
            Begin::Done(..)
        ));
        drop(j);
        let j = Journal::open(&path, 50 + KEEP_DELIVERED_MS + 1).unwrap();
        assert_eq!(j.len().unwrap(), 1);
        assert!(j.get(&key("db", "1")).unwrap().is_none());
        // The same while running: prune.
        assert!(j.delivered(&key("db", "2"), 1_000).unwrap());
        assert_eq!(j.prune(1_000 + KEEP_DELIVERED_MS).unwrap(), 0);
        assert_eq!(j.prune(1_001 + KEEP_DELIVERED_MS).unwrap(), 1);
        assert!(j.is_empty().unwrap());
    }

    #[test]
    fn a_command_running_when_the_agent_died_becomes_outcome_unknown_not_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            let j = Journal::open(&path, 0).unwrap();
            assert_eq!(
                j.begin(&key("db", "9"), "svc", "restart", 10).unwrap(),
                Begin::Started
            );
            // The agent dies here (the journal is dropped without finish).
        }
        let j = Journal::open(&path, 99).unwrap();
        match j.begin(&key("db", "9"), "svc", "restart", 100).unwrap() {
            Begin::Done(e, r) => {
                assert_eq!(e.finished_at_ms, 99);
                assert!(r.outcome_unknown && !r.success, "{r:?}");
                assert_eq!((r.command_id.as_str(), r.issuer.as_str()), ("9", "db"));
                assert_eq!(r.started_at_ms, 10);
            }
            other => panic!("{other:?}"),
        }
        let pending = j.undelivered().unwrap();
        assert_eq!(pending.len(), 1);
        assert!(pending[0].outcome_unknown);
    }

    #[test]
    fn hostile_keys_are_just_keys() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join(FILE_NAME), 0).unwrap();
        for id in ["", "/", "a/b/c", "\u{0}", &"x".repeat(10_000)] {
            let k = key("db", id);
            assert_eq!(j.begin(&k, "s", "stop", 1).unwrap(), Begin::Started);
            assert!(matches!(
                j.begin(&k, "s", "stop", 2).unwrap(),
                Begin::Running(_)
            ));
        }
        assert_eq!(j.len().unwrap(), 5);
    }
}
