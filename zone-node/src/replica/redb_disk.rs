//! The Raft log on disk in redb (DESIGN §7): entries by index, and one
//! metadata table for the hard state, the configuration, the snapshot and the
//! compaction point. Every [`Disk::write`] is one redb write transaction,
//! committed with redb's default durability (fdatasync before it returns).

use std::path::Path;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::log::{Batch, Disk, DiskError, Persisted, apply_batch};

/// Log entries by index (protobuf-encoded raft-rs `Entry`).
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
/// Named metadata records.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const HARD: &str = "hard_state";
const CONF: &str = "conf_state";
const SNAPSHOT: &str = "snapshot";
const TRUNC: &str = "trunc";

/// The Raft log in a redb file.
pub struct RedbDisk {
    db: Database,
}

impl std::fmt::Debug for RedbDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbDisk").finish_non_exhaustive()
    }
}

fn engine(e: impl std::fmt::Display) -> DiskError {
    DiskError::Engine(e.to_string())
}

fn decode<M: protobuf::Message>(what: &'static str, bytes: &[u8]) -> Result<M, DiskError> {
    M::parse_from_bytes(bytes).map_err(|e| DiskError::Decode {
        what,
        detail: e.to_string(),
    })
}

fn encode(m: &impl protobuf::Message) -> Result<Vec<u8>, DiskError> {
    m.write_to_bytes().map_err(engine)
}

impl RedbDisk {
    /// Opens (or creates) the log file at `path`.
    pub fn open(path: &Path) -> Result<RedbDisk, DiskError> {
        let db = Database::create(path).map_err(engine)?;
        // Create both tables so a fresh file reads as empty.
        let txn = db.begin_write().map_err(engine)?;
        txn.open_table(ENTRIES).map_err(engine)?;
        txn.open_table(META).map_err(engine)?;
        txn.commit().map_err(engine)?;
        Ok(RedbDisk { db })
    }
}

impl Disk for RedbDisk {
    fn load(&mut self) -> Result<Persisted, DiskError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let meta = txn.open_table(META).map_err(engine)?;
        let mut p = Persisted::default();
        if let Some(v) = meta.get(HARD).map_err(engine)? {
            p.hard = decode::<HardState>("hard state", v.value())?;
        }
        if let Some(v) = meta.get(CONF).map_err(engine)? {
            p.conf = decode::<ConfState>("conf state", v.value())?;
        }
        if let Some(v) = meta.get(SNAPSHOT).map_err(engine)? {
            p.snapshot = decode::<Snapshot>("snapshot", v.value())?;
        }
        if let Some(v) = meta.get(TRUNC).map_err(engine)? {
            p.trunc = decode_trunc(v.value())?;
        }
        let entries = txn.open_table(ENTRIES).map_err(engine)?;
        for row in entries.range(p.trunc.0 + 1..).map_err(engine)? {
            let (_, v) = row.map_err(engine)?;
            p.entries.push(decode::<Entry>("entry", v.value())?);
        }
        Ok(p)
    }

    fn write(&mut self, batch: &Batch) -> Result<(), DiskError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(engine)?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(engine)?;
            let mut meta = txn.open_table(META).map_err(engine)?;
            // The metadata records after the batch, computed by the same
            // rules as the in-memory log (entries aside).
            let mut after = Persisted::default();
            let mut trunc: Option<(u64, u64)> = None;
            if let Some(s) = &batch.keep {
                meta.insert(SNAPSHOT, encode(s)?.as_slice())
                    .map_err(engine)?;
            }
            if let Some(s) = &batch.install {
                entries.retain(|_, _| false).map_err(engine)?;
                meta.insert(SNAPSHOT, encode(s)?.as_slice())
                    .map_err(engine)?;
                apply_batch(
                    &mut after,
                    &Batch {
                        install: Some(s.clone()),
                        ..Batch::default()
                    },
                );
                meta.insert(CONF, encode(&after.conf)?.as_slice())
                    .map_err(engine)?;
                trunc = Some(after.trunc);
            }
            if let Some(first) = batch.entries.first() {
                entries
                    .retain_in(first.index.., |_, _| false)
                    .map_err(engine)?;
                for e in &batch.entries {
                    entries
                        .insert(e.index, encode(e)?.as_slice())
                        .map_err(engine)?;
                }
            }
            if let Some(h) = &batch.hard {
                meta.insert(HARD, encode(h)?.as_slice()).map_err(engine)?;
            }
            if let Some(c) = &batch.conf {
                meta.insert(CONF, encode(c)?.as_slice()).map_err(engine)?;
            }
            if let Some((i, t)) = batch.compact {
                let old = match meta.get(TRUNC).map_err(engine)? {
                    Some(v) => decode_trunc(v.value())?.0,
                    None => 0,
                };
                if i > old.max(trunc.map_or(0, |t| t.0)) {
                    entries.retain_in(..=i, |_, _| false).map_err(engine)?;
                    trunc = Some((i, t));
                }
            }
            if let Some((i, t)) = trunc {
                let mut b = i.to_be_bytes().to_vec();
                b.extend_from_slice(&t.to_be_bytes());
                meta.insert(TRUNC, b.as_slice()).map_err(engine)?;
            }
        }
        txn.commit().map_err(engine)
    }
}

/// The compaction point record: index then term, big-endian.
fn decode_trunc(b: &[u8]) -> Result<(u64, u64), DiskError> {
    let bad = || DiskError::Decode {
        what: "compaction point",
        detail: format!("{} bytes", b.len()),
    };
    let i = b.get(..8).and_then(|s| s.try_into().ok()).ok_or_else(bad)?;
    let t = b
        .get(8..16)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(bad)?;
    Ok((u64::from_be_bytes(i), u64::from_be_bytes(t)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::log::MemDisk;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = data.to_vec().into();
        e
    }

    /// The same batches on redb and on the memory disk load the same.
    #[test]
    fn redb_matches_the_memory_disk_across_reopen() {
        let dir = std::env::temp_dir().join(format!("sipzone-redb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("raft.redb");
        let mut mem = MemDisk::new();
        let mut hs = HardState::default();
        hs.term = 2;
        hs.vote = 3;
        hs.commit = 4;
        let mut cs = ConfState::default();
        cs.voters = vec![1, 2, 3];
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3, 4];
        snap.data = b"state".to_vec().into();
        let batches = vec![
            Batch {
                entries: (1..=6).map(|i| entry(i, 1, b"x")).collect(),
                hard: Some(hs.clone()),
                conf: Some(cs),
                ..Batch::default()
            },
            Batch {
                entries: vec![entry(5, 2, b"y"), entry(6, 2, b"z")],
                ..Batch::default()
            },
            Batch {
                compact: Some((3, 1)),
                ..Batch::default()
            },
            Batch {
                compact: Some((2, 1)),
                ..Batch::default()
            },
        ];
        {
            let mut disk = RedbDisk::open(&path).unwrap();
            for b in &batches {
                disk.write(b).unwrap();
                mem.write(b).unwrap();
            }
        }
        let mut disk = RedbDisk::open(&path).unwrap();
        let loaded = disk.load().unwrap();
        assert_eq!(loaded, mem.load().unwrap());
        assert_eq!(loaded.entries.len(), 3);
        assert_eq!(loaded.trunc, (3, 1));
        let keep = Batch {
            keep: Some(snap.clone()),
            ..Batch::default()
        };
        disk.write(&keep).unwrap();
        mem.write(&keep).unwrap();
        assert_eq!(disk.load().unwrap(), mem.load().unwrap());
        let install = Batch {
            install: Some(snap),
            entries: vec![entry(21, 4, b"after")],
            ..Batch::default()
        };
        disk.write(&install).unwrap();
        mem.write(&install).unwrap();
        drop(disk);
        let loaded = RedbDisk::open(&path).unwrap().load().unwrap();
        assert_eq!(loaded, mem.load().unwrap());
        assert_eq!(loaded.conf.voters, vec![1, 2, 3, 4]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
