//! Registrations per second through a node of a replicated region beside the
//! same SIPp load against one node with its state in memory, back to back in
//! one run. The region is 2+2 switches and a witness on loopback (release
//! binaries, Raft over QUIC, redb with fsync); SIPp registers users
//! 1000..1999 with digest auth (REGISTER, 401, REGISTER, 200) through one
//! switch. A REGISTER is answered only once its binding is committed.
//!
//! ```text
//! cargo bench -p zone-node --bench region                      # 20000 at 2000/s
//! REG_N=40000 REG_RATE=4000 cargo bench -p zone-node --bench region
//! cargo bench -p zone-node --bench region -- --test            # a short run
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

#[path = "../tests/common/region.rs"]
mod region;

use std::time::{Duration, Instant};

use region::{Region, register_until_ok, sipp_registrations, ua, wait_ready};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs the load against `node` of `region`; prints and returns regs/s.
fn load(region: &Region, label: &str, node: &str, n: u64, rate: u64) -> f64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let at = region.member(node).sip;
    rt.block_on(async {
        wait_ready(region).await;
        let probe = ua("1999").await;
        assert_eq!(register_until_ok(&probe, at, "1999", 50).await, 200);
    });
    let limit = (n / rate.max(1)) as u32 * 3 + 30;
    let sipp = sipp_registrations(region, label, at, n, rate as u32, limit);
    let start = Instant::now();
    let (code, stats) = sipp
        .run(Duration::from_secs(u64::from(limit) + 30))
        .unwrap();
    let wall = start.elapsed().as_secs_f64();
    let per_sec = stats.successful as f64 / wall;
    println!(
        "region-bench {label}: {} registered, {} failed, {} retransmissions in {wall:.1} s: {per_sec:.0}/s (offered {rate}/s, SIPp exit {code})",
        stats.successful, stats.failed, stats.retransmissions
    );
    per_sec
}

fn main() {
    let test = std::env::args().any(|a| a == "--test");
    let (n, rate) = if test {
        (200, 100)
    } else {
        (env("REG_N", 20_000), env("REG_RATE", 2_000))
    };
    let single = Region::single("bench-single");
    let mem = load(&single, "in-memory", "s1", n, rate);
    drop(single);
    let region = Region::start("bench-region");
    let replicated = load(&region, "replicated", "a1", n, rate);
    drop(region);
    println!(
        "region-bench: replicated / in-memory = {:.2} (registrations per second)",
        replicated / mem
    );
}
