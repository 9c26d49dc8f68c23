//! The simulated network between replicas: every Raft message is a datagram
//! that may be lost, delayed, duplicated or reordered, and links may be cut
//! (partitions, one way or both).
//!
//! Time is in simulation steps (several per Raft tick, see
//! [`crate::STEPS_PER_TICK`]). A message sent at step `s` is delivered at
//! `s + delay` with `delay >= 1`; messages due at the same step are
//! delivered in a random order, and a later message may overtake an earlier
//! one whenever its delay is shorter. A cut is checked at delivery, so a
//! partition also swallows what was already on the wire.

use std::collections::BTreeSet;

use raft::eraftpb::{Message, MessageType};

use crate::rng::SimRng;

/// How the network misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// Probability, in parts per million, that a message is lost.
    pub loss_ppm: u32,
    /// Probability that a message is delivered twice.
    pub dup_ppm: u32,
    /// Largest ordinary delay, in steps (at least 1).
    pub max_delay: u64,
    /// Probability that a message is held back much longer (a spike).
    pub spike_ppm: u32,
    /// Largest delay of a spike, in steps.
    pub spike_delay: u64,
}

impl Faults {
    /// A network that delivers everything once, one step later.
    pub const NONE: Faults = Faults {
        loss_ppm: 0,
        dup_ppm: 0,
        max_delay: 1,
        spike_ppm: 0,
        spike_delay: 1,
    };
}

/// Counters of what the network did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Messages handed to the network.
    pub sent: u64,
    /// Messages delivered to a live replica (duplicates included).
    pub delivered: u64,
    /// Messages lost at random.
    pub lost: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Messages dropped by a cut link or a down destination.
    pub blocked: u64,
}

#[derive(Debug)]
struct InFlight {
    at: u64,
    msg: Message,
}

/// Messages on the wire and the links that are cut.
#[derive(Debug)]
pub struct Net {
    faults: Faults,
    wire: Vec<InFlight>,
    /// Directed links `(from, to)` that deliver nothing.
    cut: BTreeSet<(u64, u64)>,
    /// Snapshots (from, to) that never arrived, for the sender's report.
    failed_snapshots: Vec<(u64, u64)>,
    stats: NetStats,
}

impl Net {
    /// An empty network misbehaving as `faults` says.
    pub fn new(faults: Faults) -> Net {
        Net {
            faults,
            wire: Vec::new(),
            cut: BTreeSet::new(),
            failed_snapshots: Vec::new(),
            stats: NetStats::default(),
        }
    }

    /// The current fault settings.
    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// Changes the fault settings for messages sent from now on.
    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    /// The counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Messages on the wire.
    pub fn in_flight(&self) -> usize {
        self.wire.len()
    }

    /// Puts `msg`, sent at step `now`, on the wire.
    pub fn send(&mut self, now: u64, msg: Message, rng: &mut SimRng) {
        self.stats.sent += 1;
        if rng.chance(self.faults.loss_ppm) {
            self.stats.lost += 1;
            self.note_failure(&msg);
            return;
        }
        if rng.chance(self.faults.dup_ppm) {
            self.stats.duplicated += 1;
            let at = now + self.delay(rng);
            self.wire.push(InFlight {
                at,
                msg: msg.clone(),
            });
        }
        let at = now + self.delay(rng);
        self.wire.push(InFlight { at, msg });
    }

    fn delay(&self, rng: &mut SimRng) -> u64 {
        if rng.chance(self.faults.spike_ppm) {
            rng.between(1, self.faults.spike_delay.max(1))
        } else {
            rng.between(1, self.faults.max_delay.max(1))
        }
    }

    /// Takes the messages due at step `now`, in a random order, without
    /// those a cut link swallows. `live(id)` says whether a replica is up:
    /// a message for a down replica is lost.
    pub fn due(&mut self, now: u64, rng: &mut SimRng, live: impl Fn(u64) -> bool) -> Vec<Message> {
        let mut out = Vec::new();
        let mut keep = Vec::with_capacity(self.wire.len());
        for f in self.wire.drain(..) {
            if f.at > now {
                keep.push(f);
            } else if self.cut.contains(&(f.msg.from, f.msg.to)) || !live(f.msg.to) {
                self.stats.blocked += 1;
                if f.msg.get_msg_type() == MessageType::MsgSnapshot {
                    self.failed_snapshots.push((f.msg.from, f.msg.to));
                }
            } else {
                out.push(f.msg);
            }
        }
        self.wire = keep;
        rng.shuffle(&mut out);
        self.stats.delivered += out.len() as u64;
        out
    }

    fn note_failure(&mut self, msg: &Message) {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            self.failed_snapshots.push((msg.from, msg.to));
        }
    }

    /// Snapshots `(from, to)` lost or blocked since the last call: a real
    /// transport reports a snapshot stream that failed, so that the leader
    /// sends another ([`zone_node::replica::Replica::report_snapshot`]).
    pub fn take_failed_snapshots(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.failed_snapshots)
    }

    /// Cuts the link from `from` to `to` (one way).
    pub fn cut_one_way(&mut self, from: u64, to: u64) {
        self.cut.insert((from, to));
    }

    /// Cuts every link between a node of `a` and a node of `b`, both ways.
    pub fn partition(&mut self, a: &[u64], b: &[u64]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }

    /// True when some link is cut.
    pub fn is_partitioned(&self) -> bool {
        !self.cut.is_empty()
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(from: u64, to: u64, index: u64) -> Message {
        Message {
            from,
            to,
            index,
            ..Message::default()
        }
    }

    #[test]
    fn delivers_after_the_delay_and_cuts_both_ways() {
        let mut rng = SimRng::new(3);
        let mut net = Net::new(Faults::NONE);
        net.send(0, msg(1, 2, 1), &mut rng);
        assert!(
            net.due(0, &mut rng, |_| true).is_empty(),
            "never the same step"
        );
        assert_eq!(net.due(1, &mut rng, |_| true).len(), 1);
        net.partition(&[1], &[2, 3]);
        net.send(1, msg(2, 1, 2), &mut rng);
        net.send(1, msg(1, 3, 3), &mut rng);
        net.send(1, msg(3, 2, 4), &mut rng);
        let got = net.due(2, &mut rng, |_| true);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].index, 4);
        net.heal();
        net.cut_one_way(1, 2);
        net.send(2, msg(1, 2, 5), &mut rng);
        net.send(2, msg(2, 1, 6), &mut rng);
        let got = net.due(3, &mut rng, |id| id != 3);
        assert_eq!(got.iter().map(|m| m.index).collect::<Vec<_>>(), [6]);
        assert_eq!(net.stats().blocked, 3);
    }

    #[test]
    fn loss_and_duplication_follow_their_rates() {
        let mut rng = SimRng::new(9);
        let mut net = Net::new(Faults {
            loss_ppm: 500_000,
            dup_ppm: 1_000_000,
            max_delay: 3,
            spike_ppm: 0,
            spike_delay: 1,
        });
        for i in 0..1000 {
            net.send(0, msg(1, 2, i), &mut rng);
        }
        let s = net.stats();
        assert!((400..600).contains(&s.lost), "{s:?}");
        assert_eq!(s.duplicated, 1000 - s.lost);
        let got: usize = (1..=3).map(|t| net.due(t, &mut rng, |_| true).len()).sum();
        assert_eq!(got as u64, 2 * (1000 - s.lost));
        assert_eq!(net.in_flight(), 0);
    }
}
