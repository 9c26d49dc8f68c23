//! `sipzone-node --config FILE`: the call switch.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use zone_node::config::Config;

/// sipzone call switch: registrar and B2BUA.
#[derive(Parser, Debug)]
#[command(name = "sipzone-node", version)]
struct Args {
    /// Configuration file (TOML); see docs/config.md.
    #[arg(long)]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Validated before anything is bound or started.
    let cfg = Config::load(&args.config)?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    zone_node::driver::init_logging(&cfg.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let node = zone_node::driver::Node::start(cfg).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        node.stop().await;
        Ok(())
    })
}
