//! `sipzone-balancer --config FILE`: the stateless SIP edge.

use std::path::PathBuf;

use anyhow::{Context, Result};
use balancer::config::Config;
use balancer::driver::{Balancer, init_logging};
use clap::Parser;

/// sipzone balancer: spreads calls over the zone-nodes of both zones.
#[derive(Parser, Debug)]
#[command(name = "sipzone-balancer", version)]
struct Args {
    /// Configuration file (TOML); see docs/balancer-config.md.
    #[arg(long)]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = Config::load(&args.config)?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    init_logging(&cfg.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let b = Balancer::start(cfg).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        b.stop().await;
        Ok(())
    })
}
