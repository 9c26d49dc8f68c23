//! The health-checked dispatcher shared by the balancer and the SBC: a set
//! of destinations (zone-nodes with a zone label), OPTIONS probes as
//! deadlines, up/down with hysteresis, load read from the probe replies, and
//! weighted rendezvous hashing to pick a destination for a key (Call-ID,
//! AOR). Sans-IO: the driver sends the probes [`Dispatcher::poll_output`]
//! asks for, feeds the replies back with [`Dispatcher::handle_reply`], and
//! calls [`Dispatcher::handle_timeout`] at [`Dispatcher::poll_timeout`].
//!
//! ```text
//!            success x up_after                  failure x down_after
//!   Down ─────────────────────────▶ Up ─────────────────────────────▶ Down
//!   (start)   failure: count reset      success: count reset
//! ```
//!
//! A probe succeeds when a reply with a status below 500 arrives before its
//! timeout; a 5xx reply (a node that is draining or overloaded answers 503)
//! or no reply within `timeout` is a failure. Destinations start down and
//! come up after `up_after` successes, so nothing is sent to a node before it
//! answered.
//!
//! # Parameters ([`DispatchConfig`])
//!
//! | name | type | meaning | default |
//! |---|---|---|---|
//! | `interval` | `Duration` | time between two probes of one destination (probes overlap when a reply is late) | 100 ms |
//! | `timeout` | `Duration` | a probe without reply this long after it was sent has failed | 200 ms |
//! | `down_after` | `u32` | consecutive failures that mark an up destination down | 2 |
//! | `up_after` | `u32` | consecutive successes that mark a down destination up | 2 |
//! | `load_step` | `u64` | reported calls are rounded down to a multiple of this before weighting, so small changes move no key | 50 |
//! | `load_scale` | `u64` | calls at which a destination's weight is halved | 1 000 |
//!
//! Detection time with the defaults: a node that dies at `t` leaves
//! unanswered the probe sent last before `t` (failing at most 200 ms after
//! `t`) and the one sent next (at most 100 ms after `t`, failing at most 300
//! ms after `t`); the second failure marks it down at most
//! `interval + timeout` = 300 ms after `t` when a probe was sent just
//! before, 400 ms in the worst case (`(down_after - 1) * interval +
//! interval + timeout`), under the 0.5 s target.
//!
//! # Selection
//!
//! [`Dispatcher::pick`] scores every up destination with weighted
//! rendezvous hashing (highest random weight): `score = weight / -ln(u)`,
//! `u` a hash of the key and the destination's name mapped into (0, 1). The
//! highest score wins. A key stays on its destination while the set of up
//! destinations and their weights are unchanged; a destination going down
//! moves only its own keys, spread over the others in proportion to their
//! weights. Equal weights spread keys evenly over the up destinations of
//! both zones. The hash (FNV-1a and the SplitMix64 finalizer) is fixed, so
//! every balancer instance picks the same destination for the same key.
//!
//! `weight = configured weight / (1 + calls / load_scale)`, with calls
//! rounded down to `load_step`: a node carrying `load_scale` calls more than
//! another gets about half the new keys.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Index of a destination in its [`Dispatcher`] (order of
/// [`Dispatcher::add`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestId(pub usize);

/// Identifies one probe; the driver carries it in the probe's Via branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeId(pub u64);

/// Probe and selection parameters (see the table in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchConfig {
    /// Time between two probes of one destination.
    pub interval: Duration,
    /// A probe without reply for this long has failed.
    pub timeout: Duration,
    /// Consecutive failures that mark an up destination down.
    pub down_after: u32,
    /// Consecutive successes that mark a down destination up.
    pub up_after: u32,
    /// Calls are rounded down to a multiple of this before weighting.
    pub load_step: u64,
    /// Calls at which a destination's weight is halved.
    pub load_scale: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
            down_after: 2,
            up_after: 2,
            load_step: 50,
            load_scale: 1000,
        }
    }
}

/// Why a [`DispatchConfig`] or destination is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// A parameter is zero or out of range (the field is named).
    #[error("invalid dispatcher parameter: {0}")]
    Invalid(&'static str),
    /// Two destinations have the same name.
    #[error("duplicate destination {0:?}")]
    Duplicate(String),
}

impl DispatchConfig {
    /// Checks every parameter is usable.
    pub fn validate(&self) -> Result<(), DispatchError> {
        if self.interval.is_zero() {
            return Err(DispatchError::Invalid("interval"));
        }
        if self.timeout.is_zero() {
            return Err(DispatchError::Invalid("timeout"));
        }
        if self.down_after == 0 {
            return Err(DispatchError::Invalid("down_after"));
        }
        if self.up_after == 0 {
            return Err(DispatchError::Invalid("up_after"));
        }
        if self.load_step == 0 {
            return Err(DispatchError::Invalid("load_step"));
        }
        if self.load_scale == 0 {
            return Err(DispatchError::Invalid("load_scale"));
        }
        Ok(())
    }
}

/// The load a destination reported in its last probe reply
/// (`X-Sipzone-Load: calls=N;registrations=M`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Calls in progress.
    pub calls: u64,
    /// Bindings registered.
    pub registrations: u64,
}

/// The header zone-nodes put their load in, on OPTIONS replies.
pub const LOAD_HEADER: &str = "X-Sipzone-Load";

impl Load {
    /// Parses an `X-Sipzone-Load` value (`calls=N;registrations=M`, any
    /// order, unknown parameters ignored). `None` when neither is present or
    /// a value is not a number.
    pub fn parse(v: &str) -> Option<Load> {
        let mut load = Load::default();
        let mut seen = false;
        for part in v.split(';') {
            let Some((name, value)) = part.split_once('=') else {
                continue;
            };
            let slot = match name.trim() {
                n if n.eq_ignore_ascii_case("calls") => &mut load.calls,
                n if n.eq_ignore_ascii_case("registrations") => &mut load.registrations,
                _ => continue,
            };
            *slot = value.trim().parse().ok()?;
            seen = true;
        }
        seen.then_some(load)
    }
}

/// Whether a destination receives traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Answering probes: it is picked.
    Up,
    /// Not answering (or not yet): it is never picked.
    Down,
}

/// Per-destination counters, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestStats {
    /// Probes asked for.
    pub probes_sent: u64,
    /// Probes that failed (timeout or 5xx).
    pub probes_failed: u64,
    /// Times the destination went from up to down.
    pub went_down: u64,
    /// Times the destination went from down to up.
    pub went_up: u64,
    /// Times [`Dispatcher::pick`] or [`Dispatcher::pick_other_zone`] chose it.
    pub picked: u64,
}

/// What the dispatcher asks of its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send an OPTIONS probe to `dest`, carrying `probe` (in its branch).
    Probe {
        /// The destination.
        dest: DestId,
        /// The probe's id, to give back with [`Dispatcher::handle_reply`].
        probe: ProbeId,
    },
    /// `dest` changed health (for logs and metrics).
    Health {
        /// The destination.
        dest: DestId,
        /// Its new health.
        health: Health,
    },
}

#[derive(Debug, Clone)]
struct Dest {
    name: String,
    zone: String,
    weight: f64,
    health: Health,
    /// Consecutive results in the direction that would change `health`.
    streak: u32,
    load: Option<Load>,
    next_probe: Option<Instant>,
    /// Probes in flight with their deadlines, oldest first.
    pending: VecDeque<(ProbeId, Instant)>,
    stats: DestStats,
}

/// The dispatcher: destinations, their health, and the probe schedule.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    config: DispatchConfig,
    dests: Vec<Dest>,
    next_probe_id: u64,
    out: VecDeque<Output>,
}

impl Dispatcher {
    /// A dispatcher with no destinations.
    pub fn new(config: DispatchConfig) -> Result<Dispatcher, DispatchError> {
        config.validate()?;
        Ok(Dispatcher {
            config,
            dests: Vec::new(),
            next_probe_id: 1,
            out: VecDeque::new(),
        })
    }

    /// Adds a destination named `name` (unique; it is also its hash
    /// identity) in `zone` with a relative `weight` (> 0). It starts down
    /// and is probed first at `now`.
    pub fn add(
        &mut self,
        now: Instant,
        name: &str,
        zone: &str,
        weight: f64,
    ) -> Result<DestId, DispatchError> {
        if self.dests.iter().any(|d| d.name == name) {
            return Err(DispatchError::Duplicate(name.to_string()));
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(DispatchError::Invalid("weight"));
        }
        self.dests.push(Dest {
            name: name.to_string(),
            zone: zone.to_string(),
            weight,
            health: Health::Down,
            streak: 0,
            load: None,
            next_probe: Some(now),
            pending: VecDeque::new(),
            stats: DestStats::default(),
        });
        Ok(DestId(self.dests.len() - 1))
    }

    /// The parameters.
    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// Every destination id.
    pub fn ids(&self) -> impl Iterator<Item = DestId> + '_ {
        (0..self.dests.len()).map(DestId)
    }

    /// The destination called `name`.
    pub fn find(&self, name: &str) -> Option<DestId> {
        self.dests.iter().position(|d| d.name == name).map(DestId)
    }

    /// The name of `dest`.
    pub fn name(&self, dest: DestId) -> Option<&str> {
        self.dests.get(dest.0).map(|d| d.name.as_str())
    }

    /// The zone of `dest`.
    pub fn zone(&self, dest: DestId) -> Option<&str> {
        self.dests.get(dest.0).map(|d| d.zone.as_str())
    }

    /// The health of `dest` (`Down` for an unknown id).
    pub fn health(&self, dest: DestId) -> Health {
        self.dests.get(dest.0).map_or(Health::Down, |d| d.health)
    }

    /// True when `dest` is up.
    pub fn is_up(&self, dest: DestId) -> bool {
        self.health(dest) == Health::Up
    }

    /// The load `dest` reported last.
    pub fn load(&self, dest: DestId) -> Option<Load> {
        self.dests.get(dest.0).and_then(|d| d.load)
    }

    /// The counters of `dest`.
    pub fn stats(&self, dest: DestId) -> DestStats {
        self.dests.get(dest.0).map(|d| d.stats).unwrap_or_default()
    }

    /// The destination a probe was sent to, while it is in flight.
    pub fn probe_dest(&self, probe: ProbeId) -> Option<DestId> {
        self.dests
            .iter()
            .position(|d| d.pending.iter().any(|(p, _)| *p == probe))
            .map(DestId)
    }

    /// A reply to `probe` arrived: `status` is its code, `load` what its
    /// load header said. A reply to a probe that already timed out (or was
    /// never sent) is ignored.
    pub fn handle_reply(&mut self, _now: Instant, probe: ProbeId, status: u16, load: Option<Load>) {
        let Some(i) = self.probe_dest(probe).map(|d| d.0) else {
            return;
        };
        let d = &mut self.dests[i];
        d.pending.retain(|(p, _)| *p != probe);
        if status < 500 {
            if load.is_some() {
                d.load = load;
            }
            self.result(i, true);
        } else {
            self.result(i, false);
        }
    }

    /// Fires due deadlines: probes that timed out fail, destinations due a
    /// probe get one.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.dests.len() {
            loop {
                let d = &mut self.dests[i];
                match d.pending.front() {
                    Some(&(_, deadline)) if deadline <= now => {
                        d.pending.pop_front();
                        self.result(i, false);
                    }
                    _ => break,
                }
            }
            let d = &mut self.dests[i];
            if d.next_probe.is_some_and(|t| t <= now) {
                let probe = ProbeId(self.next_probe_id);
                self.next_probe_id += 1;
                d.pending.push_back((probe, now + self.config.timeout));
                d.next_probe = Some(now + self.config.interval);
                d.stats.probes_sent += 1;
                self.out.push_back(Output::Probe {
                    dest: DestId(i),
                    probe,
                });
            }
        }
    }

    fn result(&mut self, i: usize, ok: bool) {
        let (down_after, up_after) = (self.config.down_after, self.config.up_after);
        let d = &mut self.dests[i];
        if !ok {
            d.stats.probes_failed += 1;
        }
        let (toward_change, need) = match d.health {
            Health::Up => (!ok, down_after),
            Health::Down => (ok, up_after),
        };
        if !toward_change {
            d.streak = 0;
            return;
        }
        d.streak += 1;
        if d.streak < need {
            return;
        }
        d.streak = 0;
        d.health = match d.health {
            Health::Up => {
                d.stats.went_down += 1;
                Health::Down
            }
            Health::Down => {
                d.stats.went_up += 1;
                Health::Up
            }
        };
        self.out.push_back(Output::Health {
            dest: DestId(i),
            health: d.health,
        });
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest deadline: a probe to send or a probe timing out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.dests
            .iter()
            .flat_map(|d| {
                d.next_probe
                    .into_iter()
                    .chain(d.pending.front().map(|p| p.1))
            })
            .min()
    }

    /// The effective weight of `dest` (configured weight scaled down by its
    /// reported calls; see the module docs).
    pub fn weight(&self, dest: DestId) -> f64 {
        let Some(d) = self.dests.get(dest.0) else {
            return 0.0;
        };
        let calls = d.load.map_or(0, |l| l.calls);
        let calls = calls - calls % self.config.load_step;
        d.weight / (1.0 + calls as f64 / self.config.load_scale as f64)
    }

    /// The up destination for `key` (highest weighted rendezvous score), or
    /// `None` when none is up.
    pub fn pick(&mut self, key: &[u8]) -> Option<DestId> {
        self.pick_where(key, |_| true)
    }

    /// The up destination for `key` among those not in zone `not_zone`:
    /// where a request goes when its node (in `not_zone`) failed.
    pub fn pick_other_zone(&mut self, key: &[u8], not_zone: &str) -> Option<DestId> {
        self.pick_where(key, |d| d.zone != not_zone)
    }

    fn pick_where(&mut self, key: &[u8], keep: impl Fn(&Dest) -> bool) -> Option<DestId> {
        let kh = fnv1a(key);
        let mut best: Option<(f64, usize)> = None;
        for (i, d) in self.dests.iter().enumerate() {
            if d.health != Health::Up || !keep(d) {
                continue;
            }
            let s = score(kh, &d.name, self.weight(DestId(i)));
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, i));
            }
        }
        let (_, i) = best?;
        self.dests[i].stats.picked += 1;
        Some(DestId(i))
    }
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The SplitMix64 finalizer: spreads the bits of `x` over the whole word.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The weighted rendezvous score of a key (hashed) on a destination.
fn score(key_hash: u64, name: &str, weight: f64) -> f64 {
    let h = mix(key_hash ^ mix(fnv1a(name.as_bytes())));
    // 53 bits into (0, 1): never 0, so ln is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Four nodes, two per zone, brought up by two answered probes each.
    fn region(t: Instant) -> Dispatcher {
        let mut d = Dispatcher::new(DispatchConfig::default()).unwrap();
        for (n, z) in [("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")] {
            d.add(t, n, z, 1.0).unwrap();
        }
        for step in 0..2 {
            let now = t + ms(100 * step);
            d.handle_timeout(now);
            answer_all(&mut d, now, |_| true);
        }
        d
    }

    /// Answers every probe asked for with 200 where `alive`, drains outputs.
    fn answer_all(d: &mut Dispatcher, now: Instant, alive: impl Fn(DestId) -> bool) -> Vec<Output> {
        let mut seen = Vec::new();
        while let Some(o) = d.poll_output() {
            if let Output::Probe { dest, probe } = o
                && alive(dest)
            {
                d.handle_reply(now, probe, 200, None);
            }
            seen.push(o);
        }
        seen
    }

    #[test]
    fn parameters_are_checked() {
        let bad = [
            DispatchConfig {
                interval: Duration::ZERO,
                ..Default::default()
            },
            DispatchConfig {
                down_after: 0,
                ..Default::default()
            },
            DispatchConfig {
                load_step: 0,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(Dispatcher::new(c).is_err(), "{c:?}");
        }
        let mut d = Dispatcher::new(DispatchConfig::default()).unwrap();
        let t = t0();
        d.add(t, "a1", "A", 1.0).unwrap();
        assert_eq!(
            d.add(t, "a1", "B", 1.0),
            Err(DispatchError::Duplicate("a1".into()))
        );
        assert!(d.add(t, "a2", "A", 0.0).is_err());
        assert!(d.add(t, "a3", "A", f64::NAN).is_err());
        assert_eq!(d.ids().count(), 1, "a refused add leaves the set as it was");
    }

    #[test]
    fn load_header_golden_table() {
        let table: [(&str, Option<(u64, u64)>); 7] = [
            ("calls=3;registrations=10", Some((3, 10))),
            ("registrations=10;calls=3", Some((3, 10))),
            (" calls = 7 ", Some((7, 0))),
            ("CALLS=1;x=y", Some((1, 0))),
            ("x=y", None),
            ("calls=-1", None),
            ("calls=abc;registrations=1", None),
        ];
        for (v, want) in table {
            let got = Load::parse(v).map(|l| (l.calls, l.registrations));
            assert_eq!(got, want, "{v:?}");
        }
    }

    #[test]
    fn starts_down_and_comes_up_after_two_answered_probes() {
        let t = t0();
        let mut d = Dispatcher::new(DispatchConfig::default()).unwrap();
        let a = d.add(t, "a1", "A", 1.0).unwrap();
        assert_eq!(d.poll_timeout(), Some(t));
        assert_eq!(d.pick(b"k"), None, "nothing up before any answer");
        d.handle_timeout(t);
        let out = answer_all(&mut d, t, |_| true);
        assert_eq!(out.len(), 1);
        assert!(!d.is_up(a), "one success is not enough");
        assert_eq!(d.poll_timeout(), Some(t + ms(100)));
        d.handle_timeout(t + ms(100));
        let out = answer_all(&mut d, t + ms(100), |_| true);
        assert!(out.contains(&Output::Health {
            dest: a,
            health: Health::Up
        }));
        assert!(d.is_up(a));
        assert_eq!(d.pick(b"k"), Some(a));
    }

    /// A node dies at t+205 ms (just after answering its probe of t+200):
    /// every step of the schedule, and the detection time under 500 ms.
    #[test]
    fn a_dead_node_is_down_within_half_a_second() {
        let t = t0();
        let mut d = region(t);
        let b1 = d.find("b1").unwrap();
        let death = t + ms(205);
        let mut now = t + ms(200);
        d.handle_timeout(now);
        answer_all(&mut d, now, |_| true);
        let mut down_at = None;
        while now < t + ms(2000) {
            let Some(next) = d.poll_timeout() else { break };
            now = next;
            d.handle_timeout(now);
            let out = answer_all(&mut d, now, |dest| dest != b1 || now < death);
            if out.contains(&Output::Health {
                dest: b1,
                health: Health::Down,
            }) {
                down_at = Some(now);
                break;
            }
        }
        let down_at = down_at.expect("b1 never marked down");
        // probes at 300 and 400 go unanswered; they time out at 500 and 600
        assert_eq!(down_at - death, ms(395));
        assert!(down_at - death < ms(500));
        assert!(!d.is_up(b1));
        // the others stayed up
        for n in ["a1", "a2", "b2"] {
            assert!(d.is_up(d.find(n).unwrap()), "{n}");
        }
        assert_eq!(d.stats(b1).went_down, 1);
        assert_eq!(d.stats(b1).probes_failed, 2);
    }

    #[test]
    fn hysteresis_one_failure_or_one_success_changes_nothing() {
        let t = t0();
        let mut d = region(t);
        let a1 = d.find("a1").unwrap();
        // up: fail, succeed, fail, succeed... never down
        let mut now = t + ms(200);
        for i in 0..6 {
            d.handle_timeout(now);
            let alive = i % 2 == 1;
            answer_all(&mut d, now, |x| x != a1 || alive);
            now += ms(100);
            d.handle_timeout(now); // earlier unanswered probe times out at +200
        }
        assert!(d.is_up(a1));
        // a 503 counts as a failure: two in a row take it down
        let mut probes = Vec::new();
        for _ in 0..2 {
            now += ms(100);
            d.handle_timeout(now);
            while let Some(o) = d.poll_output() {
                if let Output::Probe { dest, probe } = o {
                    if dest == a1 {
                        probes.push(probe);
                    } else {
                        d.handle_reply(now, probe, 200, None);
                    }
                }
            }
        }
        for p in probes {
            d.handle_reply(now, p, 503, None);
        }
        assert!(!d.is_up(a1));
        // a late 200 for a probe that already timed out is ignored
        d.handle_reply(now, ProbeId(1), 200, None);
        assert!(!d.is_up(a1));
    }

    /// The golden table: which node each key goes to with all four up, and
    /// after b1 goes down. Fixed hashes make this the same on every
    /// balancer instance and every build.
    #[test]
    fn pick_golden_table() {
        let t = t0();
        let mut d = region(t);
        // key, all four up, b1 down
        let table = [
            ("call-1@example.com", "a2", "a2"),
            ("call-2@example.com", "a2", "a2"),
            ("call-3@example.com", "b2", "b2"),
            ("sip:1000@sipzone.local", "b2", "b2"),
            ("sip:1001@sipzone.local", "a1", "a1"),
            ("sip:1002@sipzone.local", "b1", "a1"),
        ];
        let picks = |d: &mut Dispatcher| -> Vec<String> {
            table
                .iter()
                .map(|(k, _, _)| {
                    let id = d.pick(k.as_bytes()).unwrap();
                    d.name(id).unwrap().to_string()
                })
                .collect()
        };
        let all_up = picks(&mut d);
        let b1 = d.find("b1").unwrap();
        d.dests[b1.0].health = Health::Down;
        let b1_down = picks(&mut d);
        let got: Vec<(&str, &str, &str)> = table
            .iter()
            .zip(all_up.iter().zip(&b1_down))
            .map(|((k, _, _), (u, dn))| (*k, u.as_str(), dn.as_str()))
            .collect();
        assert_eq!(got, table);
    }

    #[test]
    fn keys_spread_evenly_and_stick_while_the_set_is_stable() {
        let t = t0();
        let mut d = region(t);
        let keys: Vec<String> = (0..20_000).map(|i| format!("{i}-call@10.0.0.1")).collect();
        let before: Vec<DestId> = keys.iter().map(|k| d.pick(k.as_bytes()).unwrap()).collect();
        let mut per = [0usize; 4];
        for p in &before {
            per[p.0] += 1;
        }
        for n in per {
            let share = n as f64 / keys.len() as f64;
            assert!((0.235..0.265).contains(&share), "{per:?}");
        }
        let zone_a = (per[0] + per[1]) as f64 / keys.len() as f64;
        assert!((0.48..0.52).contains(&zone_a), "zone A {zone_a}");
        // same answer again
        let again: Vec<DestId> = keys.iter().map(|k| d.pick(k.as_bytes()).unwrap()).collect();
        assert_eq!(before, again);
        // b1 down: only b1's keys move, and they spread over the other three
        let b1 = d.find("b1").unwrap();
        d.dests[b1.0].health = Health::Down;
        let mut moved_to = [0usize; 4];
        for (k, old) in keys.iter().zip(&before) {
            let new = d.pick(k.as_bytes()).unwrap();
            if *old == b1 {
                assert_ne!(new, b1);
                moved_to[new.0] += 1;
            } else {
                assert_eq!(new, *old, "{k} moved although its node is up");
            }
        }
        for (i, n) in moved_to.iter().enumerate() {
            if i != b1.0 {
                let share = *n as f64 / per[b1.0] as f64;
                assert!((0.28..0.39).contains(&share), "{moved_to:?}");
            }
        }
    }

    #[test]
    fn load_weights_new_keys_away_from_a_busy_node() {
        let t = t0();
        let mut d = region(t);
        let a1 = d.find("a1").unwrap();
        // a1 reports 1,000 calls: half the weight of the others
        d.dests[a1.0].load = Some(Load {
            calls: 1000,
            registrations: 0,
        });
        assert!((d.weight(a1) - 0.5).abs() < 1e-9);
        // small changes below load_step do not move keys
        d.dests[a1.0].load = Some(Load {
            calls: 1049,
            registrations: 0,
        });
        assert!((d.weight(a1) - 0.5).abs() < 1e-9);
        let n = 20_000;
        let to_a1 = (0..n)
            .filter(|i| d.pick(format!("k{i}").as_bytes()) == Some(a1))
            .count();
        // weight 0.5 of a total 3.5
        let share = to_a1 as f64 / n as f64;
        assert!((0.13..0.156).contains(&share), "{share}");
        // the load came from a probe reply
        let now = t + ms(200);
        d.handle_timeout(now);
        while let Some(o) = d.poll_output() {
            if let Output::Probe { dest, probe } = o {
                let load = (dest == a1).then_some(Load {
                    calls: 0,
                    registrations: 5,
                });
                d.handle_reply(now, probe, 200, load);
            }
        }
        assert_eq!(d.load(a1).map(|l| l.registrations), Some(5));
        assert!((d.weight(a1) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn pick_other_zone_never_returns_the_failed_zone() {
        let t = t0();
        let mut d = region(t);
        for i in 0..1000 {
            let k = format!("c{i}");
            let p = d.pick_other_zone(k.as_bytes(), "A").unwrap();
            assert_eq!(d.zone(p), Some("B"));
            // and it is the key's own choice among the B nodes
            let b_only = d.pick_where(k.as_bytes(), |x| x.zone == "B");
            assert_eq!(Some(p), b_only);
        }
        for n in ["b1", "b2"] {
            let id = d.find(n).unwrap();
            d.dests[id.0].health = Health::Down;
        }
        assert_eq!(d.pick_other_zone(b"x", "A"), None);
        assert!(d.pick(b"x").is_some_and(|p| d.zone(p) == Some("A")));
    }
}
