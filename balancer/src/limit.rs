//! Edge protection that needs no SIP state: token-bucket rate limits per
//! source address and the scanner User-Agent check (DESIGN §8).
//!
//! A [`RateLimiter`] keeps one bucket per source IP address (not per port:
//! a flood rotates ports for free). A bucket holds up to `burst` tokens and
//! refills at `per_second`; a request takes one token or is refused. The
//! table is bounded: at `max_sources` buckets it first forgets sources whose
//! bucket refilled completely (they are indistinguishable from new ones),
//! and if none did, it refuses requests from sources it has never seen until
//! room returns. Refusing the unknown is the safe side under a spoofed
//! flood: known, well-behaved sources keep their buckets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// The parameters of one rate limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: requests a quiet source may send at once.
    pub burst: f64,
    /// Most sources tracked.
    pub max_sources: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per source address.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    config: RateConfig,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new(config: RateConfig) -> RateLimiter {
        RateLimiter {
            config,
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for `source` at `now`; false when the request must be
    /// refused.
    pub fn allow(&mut self, now: Instant, source: IpAddr) -> bool {
        let c = self.config;
        if !self.buckets.contains_key(&source) && self.buckets.len() >= c.max_sources {
            self.buckets
                .retain(|_, b| refill(b, now, c).tokens < c.burst);
            if self.buckets.len() >= c.max_sources {
                return false;
            }
        }
        let b = self.buckets.entry(source).or_insert(Bucket {
            tokens: c.burst,
            at: now,
        });
        *b = refill(b, now, c);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }

    /// Seconds until `source` has a token again (at least 1), for
    /// Retry-After.
    pub fn retry_after(&self, source: IpAddr) -> u32 {
        let missing = self
            .buckets
            .get(&source)
            .map_or(1.0, |b| (1.0 - b.tokens).max(0.0));
        let secs = (missing / self.config.per_second).ceil();
        secs.clamp(1.0, 3600.0) as u32
    }
}

fn refill(b: &Bucket, now: Instant, c: RateConfig) -> Bucket {
    let dt = now.saturating_duration_since(b.at).as_secs_f64();
    Bucket {
        tokens: (b.tokens + dt * c.per_second).min(c.burst),
        at: now.max(b.at),
    }
}

/// User-Agent substrings of known SIP scanners (matched case-insensitively).
pub const DEFAULT_SCANNERS: &[&str] = &[
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "sip-scan",
    "sundayddr",
    "iwar",
    "smap",
    "vaxsipuseragent",
    "pplsip",
    "sipptk",
];

/// True when `user_agent` contains one of `scanners` (lowercase), ignoring
/// case.
pub fn is_scanner(user_agent: &str, scanners: &[String]) -> bool {
    let ua = user_agent.to_ascii_lowercase();
    scanners
        .iter()
        .any(|s| !s.is_empty() && ua.contains(s.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cfg(max_sources: usize) -> RateConfig {
        RateConfig {
            per_second: 10.0,
            burst: 5.0,
            max_sources,
        }
    }

    #[test]
    fn a_burst_then_the_refill_rate() {
        let t = t0();
        let mut l = RateLimiter::new(cfg(100));
        let a = ip("192.0.2.1");
        let allowed = (0..20).filter(|_| l.allow(t, a)).count();
        assert_eq!(allowed, 5, "the burst");
        assert_eq!(l.retry_after(a), 1);
        // 10 per second: 100 ms gives one more
        assert!(l.allow(t + Duration::from_millis(100), a));
        assert!(!l.allow(t + Duration::from_millis(100), a));
        // one second later: 10 more, capped at the burst
        let later = t + Duration::from_millis(1100);
        assert_eq!((0..20).filter(|_| l.allow(later, a)).count(), 5);
    }

    #[test]
    fn a_flooding_source_does_not_limit_another() {
        let t = t0();
        let mut l = RateLimiter::new(cfg(100));
        let (flood, quiet) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for i in 0..1000 {
            let _ = l.allow(t + Duration::from_millis(i), flood);
        }
        assert!(l.allow(t + Duration::from_millis(1000), quiet));
    }

    #[test]
    fn the_table_is_bounded_and_idle_sources_are_forgotten() {
        let t = t0();
        let mut l = RateLimiter::new(cfg(3));
        for i in 1..=3 {
            assert!(l.allow(t, ip(&format!("192.0.2.{i}"))));
        }
        // full, every bucket still drained by one token: a new source waits
        assert!(!l.allow(t, ip("192.0.2.9")));
        assert_eq!(l.sources(), 3);
        // a known source is still served
        assert!(l.allow(t, ip("192.0.2.1")));
        // once the others refilled they are forgotten and the newcomer fits
        let later = t + Duration::from_secs(1);
        assert!(l.allow(later, ip("192.0.2.9")));
        assert!(l.sources() <= 3);
    }

    #[test]
    fn scanner_user_agents_golden_table() {
        let list: Vec<String> = DEFAULT_SCANNERS.iter().map(|s| s.to_string()).collect();
        let table = [
            ("friendly-scanner", true),
            ("sipvicious 0.3.0", true),
            ("SIPVicious", true),
            ("VaxSIPUserAgent/3.1", true),
            ("sundayddr", true),
            ("Linphone/5.2 (belle-sip/5.2)", false),
            ("PolycomVVX-VVX_411-UA/6.4", false),
            ("sipp", false),
            ("", false),
        ];
        for (ua, want) in table {
            assert_eq!(is_scanner(ua, &list), want, "{ua:?}");
        }
    }
}
