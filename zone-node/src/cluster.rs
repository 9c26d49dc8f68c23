//! The node's store: in memory alone, or the Raft replica with its peer
//! transport (DESIGN §7). The request loop of [`crate::driver`] owns it and
//! calls [`NodeStore::tick`], [`NodeStore::peer_event`] and
//! [`NodeStore::process`]; a witness runs only this ([`run_witness`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::ClusterConfig;
use crate::peer::{AdminReply, AdminRequest, Identity, PeerEvent, Peers};
use crate::replica::redb_disk::RedbDisk;
use crate::replica::statedb::SledStateDb;
use crate::replica::{Output, Replica, ReplicaConfig};
use crate::state::{Command, Entry, MemStore, MemberRecord, ProposalId, State, Store};

/// The replica as a node runs it.
pub type NodeReplica = Replica<RedbDisk, SledStateDb>;

/// The Raft side of a node: replica and transport.
#[derive(Debug)]
pub struct Raft {
    replica: NodeReplica,
    peers: Peers,
    leader: u64,
    /// This node as the replicated member table should list it.
    me: MemberRecord,
    /// Ticks of silence after which the leader reassigns a peer's calls.
    takeover_ticks: u64,
    /// Tick of the last member announcement.
    announced_at: Option<u64>,
    /// Tick of the last reassignment proposed per dead node.
    reassigned_at: BTreeMap<String, u64>,
    /// Operators waiting for their membership change to apply.
    admin_waiting: Vec<oneshot::Sender<AdminReply>>,
    /// Operators waiting for their entry to commit, by proposal id.
    admin_commits: HashMap<ProposalId, oneshot::Sender<AdminReply>>,
}

/// Ticks before an announcement or reassignment that has not taken effect
/// is proposed again.
const REPROPOSE_TICKS: u64 = 40;

impl Raft {
    /// Serves an operator's request: a membership change is answered when
    /// a change is applied here, a user change when its entry commits (or
    /// at once when refused).
    fn admin(
        &mut self,
        req: AdminRequest,
        reply: oneshot::Sender<AdminReply>,
        now_unix: u64,
        next_id: &mut u64,
    ) {
        let cmd = match req {
            AdminRequest::Members {
                add_voters,
                add_learners,
                remove,
                member,
            } => return self.change_members(&add_voters, &add_learners, &remove, member, reply),
            AdminRequest::PutUser { name, user } => Command::PutUser { name, user },
            AdminRequest::RemoveUser { name } => Command::RemoveUser { name },
        };
        let id = take_id(next_id);
        self.admin_commits.insert(id, reply);
        self.replica.propose(Entry {
            id,
            at_unix: now_unix,
            cmds: vec![cmd],
        });
    }

    fn change_members(
        &mut self,
        add_voters: &[u64],
        add_learners: &[u64],
        remove: &[u64],
        member: Option<Member>,
        reply: oneshot::Sender<AdminReply>,
    ) {
        use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
        let mut changes = vec![];
        let mut push = |t: ConfChangeType, id: u64| {
            let mut c = ConfChangeSingle::default();
            c.set_change_type(t);
            c.node_id = id;
            changes.push(c);
        };
        add_voters
            .iter()
            .for_each(|id| push(ConfChangeType::AddNode, *id));
        add_learners
            .iter()
            .for_each(|id| push(ConfChangeType::AddLearnerNode, *id));
        remove
            .iter()
            .for_each(|id| push(ConfChangeType::RemoveNode, *id));
        if changes.is_empty() {
            let _ = reply.send(AdminReply::Failed("no change asked".into()));
            return;
        }
        if let Some(m) = &member {
            self.peers.set_addr(m.id, m.addr);
        }
        let mut cc = ConfChangeV2::default();
        // More than one change: joint consensus, left automatically.
        cc.set_changes(changes.into());
        let context = member
            .as_ref()
            .and_then(|m| serde_json::to_vec(m).ok())
            .unwrap_or_default();
        match self.replica.propose_conf_change(cc, context.into()) {
            Ok(()) => self.admin_waiting.push(reply),
            Err(e) => {
                let _ = reply.send(AdminReply::Failed(e.to_string()));
            }
        }
    }

    /// Proposes this node's member record while the state lacks it, and
    /// learns the Raft addresses of the members the state lists.
    fn announce(&mut self, now_unix: u64, next_id: &mut u64) {
        if self.replica.ticks().is_multiple_of(20) {
            for (id, m) in self.replica.state().members() {
                if let Some(a) = m.raft_addr
                    && *id != self.replica.id()
                {
                    self.peers.set_addr(*id, a);
                }
            }
        }
        let id = self.replica.id();
        if self.replica.role().0 == 0 || self.replica.state().members().get(&id) == Some(&self.me) {
            return;
        }
        let t = self.replica.ticks();
        if self
            .announced_at
            .is_some_and(|a| t.saturating_sub(a) < REPROPOSE_TICKS)
        {
            return;
        }
        self.announced_at = Some(t);
        let entry = Entry {
            id: take_id(next_id),
            at_unix: now_unix,
            cmds: vec![Command::PutMember {
                raft_id: id,
                member: self.me.clone(),
            }],
        };
        self.replica.propose(entry);
    }

    /// On the leader: reassigns the calls of voters silent for
    /// `takeover_ticks` to the live switches (DESIGN §5).
    fn take_over(&mut self, now_unix: u64, next_id: &mut u64) {
        let silent = self.replica.silent_voters(self.takeover_ticks);
        if silent.is_empty() {
            return;
        }
        let members = self.replica.state().members();
        let dead: BTreeSet<String> = silent
            .iter()
            .filter_map(|id| members.get(id))
            .map(|m| m.name.clone())
            .collect();
        let live: BTreeSet<String> = members
            .iter()
            .filter(|(id, m)| !m.witness && !silent.contains(id))
            .map(|(_, m)| m.name.clone())
            .collect();
        let t = self.replica.ticks();
        let due: BTreeSet<String> = dead
            .into_iter()
            .filter(|n| {
                self.reassigned_at
                    .get(n)
                    .is_none_or(|a| t.saturating_sub(*a) >= REPROPOSE_TICKS)
            })
            .collect();
        let cmds = crate::takeover::plan(self.replica.state(), &due, &live);
        if cmds.is_empty() {
            return;
        }
        for n in due {
            self.reassigned_at.insert(n, t);
        }
        tracing::info!(calls = cmds.len(), silent = ?silent, "reassigning the calls of silent nodes");
        metrics::counter!(crate::metrics::CALLS_REASSIGNED).increment(cmds.len() as u64);
        let entry = Entry {
            id: take_id(next_id),
            at_unix: now_unix,
            cmds,
        };
        self.replica.propose(entry);
    }
}

/// Where a node's cores send their entries.
#[derive(Debug)]
pub enum NodeStore {
    /// A node alone: applied at once, kept in memory.
    Mem(Box<MemStore>),
    /// A replica of the region's Raft group.
    Raft(Box<Raft>),
}

/// What [`NodeStore::process`] reports to the request loop.
#[derive(Debug, Default)]
pub struct Progress {
    /// Own proposals committed (and applied) since the last call.
    pub committed: Vec<ProposalId>,
    /// Own proposals given up after their retries.
    pub dropped: Vec<ProposalId>,
}

impl NodeStore {
    /// Opens the Raft replica under `data_dir` and starts its transport.
    pub fn open_raft(
        cfg: &ClusterConfig,
        me: MemberRecord,
        data_dir: &std::path::Path,
        boot: u64,
    ) -> Result<(NodeStore, mpsc::Receiver<PeerEvent>)> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        let identity = Identity {
            ca_pem: read(&cfg.ca)?,
            cert_pem: read(&cfg.cert)?,
            key_pem: read(&cfg.key)?,
        };
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let disk = RedbDisk::open(&data_dir.join("raft.redb"))?;
        let statedb = SledStateDb::open(&data_dir.join("state.sled"))?;
        let replica = Replica::open(
            ReplicaConfig::new(cfg.raft_id),
            disk,
            statedb,
            boot,
            &cfg.bootstrap,
        )?;
        let addrs: HashMap<u64, _> = cfg.peers.iter().map(|p| (p.id, p.addr)).collect();
        let (peers, events) = Peers::start(cfg.listen, &identity, addrs)?;
        tracing::info!(
            raft_id = cfg.raft_id,
            listen = %cfg.listen,
            applied = replica.state().applied_index(),
            "raft replica open"
        );
        Ok((
            NodeStore::Raft(Box::new(Raft {
                replica,
                peers,
                leader: 0,
                me,
                takeover_ticks: (cfg.takeover_after_ms / cfg.tick_ms).max(1),
                announced_at: None,
                reassigned_at: BTreeMap::new(),
                admin_waiting: vec![],
                admin_commits: HashMap::new(),
            })),
            events,
        ))
    }

    /// One Raft tick (no-op in memory): retries, the member announcement,
    /// and on the leader the takeover of silent nodes' calls. Proposals take
    /// their ids from `next_id`, the node's one counter (ids of one origin
    /// must come from one sequence for de-duplication, see
    /// [`crate::state::DEDUP_WINDOW`]).
    pub fn tick(&mut self, now_unix: u64, next_id: &mut u64) {
        if let NodeStore::Raft(r) = self {
            r.replica.tick();
            r.announce(now_unix, next_id);
            r.take_over(now_unix, next_id);
        }
    }

    /// Calls the replicated state lists as owned by `name`.
    pub fn owned_calls(&self, name: &str) -> usize {
        self.state().calls().filter(|c| c.owner == name).count()
    }

    /// Feeds what the transport received; an operator's request that needs
    /// a proposal numbers it from `next_id`.
    pub fn peer_event(&mut self, ev: PeerEvent, next_id: &mut u64) {
        if let NodeStore::Raft(r) = self {
            match ev {
                PeerEvent::Message(m) => r.replica.step(*m),
                PeerEvent::Unreachable(id) => r.replica.report_unreachable(id),
                PeerEvent::Snapshot(id, ok) => r.replica.report_snapshot(id, ok),
                PeerEvent::Admin(req, reply) => {
                    r.admin(req, reply, crate::driver::unix_now(), next_id)
                }
            }
        }
    }

    /// Housekeeping of expired bindings: in memory they are dropped at once;
    /// a replicated leader proposes [`Command::Expire`] so every replica
    /// drops the same ones. `id` numbers that proposal.
    pub fn expire(&mut self, now_unix: u64, id: ProposalId) {
        match self {
            NodeStore::Mem(m) => {
                m.expire(now_unix);
            }
            NodeStore::Raft(r) => {
                if r.replica.is_leader() && r.replica.state().has_expired(now_unix) {
                    r.replica.propose(Entry {
                        id,
                        at_unix: now_unix,
                        cmds: vec![Command::Expire { now_unix }],
                    });
                }
            }
        }
    }

    /// Runs the Ready loop and sends what it produced; returns the commits
    /// of own proposals. An error means the replica cannot persist: the
    /// node must stop.
    pub fn process(&mut self) -> Result<Progress> {
        match self {
            NodeStore::Mem(m) => Ok(Progress {
                committed: m.take_committed(),
                dropped: vec![],
            }),
            NodeStore::Raft(r) => {
                r.replica.process()?;
                while let Some(o) = r.replica.poll_output() {
                    match o {
                        Output::Send(msg) => r.peers.send(msg),
                        Output::Role { leader, term } => {
                            if leader != r.leader {
                                tracing::info!(leader, term, "raft leader");
                                r.leader = leader;
                            }
                            metrics::gauge!(crate::metrics::RAFT_TERM).set(term as f64);
                            metrics::gauge!(crate::metrics::RAFT_IS_LEADER)
                                .set(f64::from(u8::from(leader == r.replica.id())));
                        }
                        Output::ConfChanged { conf, context } => {
                            if let Ok(m) = serde_json::from_slice::<Member>(&context) {
                                r.peers.set_addr(m.id, m.addr);
                            }
                            tracing::info!(voters = ?conf.voters, learners = ?conf.learners, "membership");
                            for w in r.admin_waiting.drain(..) {
                                let _ = w.send(AdminReply::Done {
                                    voters: conf.voters.clone(),
                                    learners: conf.learners.clone(),
                                });
                            }
                        }
                        Output::ReadReady(_) | Output::ReadFailed(_) => {}
                    }
                }
                let committed = r.replica.take_committed();
                let dropped = r.replica.take_dropped();
                for id in &committed {
                    if let Some(w) = r.admin_commits.remove(id) {
                        let _ = w.send(AdminReply::Committed);
                    }
                }
                for id in &dropped {
                    if let Some(w) = r.admin_commits.remove(id) {
                        let _ = w.send(AdminReply::Failed("not committed".into()));
                    }
                }
                Ok(Progress { committed, dropped })
            }
        }
    }

    /// Closes the transport.
    pub fn close(&self) {
        if let NodeStore::Raft(r) = self {
            r.peers.close();
        }
    }
}

/// The next id of the node's proposal counter.
fn take_id(next_id: &mut u64) -> ProposalId {
    let id = ProposalId(*next_id);
    *next_id += 1;
    id
}

/// A member as a membership change announces it (the change's context).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// Raft id.
    pub id: u64,
    /// QUIC listener.
    pub addr: std::net::SocketAddr,
    /// Zone label.
    pub zone: String,
}

impl Store for NodeStore {
    fn propose(&mut self, entry: Entry) {
        match self {
            NodeStore::Mem(m) => m.propose(entry),
            NodeStore::Raft(r) => r.replica.propose(entry),
        }
    }

    fn state(&self) -> &State {
        match self {
            NodeStore::Mem(m) => m.state(),
            NodeStore::Raft(r) => r.replica.state(),
        }
    }

    fn take_committed(&mut self) -> Vec<ProposalId> {
        match self {
            NodeStore::Mem(m) => m.take_committed(),
            NodeStore::Raft(r) => r.replica.take_committed(),
        }
    }
}

/// The loop of a witness: a Raft voter with storage and no SIP. Returns
/// when `stop` changes, or with the error that made the replica unusable.
pub async fn run_witness(
    store: NodeStore,
    events: mpsc::Receiver<PeerEvent>,
    tick: Duration,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    run_replica(store, events, tick, stop, None).await
}

/// Entries proposed to [`run_replica`] from outside, and where their
/// commits are reported (the Raft benchmark drives a replica this way).
#[derive(Debug)]
pub struct Proposals {
    /// Entries to propose (their ids are replaced by the loop's own).
    pub entries: mpsc::Receiver<Entry>,
    /// `(id given by the caller, id used)`: sent once per entry as it is
    /// proposed, so the caller can match commits.
    pub numbered: mpsc::UnboundedSender<(ProposalId, ProposalId)>,
    /// Ids of committed entries.
    pub committed: mpsc::UnboundedSender<ProposalId>,
}

fn propose_outside(store: &mut NodeStore, mut e: Entry, p: &Option<Proposals>, next_id: &mut u64) {
    let asked = e.id;
    e.id = take_id(next_id);
    if let Some(p) = p {
        let _ = p.numbered.send((asked, e.id));
    }
    store.propose(e);
}

/// A replica's loop without SIP: ticks, peer messages, optional outside
/// proposals, one Ready per batch of queued inputs.
pub async fn run_replica(
    mut store: NodeStore,
    mut events: mpsc::Receiver<PeerEvent>,
    tick: Duration,
    mut stop: watch::Receiver<bool>,
    mut proposals: Option<Proposals>,
) -> Result<()> {
    let mut ticker = tokio::time::interval(tick);
    let mut next_id = 1;
    let mut expire = tokio::time::interval(Duration::from_secs(10));
    loop {
        let outside = async {
            match proposals.as_mut() {
                Some(p) => p.entries.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticker.tick() => store.tick(crate::driver::unix_now(), &mut next_id),
            ev = events.recv() => match ev {
                Some(ev) => store.peer_event(ev, &mut next_id),
                None => break,
            },
            e = outside => match e {
                Some(e) => propose_outside(&mut store, e, &proposals, &mut next_id),
                None => proposals = None,
            },
            _ = expire.tick() => {
                store.expire(crate::driver::unix_now(), take_id(&mut next_id));
            }
            _ = stop.changed() => break,
        }
        // One Ready for everything already queued.
        for _ in 0..512 {
            let mut more = false;
            if let Ok(ev) = events.try_recv() {
                store.peer_event(ev, &mut next_id);
                more = true;
            }
            if let Some(e) = proposals.as_mut().and_then(|p| p.entries.try_recv().ok()) {
                propose_outside(&mut store, e, &proposals, &mut next_id);
                more = true;
            }
            if !more {
                break;
            }
        }
        let progress = store.process()?;
        if let Some(p) = &proposals {
            for id in progress.committed {
                let _ = p.committed.send(id);
            }
        }
    }
    store.close();
    Ok(())
}
