//! One simulated region: the nodes (replica, and registrar unless witness),
//! the devices, the network, the fault schedule drawn from the seed, and the
//! invariant checks run after every step.
//!
//! A step, in order:
//!
//! ```text
//!   (tick boundary) inject faults ─▶ tick every replica ─▶ time out devices
//!   deliver due messages (random order) ─▶ devices send REGISTERs
//!   per node: process() ─▶ messages onto the wire ─▶ commits ─▶ 200s ─▶ drops
//!   check invariants (leaders, applied states, acknowledged bindings)
//!   (after the fault phase, tick boundary) converged? ─▶ done / keep healing
//! ```

use std::collections::{BTreeMap, VecDeque};

use raft::eraftpb::MessageType;
use sip::auth::NonceKey;
use zone_node::directory::Directory;
use zone_node::registrar::{Outcome, Pending, Registrar, RegistrarConfig};
use zone_node::replica::{MemDisk, Output, Replica, ReplicaConfig};
use zone_node::state::{ProposalId, State, Store};

use crate::device::{Acked, Busy, Device, EXPIRES, REALM};
use crate::net::{Faults, Net};
use crate::rng::SimRng;
use crate::statedb::SimStateDb;
use crate::{Failure, LostBinding, Report, STEPS_PER_TICK, SimConfig, Violation};

type R = Replica<MemDisk, SimStateDb>;

/// Unix second of step 0.
const T0: u64 = 1_700_000_000;
/// Raft ticks per second (50 ms ticks, DESIGN §7).
const TICKS_PER_SEC: u64 = 20;
/// Events kept for a failure report.
const EVENTS_KEPT: usize = 60;
/// Ticks a device waits for the answer to a REGISTER before giving up.
const DEVICE_TIMEOUT_TICKS: u64 = 200;
/// Log entries before a replica compacts behind a snapshot: small, so that
/// restarts and lagging followers go through snapshots.
const COMPACT_AFTER: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zone {
    A,
    B,
    Witness,
}

/// A REGISTER proposed by a node's registrar, waiting for its commit.
#[derive(Debug)]
struct Waiting {
    pending: Pending,
    device: usize,
    cseq: u32,
    register: bool,
    at_unix: u64,
}

/// A running node.
struct Up {
    replica: R,
    registrar: Option<Registrar>,
    waiting: BTreeMap<ProposalId, Waiting>,
    /// Applied index at the last check.
    applied: u64,
    /// Acknowledgement epoch at the last check.
    epoch: u64,
    /// The election timeout of this boot, in ticks.
    election: u64,
}

struct Node {
    name: String,
    id: u64,
    zone: Zone,
    disk: MemDisk,
    /// The applied state on disk; `None`: the node keeps none and rebuilds
    /// its state from the snapshot and the log at each start.
    statedb: Option<SimStateDb>,
    up: Option<Up>,
    down_since: u64,
}

/// The fault mix of one seed.
#[derive(Debug, Clone)]
struct Profile {
    net: Faults,
    crash_ppm: u32,
    restart_ppm: u32,
    min_down_ticks: u64,
    max_down: usize,
    partition_ppm: u32,
    heal_ppm: u32,
    interval_ticks: u64,
    unregister_ppm: u32,
}

impl Profile {
    fn draw(rng: &mut SimRng, faults: bool) -> Profile {
        let mut pick = |xs: &[u64]| *rng.pick(xs).expect("non-empty choice");
        let interval_ticks = pick(&[20, 40, 80]);
        if !faults {
            return Profile {
                net: Faults::NONE,
                crash_ppm: 0,
                restart_ppm: 0,
                min_down_ticks: 0,
                max_down: 0,
                partition_ppm: 0,
                heal_ppm: 0,
                interval_ticks,
                unregister_ppm: 0,
            };
        }
        let net = Faults {
            loss_ppm: pick(&[0, 5_000, 30_000, 100_000, 250_000]) as u32,
            dup_ppm: pick(&[0, 10_000, 50_000]) as u32,
            max_delay: pick(&[1, 2, 4, 8]),
            spike_ppm: pick(&[0, 5_000, 20_000]) as u32,
            spike_delay: 10 * STEPS_PER_TICK,
        };
        Profile {
            net,
            crash_ppm: pick(&[0, 2_000, 5_000, 10_000]) as u32,
            restart_ppm: pick(&[20_000, 50_000]) as u32,
            min_down_ticks: 20,
            max_down: pick(&[1, 2]) as usize,
            partition_ppm: pick(&[0, 2_000, 5_000, 10_000]) as u32,
            heal_ppm: pick(&[10_000, 30_000]) as u32,
            interval_ticks,
            unregister_ppm: 50_000,
        }
    }
}

struct Sim<'c> {
    seed: u64,
    cfg: &'c SimConfig,
    profile: Profile,
    rng: SimRng,
    step: u64,
    nodes: Vec<Node>,
    devices: Vec<Device>,
    net: Net,
    directory: Directory,
    nonce_key: NonceKey,
    /// Leader of each term seen.
    leaders: BTreeMap<u64, usize>,
    max_leader_term: u64,
    /// The state first seen at each applied index (and who had it), from
    /// the lowest index a live replica is at.
    states: BTreeMap<u64, (usize, State)>,
    /// Highest index an acknowledgement was made at.
    max_ack_index: u64,
    /// Bumped at each new acknowledgement, so replicas are checked again.
    ack_epoch: u64,
    events: VecDeque<String>,
    report: Report,
}

/// Runs seed `seed`: the fault phase, then healing until the region
/// converges. `Err` is the first invariant broken.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Report, Box<Failure>> {
    let mut sim = Sim::new(seed, cfg);
    match sim.run() {
        Ok(()) => Ok(sim.finish()),
        Err(violation) => Err(Box::new(Failure {
            seed,
            step: sim.step,
            violation,
            config: cfg.clone(),
            events: sim.events.into_iter().collect(),
        })),
    }
}

fn push_event(events: &mut VecDeque<String>, step: u64, what: String) {
    if events.len() == EVENTS_KEPT {
        events.pop_front();
    }
    events.push_back(format!("{step}: {what}"));
}

/// States equal as replicated data (the dirty-key tracking is local).
fn same_state(a: &State, b: &State) -> bool {
    if a == b {
        return true;
    }
    let (mut x, mut y) = (a.clone(), b.clone());
    x.track_dirty(false);
    y.track_dirty(false);
    x == y
}

fn last_index(disk: &MemDisk) -> u64 {
    let p = disk.contents();
    p.entries.last().map_or(p.trunc.0, |e| e.index)
}

impl<'c> Sim<'c> {
    fn new(seed: u64, cfg: &'c SimConfig) -> Sim<'c> {
        let mut rng = SimRng::new(seed);
        let profile = Profile::draw(&mut rng, cfg.faults);
        let mut nodes = Vec::new();
        let mut id = 0;
        for (zone, prefix, n) in [
            (Zone::A, "a", cfg.zone_size),
            (Zone::B, "b", cfg.zone_size),
            (Zone::Witness, "w", 1),
        ] {
            for k in 1..=n {
                id += 1;
                let name = if zone == Zone::Witness {
                    prefix.to_owned()
                } else {
                    format!("{prefix}{k}")
                };
                nodes.push(Node {
                    name,
                    id,
                    zone,
                    disk: MemDisk::new(),
                    statedb: rng.chance(500_000).then(SimStateDb::new),
                    up: None,
                    down_since: 0,
                });
            }
        }
        let users: Vec<String> = (0..cfg.users.max(1))
            .map(|u| format!("u{}", 1000 + u))
            .collect();
        let mut directory = Directory::new();
        for u in &users {
            directory.add_with_password(u, REALM, &crate::device::password(u));
        }
        let first = profile.interval_ticks * STEPS_PER_TICK;
        let devices = (0..cfg.devices)
            .map(|n| {
                let mut d = Device::new(n, &users[n % users.len()]);
                d.next_at = 30 * STEPS_PER_TICK + rng.below(first);
                d
            })
            .collect();
        let net = Net::new(profile.net);
        Sim {
            seed,
            cfg,
            profile,
            rng,
            step: 0,
            nodes,
            devices,
            net,
            directory,
            nonce_key: NonceKey::new(b"the simulated region's cluster secret")
                .expect("a non-empty secret is a valid nonce key"),
            leaders: BTreeMap::new(),
            max_leader_term: 0,
            states: BTreeMap::new(),
            max_ack_index: 0,
            ack_epoch: 0,
            events: VecDeque::new(),
            report: Report::default(),
        }
    }

    fn event(&mut self, what: String) {
        push_event(&mut self.events, self.step, what);
    }

    fn now_unix(&self) -> u64 {
        T0 + self.step / (STEPS_PER_TICK * TICKS_PER_SEC)
    }

    fn tick(&self) -> u64 {
        self.step / STEPS_PER_TICK
    }

    fn finish(self) -> Report {
        let applied = self
            .nodes
            .iter()
            .filter_map(|n| n.up.as_ref())
            .map(|u| u.replica.state().applied_index())
            .max()
            .unwrap_or(0);
        Report {
            seed: self.seed,
            steps: self.step,
            applied,
            leaders: self.leaders.len() as u64,
            net: self.net.stats(),
            ..self.report
        }
    }

    fn run(&mut self) -> Result<(), Violation> {
        self.start()?;
        while !self.step_once()? {}
        Ok(())
    }

    /// Starts every node, bootstrapping the region.
    fn start(&mut self) -> Result<(), Violation> {
        let voters: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        for i in 0..self.nodes.len() {
            self.boot(i, &voters)?;
        }
        self.event(format!("profile {:?}", self.profile));
        Ok(())
    }

    /// Simulates one step; true once the region has converged after the
    /// fault phase.
    fn step_once(&mut self) -> Result<bool, Violation> {
        let fault_end = self.cfg.ticks * STEPS_PER_TICK;
        let deadline = fault_end + self.cfg.heal_ticks * STEPS_PER_TICK;
        let on_tick = self.step.is_multiple_of(STEPS_PER_TICK);
        if self.step == fault_end {
            self.stop_faults()?;
        }
        if on_tick {
            if self.step < fault_end && self.cfg.faults {
                self.inject()?;
            }
            for n in &mut self.nodes {
                if let Some(up) = n.up.as_mut() {
                    up.replica.tick();
                }
                // sled flushes in the background, now and then.
                if let Some(db) = &n.statedb
                    && self.rng.chance(100_000)
                {
                    db.flush();
                }
            }
            self.time_out_devices();
        }
        self.deliver();
        if self.step < fault_end {
            self.workload();
        }
        for i in 0..self.nodes.len() {
            self.drain(i)?;
        }
        self.check()?;
        if self.step >= fault_end && on_tick {
            match self.unconverged() {
                None => {
                    self.report.heal_ticks = (self.step - fault_end) / STEPS_PER_TICK;
                    return Ok(true);
                }
                Some(detail) if self.step >= deadline => {
                    return Err(Violation::NotLive {
                        ticks: self.cfg.heal_ticks,
                        detail,
                    });
                }
                Some(_) => {}
            }
        }
        self.step += 1;
        Ok(false)
    }

    /// Opens node `i`'s replica over its disk (bootstrapping with `voters`
    /// on the first start only) and a fresh registrar.
    fn boot(&mut self, i: usize, voters: &[u64]) -> Result<(), Violation> {
        // raft-rs draws the election timeout in [min, max): one value, ours,
        // fixed for the whole boot. Unlike raft-rs's own draw, it is not
        // drawn again at each election, so two nodes with the same value
        // that start elections together would split the vote for ever (seed
        // 901 did, 600 ticks after healing): draw one no live node has.
        let taken: Vec<u64> = self
            .nodes
            .iter()
            .filter_map(|n| n.up.as_ref().map(|u| u.election))
            .collect();
        let top = 10 + self.nodes.len().max(10) as u64;
        let free: Vec<u64> = (10..=top).filter(|e| !taken.contains(e)).collect();
        let e = *self
            .rng
            .pick(&free)
            .expect("more timeouts in the range than nodes") as usize;
        let node = &self.nodes[i];
        let config = ReplicaConfig {
            election_tick: e,
            max_election_tick: e + 1,
            compact_after: COMPACT_AFTER,
            compact_margin: COMPACT_AFTER / 4,
            ..ReplicaConfig::new(node.id)
        };
        let boot_nonce = self.rng.next_u64();
        // Without a state database, a fresh empty one at each start.
        let statedb = node.statedb.clone().unwrap_or_default();
        let replica =
            R::open(config, node.disk.clone(), statedb, boot_nonce, voters).map_err(|e| {
                Violation::Replica {
                    node: node.name.clone(),
                    error: e.to_string(),
                }
            })?;
        let registrar = (node.zone != Zone::Witness).then(|| {
            Registrar::new(
                RegistrarConfig::new(REALM, node.name.clone()),
                self.directory.clone(),
                self.nonce_key.clone(),
            )
        });
        let applied = replica.state().applied_index();
        let what = format!(
            "{} {} (election {e} ticks, applied {applied})",
            if voters.is_empty() {
                "restart"
            } else {
                "start"
            },
            node.name
        );
        self.nodes[i].up = Some(Up {
            replica,
            registrar,
            waiting: BTreeMap::new(),
            applied,
            epoch: u64::MAX,
            election: e as u64,
        });
        self.event(what);
        Ok(())
    }

    fn crash(&mut self, i: usize) {
        let tick = self.tick();
        let n = &mut self.nodes[i];
        n.up = None;
        n.down_since = tick;
        let lost = n.statedb.as_ref().map_or(0, |db| db.crash(&mut self.rng));
        self.report.crashes += 1;
        let what = format!(
            "crash {} ({lost} unsynced state writes lost)",
            self.nodes[i].name
        );
        self.event(what);
    }

    /// One tick's worth of faults: crashes, restarts, partitions, heals.
    fn inject(&mut self) -> Result<(), Violation> {
        let tick = self.tick();
        let down = self.nodes.iter().filter(|n| n.up.is_none()).count();
        if down < self.profile.max_down && self.rng.chance(self.profile.crash_ppm) {
            let up: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].up.is_some())
                .collect();
            if let Some(&i) = self.rng.pick(&up) {
                self.crash(i);
            }
        }
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if n.up.is_none()
                && tick >= n.down_since + self.profile.min_down_ticks
                && self.rng.chance(self.profile.restart_ppm)
            {
                self.boot(i, &[])?;
            }
        }
        if self.net.is_partitioned() {
            if self.rng.chance(self.profile.heal_ppm) {
                self.net.heal();
                self.event("heal the network".into());
            }
        } else if self.rng.chance(self.profile.partition_ppm) {
            self.partition();
        }
        Ok(())
    }

    fn partition(&mut self) {
        let ids = |z: Zone| -> Vec<u64> {
            self.nodes
                .iter()
                .filter(|n| n.zone == z)
                .map(|n| n.id)
                .collect()
        };
        let (a, b, w) = (ids(Zone::A), ids(Zone::B), ids(Zone::Witness));
        let all: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        let rest = |cut: &[u64]| -> Vec<u64> {
            all.iter().copied().filter(|x| !cut.contains(x)).collect()
        };
        let name = |id: u64| {
            self.nodes
                .iter()
                .find(|n| n.id == id)
                .map_or("?".to_owned(), |n| n.name.clone())
        };
        let names = |ids: &[u64]| ids.iter().map(|&i| name(i)).collect::<Vec<_>>().join(",");
        let leader = self
            .nodes
            .iter()
            .find(|n| n.up.as_ref().is_some_and(|u| u.replica.is_leader()))
            .map(|n| n.id);
        let (side, what) = match self.rng.below(7) {
            0 => (
                a.clone(),
                "zone A cut from zone B and the witness".to_owned(),
            ),
            1 => (
                b.clone(),
                "zone B cut from zone A and the witness".to_owned(),
            ),
            2 => {
                self.net.partition(&a, &b);
                self.report.partitions += 1;
                let what = "zones A and B cut from each other, both reach the witness";
                self.event(what.into());
                return;
            }
            3 => {
                let x = *self.rng.pick(&all).expect("the region has nodes");
                (vec![x], format!("{} isolated", name(x)))
            }
            4 => {
                let x = leader.unwrap_or(w[0]);
                (vec![x], format!("leader {} isolated", name(x)))
            }
            5 => {
                let mut s = all.clone();
                self.rng.shuffle(&mut s);
                s.truncate(self.rng.between(1, (all.len() / 2) as u64) as usize);
                let what = format!("minority {} cut off", names(&s));
                (s, what)
            }
            _ => {
                let mut cuts = Vec::new();
                for _ in 0..self.rng.between(1, 3) {
                    let from = *self.rng.pick(&all).expect("the region has nodes");
                    let to = *self.rng.pick(&all).expect("the region has nodes");
                    if from != to {
                        self.net.cut_one_way(from, to);
                        cuts.push(format!("{}->{}", name(from), name(to)));
                    }
                }
                self.report.partitions += 1;
                let what = format!("one-way cuts {}", cuts.join(" "));
                self.event(what);
                return;
            }
        };
        let other = rest(&side);
        self.net.partition(&side, &other);
        self.report.partitions += 1;
        self.event(what);
    }

    /// The end of the fault phase: every link back, a clean network, every
    /// node started.
    fn stop_faults(&mut self) -> Result<(), Violation> {
        self.net.heal();
        self.net.set_faults(Faults::NONE);
        self.event("faults stop: network healed and clean".into());
        for i in 0..self.nodes.len() {
            if self.nodes[i].up.is_none() {
                self.boot(i, &[])?;
            }
        }
        Ok(())
    }

    fn time_out_devices(&mut self) {
        let limit = DEVICE_TIMEOUT_TICKS * STEPS_PER_TICK;
        for d in &mut self.devices {
            if d.busy.is_some_and(|b| self.step - b.since > limit) {
                d.busy = None;
                d.next_at = self.step + STEPS_PER_TICK * self.rng.between(1, 10);
                self.report.timeouts += 1;
            }
        }
    }

    fn deliver(&mut self) {
        let nodes = &self.nodes;
        let live = |id: u64| nodes.iter().any(|n| n.id == id && n.up.is_some());
        let msgs = self.net.due(self.step, &mut self.rng, live);
        for m in msgs {
            let (from, to) = (m.from, m.to);
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            if let Some(up) = self
                .nodes
                .iter_mut()
                .find(|n| n.id == to)
                .and_then(|n| n.up.as_mut())
            {
                up.replica.step(m);
            }
            if snapshot && let Some(s) = self.up_by_id(from) {
                s.replica.report_snapshot(to, true);
            }
        }
        for (from, to) in self.net.take_failed_snapshots() {
            if let Some(s) = self.up_by_id(from) {
                s.replica.report_snapshot(to, false);
            }
        }
    }

    fn up_by_id(&mut self, id: u64) -> Option<&mut Up> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .and_then(|n| n.up.as_mut())
    }

    /// Idle devices whose time has come send a REGISTER (challenge, then
    /// credentials) to a random live node with a registrar.
    fn workload(&mut self) {
        let now = self.now_unix();
        let serving: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i]
                    .up
                    .as_ref()
                    .is_some_and(|u| u.registrar.is_some())
            })
            .collect();
        let interval = self.profile.interval_ticks;
        for d in 0..self.devices.len() {
            let dev = &mut self.devices[d];
            if dev.busy.is_some() || dev.next_at > self.step {
                continue;
            }
            let next =
                self.step + STEPS_PER_TICK * self.rng.between(interval / 2, interval * 3 / 2);
            let Some(&i) = self.rng.pick(&serving) else {
                dev.next_at = next;
                continue;
            };
            let up = self.nodes[i].up.as_mut().expect("serving nodes are up");
            let registrar = up
                .registrar
                .as_mut()
                .expect("serving nodes have a registrar");
            let register = !self.rng.chance(self.profile.unregister_ppm);
            let expires = if register { EXPIRES } else { 0 };
            let req = dev.register(expires, None);
            let random = self.rng.next_u64().to_be_bytes();
            let challenge =
                match registrar.handle(now, random, dev.src, "UDP", &req, up.replica.state()) {
                    Outcome::Respond(r) if r.status() == Some(401) => {
                        Device::pick_challenge(&r, &mut self.rng)
                    }
                    _ => None,
                };
            let Some(ch) = challenge else {
                self.report.refused += 1;
                dev.next_at = next;
                continue;
            };
            let req = dev.register(expires, Some(&ch));
            let random = self.rng.next_u64().to_be_bytes();
            match registrar.handle(now, random, dev.src, "UDP", &req, up.replica.state()) {
                Outcome::Propose { entry, pending } => {
                    let id = entry.id;
                    up.replica.propose(entry);
                    if !register {
                        // The removal may commit without an answer: from
                        // here on the device's binding may rightly go.
                        dev.acked = None;
                        dev.unregistered_at = dev.cseq;
                    }
                    up.waiting.insert(
                        id,
                        Waiting {
                            pending,
                            device: d,
                            cseq: dev.cseq,
                            register,
                            at_unix: now,
                        },
                    );
                    dev.busy = Some(Busy {
                        node: i,
                        cseq: dev.cseq,
                        since: self.step,
                    });
                    self.report.proposed += 1;
                }
                Outcome::Respond(_) => {
                    self.report.refused += 1;
                    dev.next_at = next;
                }
            }
        }
    }

    /// Runs node `i`'s Ready loop and handles what comes out: messages onto
    /// the wire, 200s for committed proposals, failures for dropped ones.
    fn drain(&mut self, i: usize) -> Result<(), Violation> {
        let step = self.step;
        let interval = self.profile.interval_ticks;
        let Sim {
            nodes,
            net,
            rng,
            devices,
            report,
            events,
            ..
        } = self;
        let node = &mut nodes[i];
        let Some(up) = node.up.as_mut() else {
            return Ok(());
        };
        up.replica.process().map_err(|e| Violation::Replica {
            node: node.name.clone(),
            error: e.to_string(),
        })?;
        while let Some(o) = up.replica.poll_output() {
            if let Output::Send(m) = o {
                net.send(step, m, rng);
            }
        }
        for id in up.replica.take_committed() {
            let (Some(w), Some(registrar)) = (up.waiting.remove(&id), up.registrar.as_mut()) else {
                return Err(Violation::UnknownCommit {
                    node: node.name.clone(),
                    id: id.0,
                });
            };
            let resp = registrar.committed(w.pending, up.replica.state());
            report.acked += 1;
            let dev = &mut devices[w.device];
            if dev.busy.is_some_and(|b| b.node == i && b.cseq == w.cseq) {
                dev.busy = None;
                dev.next_at = step + STEPS_PER_TICK * rng.between(interval / 2, interval * 3 / 2);
            }
            // A removal sent after this REGISTER may have overtaken it.
            if !w.register || w.cseq <= dev.unregistered_at {
                continue;
            }
            if resp.status() != Some(200) || !dev.listed_in(&resp) {
                return Err(Violation::BadAnswer {
                    node: node.name.clone(),
                    contact: dev.contact.clone(),
                    detail: format!(
                        "{:?} {:?}",
                        resp.status(),
                        resp.values(sip::msg::HeaderName::Contact)
                            .collect::<Vec<_>>()
                    ),
                });
            }
            if dev.acked.is_none_or(|a| a.cseq < w.cseq) {
                let index = up.replica.state().applied_index();
                dev.acked = Some(Acked {
                    cseq: w.cseq,
                    index,
                    expires_at: w.at_unix + u64::from(EXPIRES),
                    node: i,
                    step,
                });
                self.max_ack_index = self.max_ack_index.max(index);
                self.ack_epoch += 1;
            }
        }
        for id in up.replica.take_dropped() {
            if let Some(w) = up.waiting.remove(&id) {
                report.dropped += 1;
                if self.cfg.danger_ack_dropped && w.register {
                    let dev = &mut devices[w.device];
                    dev.acked = Some(Acked {
                        cseq: w.cseq,
                        index: up.replica.state().applied_index(),
                        expires_at: w.at_unix + u64::from(EXPIRES),
                        node: i,
                        step,
                    });
                    self.ack_epoch += 1;
                }
                let dev = &mut devices[w.device];
                if dev.busy.is_some_and(|b| b.node == i && b.cseq == w.cseq) {
                    dev.busy = None;
                    dev.next_at = step + STEPS_PER_TICK * rng.between(1, 10);
                }
                push_event(events, step, format!("{} dropped proposal {id}", node.name));
            }
        }
        Ok(())
    }

    /// The invariants, after every step.
    fn check(&mut self) -> Result<(), Violation> {
        self.check_leaders()?;
        let now = self.now_unix();
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            let Some(up) = node.up.as_ref() else {
                continue;
            };
            let state = up.replica.state();
            let applied = state.applied_index();
            if applied < up.applied {
                return Err(Violation::AppliedBackwards {
                    node: node.name.clone(),
                    from: up.applied,
                    to: applied,
                });
            }
            if applied == up.applied && up.epoch == self.ack_epoch {
                continue;
            }
            // (3) the same applied index, the same state.
            match self.states.get(&applied) {
                Some((j, s)) if !same_state(s, state) => {
                    return Err(Violation::Diverged {
                        index: applied,
                        first: self.nodes[*j].name.clone(),
                        node: node.name.clone(),
                        detail: format!(
                            "bindings {} vs {}, calls {} vs {}",
                            s.binding_count(),
                            state.binding_count(),
                            s.call_count(),
                            state.call_count()
                        ),
                    });
                }
                Some(_) => {}
                None => {
                    let mut copy = state.clone();
                    copy.track_dirty(true);
                    self.states.insert(applied, (i, copy));
                }
            }
            // (1) every acknowledged binding at or below the applied index.
            for dev in &self.devices {
                let Some(a) = dev.acked else { continue };
                if a.index > applied || a.expires_at <= now {
                    continue;
                }
                let found = state
                    .bindings(&dev.aor, 0)
                    .into_iter()
                    // The registrar stores the Contact URI as sent.
                    .find(|b| b.contact == dev.contact)
                    .map(|b| b.cseq);
                if found.is_none_or(|c| c < a.cseq) {
                    return Err(Violation::LostRegistration(Box::new(LostBinding {
                        node: node.name.clone(),
                        applied,
                        aor: dev.aor.to_string(),
                        contact: dev.contact.clone(),
                        cseq: a.cseq,
                        index: a.index,
                        acked_by: self.nodes[a.node].name.clone(),
                        acked_step: a.step,
                        found,
                    })));
                }
            }
            let epoch = self.ack_epoch;
            let up = self.nodes[i].up.as_mut().expect("checked above");
            up.applied = applied;
            up.epoch = epoch;
        }
        let low = self
            .nodes
            .iter()
            .filter_map(|n| n.up.as_ref())
            .map(|u| u.applied)
            .min()
            .unwrap_or(0);
        while self.states.first_key_value().is_some_and(|(k, _)| *k < low) {
            self.states.pop_first();
        }
        Ok(())
    }

    /// (2) one leader per term; (1) a leader of a new highest term holds
    /// every acknowledged entry in its log.
    fn check_leaders(&mut self) -> Result<(), Violation> {
        for i in 0..self.nodes.len() {
            let Some(up) = self.nodes[i].up.as_ref() else {
                continue;
            };
            if !up.replica.is_leader() {
                continue;
            }
            let term = up.replica.role().1;
            match self.leaders.get(&term) {
                Some(&j) if j != i => {
                    return Err(Violation::TwoLeaders {
                        term,
                        first: self.nodes[j].name.clone(),
                        second: self.nodes[i].name.clone(),
                    });
                }
                Some(_) => {}
                None => {
                    self.leaders.insert(term, i);
                    let name = self.nodes[i].name.clone();
                    self.event(format!("{name} leader of term {term}"));
                    if term > self.max_leader_term {
                        self.max_leader_term = term;
                        let last = last_index(&self.nodes[i].disk);
                        if last < self.max_ack_index {
                            return Err(Violation::LeaderBehind {
                                node: name,
                                term,
                                last,
                                acked: self.max_ack_index,
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `None` once the region has converged: one leader every node follows,
    /// no proposal waiting anywhere, every replica applied up to the
    /// leader's last entry. Otherwise what is missing.
    fn unconverged(&self) -> Option<String> {
        let ups: Vec<(&Node, &Up)> = self
            .nodes
            .iter()
            .filter_map(|n| n.up.as_ref().map(|u| (n, u)))
            .collect();
        let summary = || {
            ups.iter()
                .map(|(n, u)| {
                    let (l, t) = u.replica.role();
                    format!(
                        "{}: leader {l} term {t}{} applied {} commit {} pending {}",
                        n.name,
                        if u.replica.is_leader() {
                            " (leader)"
                        } else {
                            ""
                        },
                        u.replica.state().applied_index(),
                        u.replica.commit_index(),
                        u.replica.pending_count()
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        if ups.len() != self.nodes.len() {
            return Some(format!("nodes down; {}", summary()));
        }
        let leaders: Vec<&(&Node, &Up)> =
            ups.iter().filter(|(_, u)| u.replica.is_leader()).collect();
        let [(ln, lu)] = leaders.as_slice() else {
            return Some(format!("{} leaders; {}", leaders.len(), summary()));
        };
        let role = (ln.id, lu.replica.role().1);
        let commit = lu.replica.commit_index();
        let last = last_index(&ln.disk);
        let settled = last == commit
            && ups.iter().all(|(_, u)| {
                u.replica.role() == role
                    && u.replica.pending_count() == 0
                    && u.waiting.is_empty()
                    && u.replica.state().applied_index() == commit
            });
        if settled {
            None
        } else {
            Some(format!("leader log at {last}; {}", summary()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region run for `ticks` ticks of its fault phase, checks passing.
    fn running(seed: u64, ticks: u64) -> Sim<'static> {
        let cfg = Box::leak(Box::new(SimConfig {
            faults: false,
            ..SimConfig::default()
        }));
        let mut sim = Sim::new(seed, cfg);
        sim.start().unwrap();
        for _ in 0..ticks * STEPS_PER_TICK {
            assert!(!sim.step_once().unwrap());
        }
        sim
    }

    fn leader(sim: &Sim<'_>) -> (usize, u64) {
        let i = (0..sim.nodes.len())
            .find(|&i| sim.nodes[i].up.as_ref().unwrap().replica.is_leader())
            .expect("a leader after 200 ticks");
        (i, sim.nodes[i].up.as_ref().unwrap().replica.role().1)
    }

    #[test]
    fn a_second_leader_in_a_term_is_caught() {
        let mut sim = running(1, 200);
        let (i, term) = leader(&sim);
        sim.leaders.insert(term, (i + 1) % sim.nodes.len());
        let v = sim.check().unwrap_err();
        assert!(
            matches!(v, Violation::TwoLeaders { term: t, .. } if t == term),
            "{v}"
        );
    }

    #[test]
    fn a_different_state_at_the_same_index_is_caught() {
        let mut sim = running(2, 200);
        let up = sim.nodes[0].up.as_mut().unwrap();
        up.epoch = u64::MAX;
        let applied = up.replica.state().applied_index();
        let mut other = State::new();
        other.set_applied_index(applied);
        other.track_dirty(true);
        sim.states.insert(applied, (1, other));
        let v = sim.check().unwrap_err();
        assert!(
            matches!(v, Violation::Diverged { index, .. } if index == applied),
            "{v}"
        );
    }

    #[test]
    fn a_missing_acknowledged_binding_is_caught() {
        let mut sim = running(3, 200);
        assert!(sim.report.acked > 0);
        let dev = &mut sim.devices[0];
        dev.acked = Some(Acked {
            cseq: dev.cseq + 5,
            index: 1,
            expires_at: u64::MAX,
            node: 0,
            step: 0,
        });
        sim.ack_epoch += 1;
        let v = sim.check().unwrap_err();
        assert!(matches!(v, Violation::LostRegistration(_)), "{v}");
    }

    #[test]
    fn live_nodes_never_share_an_election_timeout() {
        let mut sim = running(5, 50);
        for round in 0..20 {
            let i = round % sim.nodes.len();
            sim.crash(i);
            sim.boot(i, &[]).unwrap();
            let mut e: Vec<u64> = sim
                .nodes
                .iter()
                .map(|n| n.up.as_ref().unwrap().election)
                .collect();
            e.sort_unstable();
            e.dedup();
            assert_eq!(e.len(), sim.nodes.len(), "round {round}: {e:?}");
        }
    }

    #[test]
    fn a_crash_and_restart_keep_every_acknowledgement() {
        let mut sim = running(4, 200);
        let (i, _) = leader(&sim);
        sim.crash(i);
        for _ in 0..100 * STEPS_PER_TICK {
            sim.step_once().unwrap();
        }
        sim.boot(i, &[]).unwrap();
        for _ in 0..100 * STEPS_PER_TICK {
            sim.step_once().unwrap();
        }
        let (j, _) = leader(&sim);
        assert_ne!(i, j, "a new leader while the old one was down");
        let applied: Vec<u64> = sim
            .nodes
            .iter()
            .map(|n| n.up.as_ref().unwrap().replica.state().applied_index())
            .collect();
        assert!(
            applied.iter().max().unwrap() - applied.iter().min().unwrap() < 5,
            "{applied:?}"
        );
    }
}
