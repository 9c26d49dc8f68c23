//! The Raft replica of a zone-node (DESIGN §7): one raft-rs [`RawNode`] per
//! region, its log in a [`Disk`] (redb), its applied [`State`] in a
//! [`StateDb`] (sled), driven without I/O of its own beyond those two.
//!
//! The driver calls [`Replica::tick`] every tick (50 ms), [`Replica::step`]
//! with messages from peers, [`Replica::propose`] with the cores' entries,
//! then [`Replica::process`] once per batch of inputs, and drains
//! [`Replica::poll_output`] (messages for peers, leadership changes, reads)
//! and [`Store::take_committed`]. [`Replica::process`] runs the Ready loop:
//!
//! ```text
//!   Ready ──▶ one Disk::write (snapshot, entries, hard state: one fsync)
//!         ──▶ messages out ──▶ apply committed entries to State
//!         ──▶ StateDb::write (changed keys + applied index, one batch)
//!         ──▶ advance ──▶ LightReady: messages, more committed entries
//!         ──▶ compact the log behind a snapshot every `compact_after` entries
//! ```
//!
//! Proposals: an entry's [`Origin`] (Raft id and start nonce) travels in the
//! Raft entry's context, the [`Entry`] as JSON in its data. The commit of an
//! own proposal is matched to its waiter by id, never by order. A proposal
//! not seen committed within `retry_ticks` (lost on the way to a leader that
//! died, or truncated by a new one) is proposed again, waiting twice as long
//! after each try, up to `max_retries` times, then reported as
//! [`Replica::take_dropped`]; a new leader gets every pending proposal at
//! once; [`State::apply_at`]
//! skips a proposal applied twice.
//!
//! Timing (DESIGN §7): tick 50 ms, election 10 ticks, heartbeat 2 ticks;
//! pre-vote and check-quorum on.

// rust-protobuf messages are built field by field, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

mod log;
pub mod redb_disk;
pub mod statedb;

pub use log::{Batch, Disk, DiskError, MemDisk, Persisted, RaftLog};

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeV2, ConfState, Entry as RaftEntry, EntryType, Message, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole, Storage as _};

use crate::state::{Applied, Entry, Origin, ProposalId, State, Store};
use statedb::{StateDb, StateDbError};

/// Replica parameters.
///
/// | name | type | meaning | default |
/// |---|---|---|---|
/// | `id` | `u64` | this replica's Raft id (non-zero, unique in the region) | — |
/// | `election_tick` | `usize` | ticks without a leader before a (pre-)vote | 10 |
/// | `heartbeat_tick` | `usize` | ticks between leader heartbeats | 2 |
/// | `max_election_tick` | `usize` | election timeouts are drawn in `[election_tick, max)` | 20 |
/// | `compact_after` | `u64` | log entries kept before compacting behind a snapshot | 10,000 |
/// | `compact_margin` | `u64` | entries kept behind the snapshot for followers slightly behind | 1,000 |
/// | `retry_ticks` | `u32` | ticks before an uncommitted proposal is proposed again (doubling after each try), or a read retried | 20 |
/// | `max_retries` | `u32` | re-proposals before a proposal is dropped | 3 |
/// | `max_size_per_msg` | `u64` | bytes of entries per append message | 1 MiB |
/// | `max_inflight_msgs` | `usize` | append messages in flight per follower | 256 |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// This replica's Raft id.
    pub id: u64,
    /// Ticks without a leader before an election.
    pub election_tick: usize,
    /// Ticks between heartbeats.
    pub heartbeat_tick: usize,
    /// Upper bound (exclusive) of randomized election timeouts.
    pub max_election_tick: usize,
    /// Entries kept in the log before it is compacted.
    pub compact_after: u64,
    /// Entries kept behind the snapshot when compacting.
    pub compact_margin: u64,
    /// Ticks before an uncommitted proposal or read is retried.
    pub retry_ticks: u32,
    /// Re-proposals before a proposal is dropped.
    pub max_retries: u32,
    /// Bytes of entries per append message.
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower.
    pub max_inflight_msgs: usize,
}

impl ReplicaConfig {
    /// The defaults above for replica `id`.
    pub fn new(id: u64) -> ReplicaConfig {
        ReplicaConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            max_election_tick: 20,
            compact_after: 10_000,
            compact_margin: 1_000,
            retry_ticks: 20,
            max_retries: 3,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
        }
    }

    fn raft(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
            min_election_tick: self.election_tick,
            max_election_tick: self.max_election_tick,
            applied,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        }
    }
}

/// Why the replica failed. Disk and state database errors are fatal for the
/// replica (the driver stops it: a replica that cannot persist must not vote
/// or acknowledge).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The Raft log's disk failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The state database failed.
    #[error(transparent)]
    StateDb(#[from] StateDbError),
    /// raft-rs refused the configuration or a state transition.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A snapshot's data did not decode.
    #[error("snapshot at index {index} does not decode: {detail}")]
    Snapshot {
        /// The snapshot's index.
        index: u64,
        /// The decoder's message.
        detail: String,
    },
    /// The stored state is ahead of the durable log (a log file was lost).
    #[error("applied index {applied} is beyond the log's last index {last}")]
    AheadOfLog {
        /// The state database's applied index.
        applied: u64,
        /// The log's last index.
        last: u64,
    },
}

/// What the replica asks of its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A Raft message for peer `msg.to`.
    Send(Message),
    /// The leader or term changed (`leader` 0: none known).
    Role {
        /// The leader's Raft id, 0 when unknown.
        leader: u64,
        /// The current term.
        term: u64,
    },
    /// The read asked with [`Replica::read_index`] can be served from the
    /// local state: it holds every write committed when the read was asked.
    ReadReady(u64),
    /// The read could not be confirmed after its retries.
    ReadFailed(u64),
    /// A membership change was applied; `context` is what its proposer gave.
    ConfChanged {
        /// The configuration after the change.
        conf: ConfState,
        /// The change's context bytes.
        context: Bytes,
    },
}

/// An own proposal not yet seen committed.
#[derive(Debug)]
struct Pending {
    data: Bytes,
    ticks: u32,
    tries: u32,
}

/// A read waiting for its ReadIndex, then for the state to reach it.
#[derive(Debug)]
struct Read {
    index: Option<u64>,
    ticks: u32,
    tries: u32,
}

/// One Raft replica with its applied state.
pub struct Replica<D: Disk, S: StateDb> {
    config: ReplicaConfig,
    node: RawNode<RaftLog>,
    disk: D,
    statedb: S,
    state: State,
    origin: Origin,
    conf: ConfState,
    pending: BTreeMap<u64, Pending>,
    committed: Vec<ProposalId>,
    dropped: Vec<ProposalId>,
    reads: BTreeMap<u64, Read>,
    outputs: VecDeque<Output>,
    role: (u64, u64),
    /// A commit index learnt after the last disk write, persisted with the
    /// next one (a lost commit index is recovered from the applied index).
    commit_to_persist: Option<u64>,
    /// Ticks since start.
    ticks: u64,
    /// The tick at which each peer was last heard from.
    heard: BTreeMap<u64, u64>,
    /// The tick at which this replica last became leader.
    leader_since: u64,
}

impl<D: Disk, S: StateDb> std::fmt::Debug for Replica<D, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.config.id)
            .field("origin", &self.origin)
            .field("applied", &self.state.applied_index())
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Encodes an [`Origin`] for a Raft entry's context.
fn encode_origin(o: Origin) -> Bytes {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&o.node.to_be_bytes());
    b.extend_from_slice(&o.boot.to_be_bytes());
    b.into()
}

fn decode_origin(b: &[u8]) -> Option<Origin> {
    let node = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    let boot = u64::from_be_bytes(b.get(8..16)?.try_into().ok()?);
    Some(Origin { node, boot })
}

fn decode_state(s: &Snapshot) -> Result<State, ReplicaError> {
    let mut state: State = serde_json::from_slice(&s.data).map_err(|e| ReplicaError::Snapshot {
        index: s.get_metadata().index,
        detail: e.to_string(),
    })?;
    state.set_applied_index(s.get_metadata().index);
    Ok(state)
}

impl<D: Disk, S: StateDb> Replica<D, S> {
    /// Opens the replica over what `disk` and `statedb` hold. `boot` is a
    /// nonce drawn by the caller at each start. `voters` bootstraps a new
    /// region: used only when the disk holds no configuration yet; a node
    /// that joins an existing region passes none and waits for the leader.
    pub fn open(
        config: ReplicaConfig,
        mut disk: D,
        mut statedb: S,
        boot: u64,
        voters: &[u64],
    ) -> Result<Replica<D, S>, ReplicaError> {
        let mut p = disk.load()?;
        if p.conf.voters.is_empty() && p.snapshot.get_metadata().index == 0 && !voters.is_empty() {
            p.conf.voters = voters.to_vec();
            disk.write(&Batch {
                conf: Some(p.conf.clone()),
                ..Batch::default()
            })?;
        }
        let mut state = statedb.load()?;
        if state.applied_index() < p.trunc.0 {
            // The state database is behind the compaction point: start from
            // the kept snapshot, which is at or after it.
            state = decode_state(&p.snapshot)?;
            statedb.replace(&state)?;
        }
        let last = p.entries.last().map_or(p.trunc.0, |e| e.index);
        if state.applied_index() > last {
            return Err(ReplicaError::AheadOfLog {
                applied: state.applied_index(),
                last,
            });
        }
        // Applied entries were committed: a commit index lost with the
        // last light Ready is recovered from the applied index.
        p.hard.commit = p.hard.commit.max(state.applied_index());
        let conf = p.conf.clone();
        state.track_dirty(true);
        let applied = state.applied_index();
        let logger = slog::Logger::root(TracingDrain, slog::o!("raft_id" => config.id));
        let node = RawNode::new(&config.raft(applied), RaftLog::new(p), &logger)?;
        Ok(Replica {
            origin: Origin {
                node: config.id,
                boot,
            },
            config,
            node,
            disk,
            statedb,
            state,
            conf,
            pending: BTreeMap::new(),
            committed: Vec::new(),
            dropped: Vec::new(),
            reads: BTreeMap::new(),
            outputs: VecDeque::new(),
            role: (0, 0),
            commit_to_persist: None,
            ticks: 0,
            heard: BTreeMap::new(),
            leader_since: 0,
        })
    }

    /// This replica's Raft id.
    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// The known leader (0: none) and the current term.
    pub fn role(&self) -> (u64, u64) {
        (self.node.raft.leader_id, self.node.raft.term)
    }

    /// True when this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The membership as of the last applied change.
    pub fn conf(&self) -> &ConfState {
        &self.conf
    }

    /// The commit index this replica knows.
    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    /// Ticks since this replica started.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// On the leader: the voters not heard from for `ticks` ticks (counted
    /// from when this replica became leader at the earliest). Empty on a
    /// follower, which cannot tell a dead peer from its own isolation.
    pub fn silent_voters(&self, ticks: u64) -> Vec<u64> {
        if !self.is_leader() {
            return vec![];
        }
        self.conf
            .voters
            .iter()
            .copied()
            .filter(|v| *v != self.config.id)
            .filter(|v| {
                let last = self
                    .heard
                    .get(v)
                    .copied()
                    .unwrap_or(0)
                    .max(self.leader_since);
                self.ticks.saturating_sub(last) >= ticks
            })
            .collect()
    }

    /// Own proposals waiting for their commit.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Advances Raft's logical clock by one tick and retries proposals and
    /// reads that waited `retry_ticks`.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.node.tick();
        if let Err(e) = self.refresh_snapshot() {
            tracing::error!(error = %e, "taking a snapshot failed");
        }
        let mut retry = Vec::new();
        for (id, p) in &mut self.pending {
            p.ticks += 1;
            // Backing off: under overload a commit is late, not lost, and
            // every early copy adds to the load (a new leader gets the
            // pending proposals at once anyway).
            if p.ticks >= self.config.retry_ticks << p.tries.min(8) {
                p.ticks = 0;
                p.tries += 1;
                retry.push(*id);
            }
        }
        for id in retry {
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            if p.tries > self.config.max_retries {
                self.pending.remove(&id);
                self.dropped.push(ProposalId(id));
                tracing::warn!(id, "proposal dropped after its retries");
            } else {
                let data = p.data.clone();
                self.submit(data);
            }
        }
        let mut again = Vec::new();
        for (ctx, r) in &mut self.reads {
            r.ticks += 1;
            if r.index.is_none() && r.ticks >= self.config.retry_ticks {
                r.ticks = 0;
                r.tries += 1;
                again.push((*ctx, r.tries));
            }
        }
        for (ctx, tries) in again {
            if tries > self.config.max_retries {
                self.reads.remove(&ctx);
                self.outputs.push_back(Output::ReadFailed(ctx));
            } else {
                self.node.read_index(ctx.to_be_bytes().to_vec());
            }
        }
    }

    /// Feeds a message from a peer. A message raft-rs refuses (from an
    /// unknown peer, malformed) is logged and dropped.
    pub fn step(&mut self, msg: Message) {
        self.heard.insert(msg.from, self.ticks);
        if let Err(e) = self.node.step(msg) {
            tracing::debug!(error = %e, "raft message dropped");
        }
    }

    fn submit(&mut self, data: Bytes) {
        // Without a known leader raft-rs drops the proposal; the retry on
        // tick proposes it again.
        if let Err(e) = self
            .node
            .propose(encode_origin(self.origin).to_vec(), data.to_vec())
        {
            tracing::debug!(error = %e, "proposal not accepted yet");
        }
    }

    /// Proposes a membership change (joint consensus when it changes more
    /// than one voter). `context` reaches every replica with
    /// [`Output::ConfChanged`] (the new member's address and zone).
    pub fn propose_conf_change(
        &mut self,
        change: ConfChangeV2,
        context: Bytes,
    ) -> Result<(), ReplicaError> {
        self.node.propose_conf_change(context.to_vec(), change)?;
        Ok(())
    }

    /// Asks for a linearizable read: [`Output::ReadReady`] with `ctx` once
    /// the local state holds everything committed now, or
    /// [`Output::ReadFailed`] after the retries.
    pub fn read_index(&mut self, ctx: u64) {
        self.reads.insert(
            ctx,
            Read {
                index: None,
                ticks: 0,
                tries: 0,
            },
        );
        self.node.read_index(ctx.to_be_bytes().to_vec());
    }

    /// Tells Raft that peer `id` could not be reached (it slows appends).
    pub fn report_unreachable(&mut self, id: u64) {
        self.node.report_unreachable(id);
    }

    /// Tells Raft how sending a snapshot to `id` went.
    pub fn report_snapshot(&mut self, id: u64, ok: bool) {
        let status = if ok {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.node.report_snapshot(id, status);
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Own proposals given up after their retries, since the last call.
    pub fn take_dropped(&mut self) -> Vec<ProposalId> {
        std::mem::take(&mut self.dropped)
    }

    /// Runs the Ready loop until raft-rs has nothing more: persists, sends,
    /// applies. An error means the replica can no longer persist; the caller
    /// stops it.
    pub fn process(&mut self) -> Result<(), ReplicaError> {
        let mut resubmit = false;
        while self.node.has_ready() {
            let mut rd = self.node.ready();
            if rd.ss().is_some() || rd.hs().is_some() {
                let role = (self.node.raft.leader_id, self.node.raft.term);
                if role != self.role {
                    let new_leader = role.0 != 0 && role.0 != self.role.0;
                    if role.0 == self.config.id && self.role.0 != self.config.id {
                        self.leader_since = self.ticks;
                    }
                    self.role = role;
                    self.outputs.push_back(Output::Role {
                        leader: role.0,
                        term: role.1,
                    });
                    // Proposals lost with the old leader (or dropped for
                    // want of one) go to the new one as soon as this Ready
                    // is done (never between ready and advance), not at
                    // their retry tick.
                    resubmit |= new_leader;
                }
            }
            let mut batch = Batch {
                entries: rd.take_entries(),
                hard: rd.hs().cloned(),
                ..Batch::default()
            };
            if !rd.snapshot().is_empty() {
                batch.install = Some(rd.snapshot().clone());
            }
            if let Some(c) = self.commit_to_persist.take() {
                let mut h = batch
                    .hard
                    .take()
                    .unwrap_or_else(|| self.node.store().persisted().hard.clone());
                h.commit = h.commit.max(c);
                batch.hard = Some(h);
            }
            self.disk.write(&batch)?;
            self.node.mut_store().apply(&batch);
            if let Some(s) = &batch.install {
                self.state = decode_state(s)?;
                self.state.track_dirty(true);
                self.conf = s.get_metadata().get_conf_state().clone();
                self.node.mut_store().set_conf_now(self.conf.clone());
                self.statedb.replace(&self.state)?;
                tracing::info!(index = s.get_metadata().index, "snapshot installed");
            }
            self.send(rd.take_messages());
            self.apply(rd.take_committed_entries())?;
            self.send(rd.take_persisted_messages());
            for rs in rd.take_read_states() {
                if let Ok(b) = <[u8; 8]>::try_from(rs.request_ctx.as_slice())
                    && let Some(r) = self.reads.get_mut(&u64::from_be_bytes(b))
                {
                    r.index = Some(rs.index);
                }
            }
            let mut light = self.node.advance(rd);
            if let Some(c) = light.commit_index() {
                self.commit_to_persist = Some(c);
            }
            self.send(light.take_messages());
            self.apply(light.take_committed_entries())?;
            self.node.advance_apply();
            self.finish_reads();
            self.maybe_compact()?;
            self.refresh_snapshot()?;
            if std::mem::take(&mut resubmit) {
                self.resubmit_pending();
            }
        }
        Ok(())
    }

    fn resubmit_pending(&mut self) {
        let datas: Vec<Bytes> = self
            .pending
            .values_mut()
            .map(|p| {
                p.ticks = 0;
                p.data.clone()
            })
            .collect();
        for d in datas {
            self.submit(d);
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        self.outputs.extend(msgs.into_iter().map(Output::Send));
    }

    fn finish_reads(&mut self) {
        let applied = self.state.applied_index();
        let done: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied))
            .map(|(c, _)| *c)
            .collect();
        for ctx in done {
            self.reads.remove(&ctx);
            self.outputs.push_back(Output::ReadReady(ctx));
        }
    }

    fn apply(&mut self, entries: Vec<RaftEntry>) -> Result<(), ReplicaError> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in entries {
            if e.index <= self.state.applied_index() {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {
                    // A new leader's empty entry.
                    self.state.set_applied_index(e.index);
                }
                EntryType::EntryNormal => self.apply_normal(&e),
                EntryType::EntryConfChangeV2 | EntryType::EntryConfChange => {
                    self.apply_conf_change(&e)?;
                    self.state.set_applied_index(e.index);
                }
            }
        }
        let keys = self.state.take_dirty();
        self.statedb.write(&self.state, &keys)?;
        Ok(())
    }

    fn apply_normal(&mut self, e: &RaftEntry) {
        let origin = decode_origin(&e.context);
        let entry: Option<Entry> = serde_json::from_slice(&e.data).ok();
        let (Some(origin), Some(entry)) = (origin, entry) else {
            // Every replica skips it alike; the index still counts.
            tracing::error!(index = e.index, "committed entry does not decode: skipped");
            self.state.set_applied_index(e.index);
            return;
        };
        match self.state.apply_at(e.index, origin, &entry) {
            Applied::Rejected(err) => {
                tracing::debug!(id = %entry.id, error = %err, "entry refused")
            }
            Applied::Duplicate => tracing::debug!(id = %entry.id, "proposal already applied"),
            Applied::Done { .. } => {}
        }
        if origin == self.origin && self.pending.remove(&entry.id.0).is_some() {
            self.committed.push(entry.id);
        }
    }

    fn apply_conf_change(&mut self, e: &RaftEntry) -> Result<(), ReplicaError> {
        let cs = if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            let cc = ConfChangeV2::parse_from_bytes(&e.data);
            match cc {
                Ok(cc) => self.node.apply_conf_change(&cc)?,
                Err(err) => {
                    tracing::error!(index = e.index, error = %err, "conf change does not decode");
                    return Ok(());
                }
            }
        } else {
            match ConfChange::parse_from_bytes(&e.data) {
                Ok(cc) => self.node.apply_conf_change(&cc)?,
                Err(err) => {
                    tracing::error!(index = e.index, error = %err, "conf change does not decode");
                    return Ok(());
                }
            }
        };
        let batch = Batch {
            conf: Some(cs.clone()),
            ..Batch::default()
        };
        self.disk.write(&batch)?;
        self.node.mut_store().apply(&batch);
        self.node.mut_store().set_conf_now(cs.clone());
        tracing::info!(voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        self.conf = cs.clone();
        self.outputs.push_back(Output::ConfChanged {
            conf: cs,
            context: e.context.clone(),
        });
        Ok(())
    }

    /// A snapshot of the applied state, at the applied index, under the
    /// current membership.
    fn snapshot_now(&self) -> Result<Snapshot, ReplicaError> {
        let applied = self.state.applied_index();
        let term = self.node.store().term(applied)?;
        let mut snap = Snapshot::default();
        snap.data = serde_json::to_vec(&self.state)
            .map_err(|e| ReplicaError::Snapshot {
                index: applied,
                detail: e.to_string(),
            })?
            .into();
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.conf.clone());
        Ok(snap)
    }

    /// Takes a fresh snapshot when raft-rs asked for one the log could not
    /// give (a new member, or one behind the kept snapshot's membership).
    fn refresh_snapshot(&mut self) -> Result<(), ReplicaError> {
        if !self.node.store().take_wanted() || self.state.applied_index() == 0 {
            return Ok(());
        }
        let batch = Batch {
            keep: Some(self.snapshot_now()?),
            ..Batch::default()
        };
        self.disk.write(&batch)?;
        self.node.mut_store().apply(&batch);
        tracing::debug!(
            index = self.state.applied_index(),
            "snapshot taken for a follower"
        );
        Ok(())
    }

    /// Compacts the log behind a snapshot of the applied state once it
    /// holds more than `compact_after` entries.
    fn maybe_compact(&mut self) -> Result<(), ReplicaError> {
        let applied = self.state.applied_index();
        let (trunc, _) = self.node.store().trunc();
        if applied.saturating_sub(trunc) <= self.config.compact_after {
            return Ok(());
        }
        let snap = self.snapshot_now()?;
        let upto = applied
            .saturating_sub(self.config.compact_margin)
            .max(trunc);
        let compact = if upto > trunc {
            Some((upto, self.node.store().term(upto)?))
        } else {
            None
        };
        let batch = Batch {
            keep: Some(snap),
            compact,
            ..Batch::default()
        };
        self.disk.write(&batch)?;
        self.node.mut_store().apply(&batch);
        tracing::debug!(applied, compacted_to = upto, "log compacted");
        Ok(())
    }

    /// Proposes `entry` (its id must be unique for this replica's origin);
    /// its id comes back from [`Store::take_committed`] once applied here,
    /// or from [`Replica::take_dropped`].
    pub fn propose_entry(&mut self, entry: &Entry) {
        let data: Bytes = match serde_json::to_vec(entry) {
            Ok(d) => d.into(),
            Err(e) => {
                tracing::error!(error = %e, "entry does not encode");
                self.dropped.push(entry.id);
                return;
            }
        };
        self.pending.insert(
            entry.id.0,
            Pending {
                data: data.clone(),
                ticks: 0,
                tries: 0,
            },
        );
        self.submit(data);
    }
}

impl<D: Disk, S: StateDb> Store for Replica<D, S> {
    fn propose(&mut self, entry: Entry) {
        self.propose_entry(&entry);
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn take_committed(&mut self) -> Vec<ProposalId> {
        std::mem::take(&mut self.committed)
    }
}

/// Forwards raft-rs's slog records to tracing.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statedb::NoStateDb;

    type R = Replica<MemDisk, NoStateDb>;

    /// Replicas over a lossless in-order network, stepped by hand.
    struct Net {
        nodes: BTreeMap<u64, R>,
        disks: BTreeMap<u64, MemDisk>,
        down: Vec<u64>,
        boot: u64,
        /// Outputs other than messages, per replica.
        events: BTreeMap<u64, Vec<Output>>,
    }

    fn cfg(id: u64) -> ReplicaConfig {
        ReplicaConfig {
            // Distinct fixed timeouts make the test deterministic.
            election_tick: 10 + id as usize * 3,
            max_election_tick: 11 + id as usize * 3,
            compact_after: 50,
            compact_margin: 5,
            ..ReplicaConfig::new(id)
        }
    }

    impl Net {
        fn new(n: u64) -> Net {
            let voters: Vec<u64> = (1..=n).collect();
            let mut net = Net {
                nodes: BTreeMap::new(),
                disks: BTreeMap::new(),
                down: vec![],
                boot: 0,
                events: BTreeMap::new(),
            };
            for id in 1..=n {
                let disk = MemDisk::new();
                net.disks.insert(id, disk.clone());
                net.boot += 1;
                let r = R::open(cfg(id), disk, NoStateDb, net.boot, &voters).unwrap();
                net.nodes.insert(id, r);
            }
            net
        }

        fn crash(&mut self, id: u64) {
            self.nodes.remove(&id);
            self.down.push(id);
        }

        fn restart(&mut self, id: u64) {
            self.boot += 1;
            let disk = self.disks[&id].clone();
            let r = R::open(cfg(id), disk, NoStateDb, self.boot, &[]).unwrap();
            self.nodes.insert(id, r);
            self.down.retain(|d| *d != id);
        }

        /// Processes every replica and delivers messages until quiet.
        fn settle(&mut self) {
            for _ in 0..1000 {
                let mut msgs = vec![];
                for r in self.nodes.values_mut() {
                    r.process().unwrap();
                    while let Some(o) = r.poll_output() {
                        match o {
                            Output::Send(m) => msgs.push(m),
                            o => self.events.entry(r.id()).or_default().push(o),
                        }
                    }
                }
                if msgs.is_empty() {
                    return;
                }
                for m in msgs {
                    if let Some(r) = self.nodes.get_mut(&m.to) {
                        r.step(m);
                    }
                }
            }
            panic!("network did not settle");
        }

        fn tick(&mut self, n: usize) {
            for _ in 0..n {
                for r in self.nodes.values_mut() {
                    r.tick();
                }
                self.settle();
            }
        }

        fn leader(&self) -> Option<u64> {
            self.nodes.values().find(|r| r.is_leader()).map(|r| r.id())
        }
    }

    fn reg(id: u64, user: u32) -> Entry {
        crate::state::test_register(id, &user.to_string(), 1)
    }

    #[test]
    fn three_replicas_elect_commit_and_match_commits_by_id() {
        let mut net = Net::new(3);
        net.tick(30);
        let leader = net.leader().expect("a leader");
        assert_eq!(leader, 1, "the shortest election timeout wins");
        // A follower's proposals are forwarded to the leader.
        let f = net.nodes.get_mut(&2).unwrap();
        f.propose(reg(7, 1000));
        f.propose(reg(8, 1001));
        net.settle();
        let f = net.nodes.get_mut(&2).unwrap();
        assert_eq!(f.take_committed(), vec![ProposalId(7), ProposalId(8)]);
        for r in net.nodes.values() {
            assert_eq!(r.state().binding_count(), 2, "replica {}", r.id());
        }
        // The leader saw them applied but they are not its proposals.
        assert!(net.nodes.get_mut(&1).unwrap().take_committed().is_empty());
    }

    #[test]
    fn leader_crash_elects_another_and_restart_catches_up_through_snapshot() {
        let mut net = Net::new(3);
        net.tick(30);
        assert_eq!(net.leader(), Some(1));
        net.crash(1);
        net.tick(40);
        let leader = net.leader().expect("a new leader");
        assert_ne!(leader, 1);
        // Enough commits to compact the log past what node 1 holds.
        for i in 0..120u64 {
            net.nodes
                .get_mut(&leader)
                .unwrap()
                .propose(reg(i + 1, 2000 + i as u32));
            net.settle();
        }
        assert_eq!(net.nodes[&leader].state().binding_count(), 120);
        assert!(net.disks[&leader].contents().trunc.0 > 0, "log compacted");
        net.restart(1);
        net.tick(5);
        assert_eq!(net.nodes[&1].state().binding_count(), 120);
        assert_eq!(
            net.nodes[&1].state().applied_index(),
            net.nodes[&leader].state().applied_index()
        );
    }

    #[test]
    fn lost_proposal_is_retried_and_applied_once() {
        let mut net = Net::new(3);
        net.tick(30);
        // Node 3 proposes while the leader is down: the proposal goes to the
        // dead leader and is lost; it is proposed again to the new leader.
        net.crash(1);
        let r3 = net.nodes.get_mut(&3).unwrap();
        r3.propose(reg(1, 3000));
        net.settle();
        net.tick(60);
        let r3 = net.nodes.get_mut(&3).unwrap();
        assert_eq!(r3.take_committed(), vec![ProposalId(1)]);
        assert_eq!(r3.pending_count(), 0);
        assert_eq!(r3.state().binding_count(), 1);
    }

    #[test]
    fn restart_replays_the_log_and_keeps_dedup() {
        let mut net = Net::new(3);
        net.tick(30);
        for i in 1..=10 {
            net.nodes
                .get_mut(&2)
                .unwrap()
                .propose(reg(i, 4000 + i as u32));
        }
        net.settle();
        net.tick(3);
        let before = net.nodes[&3].state().clone();
        net.crash(3);
        net.restart(3);
        net.tick(3);
        let mut after = net.nodes[&3].state().clone();
        after.track_dirty(true);
        let mut b = before;
        b.track_dirty(true);
        assert_eq!(after, b);
    }

    #[test]
    fn the_leader_sees_which_voters_went_silent() {
        let mut net = Net::new(3);
        net.tick(30);
        assert_eq!(net.leader(), Some(1));
        assert!(net.nodes[&1].silent_voters(20).is_empty());
        assert!(
            net.nodes[&2].silent_voters(0).is_empty(),
            "followers never tell"
        );
        net.crash(3);
        // Heard at most two ticks (one heartbeat) before the crash.
        net.tick(17);
        assert!(net.nodes[&1].silent_voters(20).is_empty());
        net.tick(3);
        assert_eq!(net.nodes[&1].silent_voters(20), vec![3]);
        net.restart(3);
        net.tick(3);
        assert!(net.nodes[&1].silent_voters(20).is_empty());
    }

    #[test]
    fn joint_consensus_replaces_a_voter_and_the_newcomer_gets_a_snapshot() {
        use raft::eraftpb::{ConfChangeSingle, ConfChangeType};
        let mut net = Net::new(3);
        net.tick(30);
        // Enough commits that the log is compacted: the newcomer needs a
        // snapshot, taken under the membership that includes it.
        for i in 0..80u64 {
            net.nodes
                .get_mut(&1)
                .unwrap()
                .propose(reg(i + 1, 5000 + i as u32));
            net.settle();
        }
        assert!(net.disks[&1].contents().trunc.0 > 0);
        let disk = MemDisk::new();
        net.disks.insert(4, disk.clone());
        net.nodes
            .insert(4, R::open(cfg(4), disk, NoStateDb, 99, &[]).unwrap());
        let change = |t: ConfChangeType, id: u64| {
            let mut c = ConfChangeSingle::default();
            c.set_change_type(t);
            c.node_id = id;
            c
        };
        let mut cc = ConfChangeV2::default();
        cc.set_changes(
            vec![
                change(ConfChangeType::AddNode, 4),
                change(ConfChangeType::RemoveNode, 3),
            ]
            .into(),
        );
        net.nodes
            .get_mut(&1)
            .unwrap()
            .propose_conf_change(cc, Bytes::new())
            .unwrap();
        net.tick(10);
        for id in [1, 2, 4] {
            let c = net.nodes[&id].conf();
            let mut v = c.voters.clone();
            v.sort_unstable();
            assert_eq!(v, vec![1, 2, 4], "replica {id}");
            assert!(c.voters_outgoing.is_empty(), "joint configuration left");
        }
        assert_eq!(net.nodes[&4].state().binding_count(), 80);
        // The removed replica no longer counts: 1, 2 and 4 commit alone.
        net.crash(3);
        net.nodes.get_mut(&4).unwrap().propose(reg(500, 6000));
        net.settle();
        assert_eq!(net.nodes[&1].state().binding_count(), 81);
    }

    #[test]
    fn read_index_is_served_after_commit() {
        let mut net = Net::new(3);
        net.tick(30);
        let r2 = net.nodes.get_mut(&2).unwrap();
        r2.read_index(42);
        net.settle();
        assert!(net.events[&2].contains(&Output::ReadReady(42)));
        let term = net.nodes[&1].role().1;
        assert!(net.events[&2].contains(&Output::Role { leader: 1, term }));
    }
}
