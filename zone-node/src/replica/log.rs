//! The Raft log as raft-rs reads it ([`raft::Storage`]), kept in memory and
//! written through to a [`Disk`] (redb in a node, [`MemDisk`] in tests and the
//! simulation) in one durable batch per Ready.
//!
//! ```text
//!   index:  ..trunc | trunc+1 .. last
//!           compact |  entries (in memory, and on disk)
//!           (snapshot covers up to its index; term(trunc) is kept)
//! ```
//!
//! Memory stays bounded because the replica compacts the log behind a
//! snapshot of the applied state every `compact_after` entries.

use std::sync::{Arc, Mutex};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

/// What a [`Disk`] holds: enough to rebuild the log after a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Persisted {
    /// The last persisted hard state (term, vote, commit).
    pub hard: HardState,
    /// The last persisted configuration.
    pub conf: ConfState,
    /// The latest snapshot (metadata and data; empty when index 0).
    pub snapshot: Snapshot,
    /// The log entries after the compaction point, in index order.
    pub entries: Vec<Entry>,
    /// The compaction point: (index, term) of the last entry dropped.
    pub trunc: (u64, u64),
}

/// One durable write: everything a Ready (or a compaction) changes.
#[derive(Debug, Default)]
pub struct Batch {
    /// A snapshot installed: replaces the whole log (raft-rs installs one
    /// only when the log does not hold the snapshot's last entry).
    pub install: Option<Snapshot>,
    /// A snapshot of this replica's applied state, kept for lagging
    /// followers and restarts (with `compact`); the log is unchanged.
    pub keep: Option<Snapshot>,
    /// Entries to append; any stored entry at or after the first one's index
    /// is dropped first (a new leader overwrote an uncommitted suffix).
    pub entries: Vec<Entry>,
    /// A new hard state.
    pub hard: Option<HardState>,
    /// A new configuration.
    pub conf: Option<ConfState>,
    /// Compaction: drop entries up to and including this (index, term).
    pub compact: Option<(u64, u64)>,
}

impl Batch {
    /// True when the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.install.is_none()
            && self.keep.is_none()
            && self.entries.is_empty()
            && self.hard.is_none()
            && self.conf.is_none()
            && self.compact.is_none()
    }
}

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The storage engine failed (I/O, corruption).
    #[error("storage: {0}")]
    Engine(String),
    /// A stored record did not decode.
    #[error("stored record {what} does not decode: {detail}")]
    Decode {
        /// Which record.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
}

/// Durable storage of the Raft log. [`Disk::write`] returns only once the
/// batch is durable (one sync per call).
pub trait Disk: Send {
    /// Everything persisted so far.
    fn load(&mut self) -> Result<Persisted, DiskError>;
    /// Persists `batch` atomically and durably.
    fn write(&mut self, batch: &Batch) -> Result<(), DiskError>;
}

/// A [`Disk`] in memory whose contents outlive the replica using it (clone
/// the handle): a simulated crash drops the replica and keeps the disk.
#[derive(Debug, Clone, Default)]
pub struct MemDisk(Arc<Mutex<Persisted>>);

impl MemDisk {
    /// An empty disk.
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    /// A copy of what the disk holds.
    pub fn contents(&self) -> Persisted {
        self.0.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Disk for MemDisk {
    fn load(&mut self) -> Result<Persisted, DiskError> {
        Ok(self.contents())
    }

    fn write(&mut self, batch: &Batch) -> Result<(), DiskError> {
        let mut p = self
            .0
            .lock()
            .map_err(|_| DiskError::Engine("memory disk poisoned".into()))?;
        apply_batch(&mut p, batch);
        Ok(())
    }
}

/// Applies `batch` to `p`: the semantics every [`Disk`] implements.
pub fn apply_batch(p: &mut Persisted, batch: &Batch) {
    if let Some(s) = &batch.install {
        let (i, t) = (s.get_metadata().index, s.get_metadata().term);
        p.entries.clear();
        p.trunc = (i, t);
        p.conf = s.get_metadata().get_conf_state().clone();
        p.snapshot = s.clone();
    }
    if let Some(first) = batch.entries.first() {
        p.entries.retain(|e| e.index < first.index);
        p.entries.extend(batch.entries.iter().cloned());
    }
    if let Some(s) = &batch.keep {
        p.snapshot = s.clone();
    }
    if let Some(h) = &batch.hard {
        p.hard = h.clone();
    }
    if let Some(c) = &batch.conf {
        p.conf = c.clone();
    }
    if let Some((i, t)) = batch.compact
        && i > p.trunc.0
    {
        p.entries.retain(|e| e.index > i);
        p.trunc = (i, t);
    }
}

/// The log raft-rs reads: the persisted state in memory.
#[derive(Debug, Default)]
pub struct RaftLog {
    p: Persisted,
    /// The membership as applied now: a kept snapshot taken under another
    /// membership is not sent (a new member is not in its ConfState).
    conf_now: ConfState,
    /// Set when raft-rs asked for a snapshot the log could not give: the
    /// replica takes a fresh one.
    wanted: std::sync::atomic::AtomicBool,
}

impl RaftLog {
    /// The log over what a disk loaded.
    pub fn new(p: Persisted) -> RaftLog {
        RaftLog {
            conf_now: p.conf.clone(),
            p,
            wanted: Default::default(),
        }
    }

    /// Records the membership as applied now.
    pub fn set_conf_now(&mut self, conf: ConfState) {
        self.conf_now = conf;
    }

    /// True (once) when raft-rs asked for a snapshot newer than the kept one.
    pub fn take_wanted(&self) -> bool {
        self.wanted
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Applies a batch that was (or is about to be) written to disk.
    pub fn apply(&mut self, batch: &Batch) {
        apply_batch(&mut self.p, batch);
    }

    /// The in-memory copy of the persisted state.
    pub fn persisted(&self) -> &Persisted {
        &self.p
    }

    /// The compaction point (index, term).
    pub fn trunc(&self) -> (u64, u64) {
        self.p.trunc
    }

    /// The number of entries held.
    pub fn len(&self) -> usize {
        self.p.entries.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.p.entries.is_empty()
    }

    fn first(&self) -> u64 {
        self.p.trunc.0 + 1
    }

    fn last(&self) -> u64 {
        self.p.entries.last().map_or(self.p.trunc.0, |e| e.index)
    }
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.p.hard.clone(), self.p.conf.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let off = self.first();
        let mut out = self.p.entries[(low - off) as usize..(high - off) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.p.trunc.0 {
            return Ok(self.p.trunc.1);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.p.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let s = &self.p.snapshot;
        if s.get_metadata().index == 0
            || s.get_metadata().index < request_index
            || s.get_metadata().get_conf_state() != &self.conf_now
        {
            // raft-rs asks again later; by then the replica has taken one.
            self.wanted
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(s.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e
    }

    #[test]
    fn append_overwrites_suffix_and_compaction_keeps_term() {
        let mut log = RaftLog::default();
        log.apply(&Batch {
            entries: (1..=5).map(|i| entry(i, 1)).collect(),
            ..Batch::default()
        });
        log.apply(&Batch {
            entries: vec![entry(4, 2), entry(5, 2)],
            ..Batch::default()
        });
        assert_eq!(log.term(3).unwrap(), 1);
        assert_eq!(log.term(5).unwrap(), 2);
        assert_eq!(log.last_index().unwrap(), 5);
        log.apply(&Batch {
            compact: Some((3, 1)),
            ..Batch::default()
        });
        assert_eq!(log.first_index().unwrap(), 4);
        assert_eq!(log.term(3).unwrap(), 1);
        assert!(log.term(2).is_err());
        assert!(
            log.entries(3, 5, None, GetEntriesContext::empty(false))
                .is_err()
        );
        let got = log
            .entries(4, 6, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 2);
        // An older compaction point is ignored.
        log.apply(&Batch {
            compact: Some((1, 1)),
            ..Batch::default()
        });
        assert_eq!(log.first_index().unwrap(), 4);
    }

    #[test]
    fn snapshot_install_replaces_the_log() {
        let mut log = RaftLog::default();
        log.apply(&Batch {
            entries: (1..=3).map(|i| entry(i, 1)).collect(),
            ..Batch::default()
        });
        assert!(log.snapshot(0, 2).is_err(), "no snapshot yet");
        assert!(log.take_wanted() && !log.take_wanted());
        let mut s = Snapshot::default();
        s.mut_metadata().index = 10;
        s.mut_metadata().term = 3;
        s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        log.apply(&Batch {
            install: Some(s.clone()),
            ..Batch::default()
        });
        assert!(log.is_empty());
        assert_eq!(log.first_index().unwrap(), 11);
        assert_eq!(log.last_index().unwrap(), 10);
        assert_eq!(log.term(10).unwrap(), 3);
        assert_eq!(
            log.initial_state().unwrap().conf_state.voters,
            vec![1, 2, 3]
        );
        log.set_conf_now(s.get_metadata().get_conf_state().clone());
        assert_eq!(log.snapshot(5, 2).unwrap(), s);
        // Taken under another membership: not sent, a new one is wanted.
        let mut grown = s.get_metadata().get_conf_state().clone();
        grown.learners = vec![4];
        log.set_conf_now(grown);
        assert!(log.snapshot(5, 4).is_err());
        assert!(log.take_wanted());
    }

    #[test]
    fn mem_disk_outlives_its_user() {
        let disk = MemDisk::new();
        let mut d = disk.clone();
        d.write(&Batch {
            entries: vec![entry(1, 1)],
            ..Batch::default()
        })
        .unwrap();
        drop(d);
        assert_eq!(disk.contents().entries.len(), 1);
    }
}
