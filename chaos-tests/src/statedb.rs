//! A state database that loses what sled may lose (DESIGN §7): writes are
//! atomic batches applied in order, but sled does not fsync, so after a
//! crash the newest batches may be gone. A restarted replica then finds its
//! applied state behind the durable Raft log (never ahead of it) and must
//! replay the log over it, or start from its kept snapshot when the state is
//! behind the compaction point.
//!
//! ```text
//!   write ─▶ unsynced (newest last) ──flush──▶ durable
//!                 └── crash: a random newest part is lost, the rest kept
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use zone_node::replica::statedb::{StateDb, StateDbError};
use zone_node::state::{Key, State};

use crate::rng::SimRng;

#[derive(Debug)]
enum Write {
    /// Keys set (`Some`) or removed (`None`), and the applied index.
    Keys(Vec<(Key, Option<Vec<u8>>)>, u64),
    /// Everything replaced (a snapshot installed).
    Replace(Vec<(Key, Vec<u8>)>, u64),
}

#[derive(Debug, Default)]
struct Inner {
    durable: BTreeMap<Key, Vec<u8>>,
    applied: u64,
    unsynced: VecDeque<Write>,
}

impl Inner {
    fn apply(&mut self, w: Write) {
        match w {
            Write::Keys(values, applied) => {
                for (k, v) in values {
                    match v {
                        Some(v) => self.durable.insert(k, v),
                        None => self.durable.remove(&k),
                    };
                }
                self.applied = applied;
            }
            Write::Replace(values, applied) => {
                self.durable = values.into_iter().collect();
                self.applied = applied;
            }
        }
    }
}

/// The simulated state database of one node; clones share it, and it
/// outlives the replica using it, as a [`zone_node::replica::MemDisk`] does.
#[derive(Debug, Clone, Default)]
pub struct SimStateDb(Arc<Mutex<Inner>>);

impl SimStateDb {
    /// An empty database.
    pub fn new() -> SimStateDb {
        SimStateDb::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // One thread uses it; a poisoned lock can only follow a panic that
        // already failed the test.
        self.0.lock().expect("the simulation is single-threaded")
    }

    /// Makes every write so far durable (sled's background flush).
    pub fn flush(&self) {
        let mut inner = self.inner();
        while let Some(w) = inner.unsynced.pop_front() {
            inner.apply(w);
        }
    }

    /// A crash: a random number of the newest writes are lost, the older
    /// ones reach the disk. Returns how many were lost.
    pub fn crash(&self, rng: &mut SimRng) -> usize {
        let mut inner = self.inner();
        let lost = rng.below(inner.unsynced.len() as u64 + 1) as usize;
        let keep = inner.unsynced.len() - lost;
        inner.unsynced.truncate(keep);
        drop(inner);
        self.flush();
        lost
    }

    /// The applied index a restart would find now, unsynced writes included.
    pub fn applied_index(&self) -> u64 {
        let inner = self.inner();
        inner
            .unsynced
            .back()
            .map(|w| match w {
                Write::Keys(_, a) | Write::Replace(_, a) => *a,
            })
            .unwrap_or(inner.applied)
    }
}

impl StateDb for SimStateDb {
    fn load(&mut self) -> Result<State, StateDbError> {
        // A running process reads its own unsynced writes.
        self.flush();
        let inner = self.inner();
        let mut state = State::new();
        for (k, v) in &inner.durable {
            state
                .import(k.clone(), v)
                .map_err(|e| StateDbError::Decode {
                    key: format!("{k:?}"),
                    detail: e.to_string(),
                })?;
        }
        state.set_applied_index(inner.applied);
        Ok(state)
    }

    fn write(&mut self, state: &State, keys: &[Key]) -> Result<(), StateDbError> {
        let values = keys.iter().map(|k| (k.clone(), state.export(k))).collect();
        self.inner()
            .unsynced
            .push_back(Write::Keys(values, state.applied_index()));
        Ok(())
    }

    fn replace(&mut self, state: &State) -> Result<(), StateDbError> {
        let values = state
            .keys()
            .into_iter()
            .filter_map(|k| state.export(&k).map(|v| (k, v)))
            .collect();
        self.inner()
            .unsynced
            .push_back(Write::Replace(values, state.applied_index()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zone_node::state::{Aor, Binding, Command, Entry, Origin, ProposalId};

    fn reg(id: u64, user: &str) -> Entry {
        Entry {
            id: ProposalId(id),
            at_unix: 100,
            cmds: vec![Command::UpsertBinding {
                aor: Aor::parse(&format!("sip:{user}@sipzone.local")).unwrap(),
                binding: Binding::plain(format!("sip:{user}@10.0.0.1"), 4000, "c", 1, "a1"),
            }],
        }
    }

    #[test]
    fn a_crash_loses_only_a_newest_suffix() {
        let mut db = SimStateDb::new();
        let mut s = State::new();
        s.track_dirty(true);
        let o = Origin { node: 1, boot: 1 };
        for (i, u) in ["a", "b", "c", "d"].iter().enumerate() {
            s.apply_at(i as u64 + 1, o, &reg(i as u64 + 1, u));
            let keys = s.take_dirty();
            db.write(&s, &keys).unwrap();
            if i == 1 {
                db.flush();
            }
        }
        assert_eq!(db.applied_index(), 4);
        let mut rng = SimRng::new(2);
        let lost = db.crash(&mut rng);
        let loaded = db.clone().load().unwrap();
        assert_eq!(loaded.applied_index(), 4 - lost as u64);
        assert_eq!(loaded.binding_count(), 4 - lost);
        assert!(loaded.applied_index() >= 2, "flushed writes survive");
        // Whatever survived is exactly the state at that index.
        let mut t = State::new();
        for i in 0..loaded.applied_index() {
            t.apply_at(i + 1, o, &reg(i + 1, ["a", "b", "c", "d"][i as usize]));
        }
        let mut l = loaded;
        l.track_dirty(false);
        assert_eq!(l, t);
    }
}
