//! The applied state on disk (DESIGN §7): sled, with the applied log index
//! written in the same batch as the keys it describes.
//!
//! sled does not fsync (measured: `flush` issues `sync_file_range`), so after
//! a power loss the database may be behind the durable Raft log, never
//! ahead of it (only committed, persisted entries are applied). On start the
//! replica loads it and replays the log after its applied index; when the
//! database is behind the log's compaction point it starts from the kept
//! snapshot instead.
//!
//! Keys: `b/<aor>` bindings, `c/<call-id>` calls, `d/<call-id>` CDRs,
//! `s/<node>` proposal de-duplication windows, `n/<node>` members,
//! `u/<name>` directory users,
//! `m/applied` the index. Values
//! are the JSON of [`State::export`].

use std::path::Path;

use crate::state::{Aor, Key, State};

/// Why the state database failed.
#[derive(Debug, thiserror::Error)]
pub enum StateDbError {
    /// sled failed (I/O, corruption).
    #[error("state database: {0}")]
    Engine(#[from] sled::Error),
    /// A stored key or value did not decode.
    #[error("state database record {key:?} does not decode: {detail}")]
    Decode {
        /// The raw key.
        key: String,
        /// What was wrong.
        detail: String,
    },
}

/// Where the replica keeps its applied state between starts.
pub trait StateDb: Send {
    /// The stored state and its applied index (empty state, index 0, when
    /// nothing is stored).
    fn load(&mut self) -> Result<State, StateDbError>;
    /// Writes the current values of `keys` and the applied index in one
    /// atomic batch.
    fn write(&mut self, state: &State, keys: &[Key]) -> Result<(), StateDbError>;
    /// Replaces everything with `state` (after a snapshot install).
    fn replace(&mut self, state: &State) -> Result<(), StateDbError>;
}

/// No state database: every start rebuilds the state from the kept
/// snapshot and the log (the simulation, and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoStateDb;

impl StateDb for NoStateDb {
    fn load(&mut self) -> Result<State, StateDbError> {
        Ok(State::new())
    }
    fn write(&mut self, _: &State, _: &[Key]) -> Result<(), StateDbError> {
        Ok(())
    }
    fn replace(&mut self, _: &State) -> Result<(), StateDbError> {
        Ok(())
    }
}

const APPLIED: &[u8] = b"m/applied";

fn raw_key(k: &Key) -> Vec<u8> {
    match k {
        Key::Bindings(a) => [b"b/", a.as_str().as_bytes()].concat(),
        Key::Call(id) => [b"c/", id.as_bytes()].concat(),
        Key::Cdr(id) => [b"d/", id.as_bytes()].concat(),
        Key::Seen(n) => [b"s/".as_slice(), &n.to_be_bytes()].concat(),
        Key::Member(n) => [b"n/".as_slice(), &n.to_be_bytes()].concat(),
        Key::User(n) => [b"u/", n.as_bytes()].concat(),
    }
}

fn parse_key(raw: &[u8]) -> Option<Key> {
    let (kind, rest) = (raw.get(..2)?, raw.get(2..)?);
    let text = || std::str::from_utf8(rest).ok().map(str::to_owned);
    match kind {
        b"b/" => Aor::parse(&text()?).map(Key::Bindings),
        b"c/" => text().map(Key::Call),
        b"d/" => text().map(Key::Cdr),
        b"s/" => rest
            .try_into()
            .ok()
            .map(|b| Key::Seen(u64::from_be_bytes(b))),
        b"u/" => text().map(Key::User),
        b"n/" => rest
            .try_into()
            .ok()
            .map(|b| Key::Member(u64::from_be_bytes(b))),
        _ => None,
    }
}

/// The applied state in a sled database.
#[derive(Debug)]
pub struct SledStateDb {
    db: sled::Db,
}

impl SledStateDb {
    /// Opens (or creates) the database in directory `path`; sled writes
    /// its buffers out every 500 ms in the background.
    pub fn open(path: &Path) -> Result<SledStateDb, StateDbError> {
        SledStateDb::open_with(path, Some(500))
    }

    /// Like [`SledStateDb::open`] with the background write-out period in
    /// milliseconds (`None`: only when dropped, which also releases the
    /// file lock at once: a test that reopens the database needs that).
    pub fn open_with(
        path: &Path,
        flush_every_ms: Option<u64>,
    ) -> Result<SledStateDb, StateDbError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(flush_every_ms)
            .open()?;
        Ok(SledStateDb { db })
    }
}

impl StateDb for SledStateDb {
    fn load(&mut self) -> Result<State, StateDbError> {
        let mut state = State::new();
        for row in self.db.iter() {
            let (k, v) = row?;
            if k.as_ref() == APPLIED {
                let b: [u8; 8] = v.as_ref().try_into().map_err(|_| StateDbError::Decode {
                    key: "m/applied".into(),
                    detail: format!("{} bytes", v.len()),
                })?;
                state.set_applied_index(u64::from_be_bytes(b));
                continue;
            }
            let bad = |detail: String| StateDbError::Decode {
                key: String::from_utf8_lossy(&k).into_owned(),
                detail,
            };
            let key = parse_key(&k).ok_or_else(|| bad("unknown key".into()))?;
            state.import(key, &v).map_err(|e| bad(e.to_string()))?;
        }
        Ok(state)
    }

    fn write(&mut self, state: &State, keys: &[Key]) -> Result<(), StateDbError> {
        let mut batch = sled::Batch::default();
        for k in keys {
            match state.export(k) {
                Some(v) => batch.insert(raw_key(k), v),
                None => batch.remove(raw_key(k)),
            }
        }
        batch.insert(APPLIED, &state.applied_index().to_be_bytes());
        self.db.apply_batch(batch)?;
        Ok(())
    }

    fn replace(&mut self, state: &State) -> Result<(), StateDbError> {
        let mut batch = sled::Batch::default();
        for row in self.db.iter().keys() {
            batch.remove(row?);
        }
        for k in state.keys() {
            if let Some(v) = state.export(&k) {
                batch.insert(raw_key(&k), v);
            }
        }
        batch.insert(APPLIED, &state.applied_index().to_be_bytes());
        self.db.apply_batch(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Entry, Origin};

    fn reg(id: u64, user: &str, cseq: u32) -> Entry {
        crate::state::test_register(id, user, cseq)
    }

    #[test]
    fn every_key_kind_round_trips() {
        let keys = [
            Key::Bindings(Aor::parse("sip:alice@sipzone.local").unwrap()),
            Key::Call("c@h".into()),
            Key::Cdr("c@h".into()),
            Key::Seen(7),
            Key::Member(3),
            Key::User("1000".into()),
        ];
        for k in keys {
            assert_eq!(parse_key(&raw_key(&k)), Some(k.clone()), "{k:?}");
        }
        assert_eq!(parse_key(b"x/1"), None);
    }

    #[test]
    fn sled_round_trips_applied_state_and_replace() {
        let dir = std::env::temp_dir().join(format!("sipzone-sled-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let o = Origin { node: 1, boot: 7 };
        let mut s = State::new();
        s.track_dirty(true);
        {
            let mut db = SledStateDb::open_with(&dir, None).unwrap();
            for (i, u) in ["alice", "bob", "carol"].iter().enumerate() {
                s.apply_at(i as u64 + 1, o, &reg(i as u64 + 1, u, 1));
                let keys = s.take_dirty();
                db.write(&s, &keys).unwrap();
            }
            assert_eq!(db.load().unwrap().binding_count(), 3);
        }
        let mut db = SledStateDb::open_with(&dir, None).unwrap();
        let mut loaded = db.load().unwrap();
        assert_eq!(loaded.applied_index(), 3);
        loaded.track_dirty(true);
        assert_eq!(loaded, s);
        // The same proposal again is still a duplicate after the reload.
        assert_eq!(
            loaded.apply_at(4, o, &reg(2, "bob", 1)),
            crate::state::Applied::Duplicate
        );
        let mut small = State::new();
        small.apply_at(9, o, &reg(1, "dave", 1));
        db.replace(&small).unwrap();
        let again = db.load().unwrap();
        assert_eq!(again.binding_count(), 1);
        assert_eq!(again.applied_index(), 9);
        drop(db);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
