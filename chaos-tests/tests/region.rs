//! The region simulation over a fixed set of seeds (every `cargo test`),
//! and over the seeds of `SIPZONE_SIM_SEEDS` when set (longer local runs,
//! and the replay of a failure).

use chaos_tests::{Report, SimConfig, run_seeds, seeds_from_env};

fn seeds(range: std::ops::Range<u64>) -> anyhow::Result<()> {
    let cfg = SimConfig::from_env();
    match run_seeds(range, &cfg) {
        Ok(reports) => {
            print_totals(&reports);
            Ok(())
        }
        Err(f) => anyhow::bail!("{f}"),
    }
}

fn print_totals(reports: &[Report]) {
    for r in reports {
        println!("{r}");
    }
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    println!(
        "{} seeds, {} steps, {} acked, {} crashes, {} partitions",
        reports.len(),
        sum(|r| r.steps),
        sum(|r| r.acked),
        sum(|r| r.crashes),
        sum(|r| r.partitions)
    );
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
