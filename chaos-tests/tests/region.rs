//! The region simulation over a fixed set of seeds (every `cargo test`),
//! and over the seeds of `SIPZONE_SIM_SEEDS` when set (longer local runs,
//! and the replay of a failure).

use chaos_tests::{Report, SimConfig, run, seeds_from_env};

/// Runs `range`, one line per seed as it ends, and fails on the first
/// broken invariant with the seed, the step and the replay command.
fn seeds(range: std::ops::Range<u64>) -> anyhow::Result<()> {
    let cfg = SimConfig::from_env();
    let mut done: Vec<Report> = Vec::new();
    for seed in range {
        match run(seed, &cfg) {
            Ok(r) => {
                println!("{r}");
                done.push(r);
            }
            Err(f) => anyhow::bail!("{f}"),
        }
    }
    let sum = |f: fn(&Report) -> u64| done.iter().map(f).sum::<u64>();
    println!(
        "{} seeds x {} ticks: {} steps, {} acked, {} dropped, {} crashes, {} partitions, \
         longest heal {} ticks",
        done.len(),
        cfg.ticks,
        sum(|r| r.steps),
        sum(|r| r.acked),
        sum(|r| r.dropped),
        sum(|r| r.crashes),
        sum(|r| r.partitions),
        done.iter().map(|r| r.heal_ticks).max().unwrap_or(0)
    );
    Ok(())
}

#[test]
fn seeds_0_to_15() -> anyhow::Result<()> {
    seeds(0..16)
}

#[test]
fn seeds_16_to_31() -> anyhow::Result<()> {
    seeds(16..32)
}

#[test]
fn seeds_32_to_47() -> anyhow::Result<()> {
    seeds(32..48)
}

#[test]
fn seeds_48_to_63() -> anyhow::Result<()> {
    seeds(48..64)
}

/// `SIPZONE_SIM_SEEDS=start..end` (or one seed) runs those seeds; unset,
/// nothing.
#[test]
fn seeds_from_env_var() -> anyhow::Result<()> {
    match seeds_from_env() {
        Some(range) => seeds(range),
        None => Ok(()),
    }
}
