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
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Change the membership of the region through the node that runs with
    /// `--config` (its cluster certificate authenticates the request).
    #[command(subcommand)]
    Member(MemberCmd),
}

#[derive(clap::Subcommand, Debug)]
enum MemberCmd {
    /// Add a node (as a learner with --learner, else as a voter).
    Add {
        /// Its Raft id.
        #[arg(long)]
        id: u64,
        /// Its Raft listener.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// Its zone label.
        #[arg(long, default_value = "")]
        zone: String,
        /// Add it as a learner (promote it once it caught up).
        #[arg(long)]
        learner: bool,
    },
    /// Make a learner a voter.
    Promote {
        /// Its Raft id.
        #[arg(long)]
        id: u64,
    },
    /// Remove a node.
    Remove {
        /// Its Raft id.
        #[arg(long)]
        id: u64,
    },
    /// Several changes at once, by joint consensus (for example replace a
    /// voter: `--add-voter 6 --remove 2`).
    Change {
        /// Voters to add or learners to promote.
        #[arg(long = "add-voter")]
        add_voters: Vec<u64>,
        /// Learners to add.
        #[arg(long = "add-learner")]
        add_learners: Vec<u64>,
        /// Members to remove.
        #[arg(long)]
        remove: Vec<u64>,
    },
}

fn member(cfg: &Config, cmd: MemberCmd) -> Result<()> {
    use zone_node::peer::{AdminReply, AdminRequest, Identity};
    let c = cfg
        .cluster
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the configuration has no [cluster]"))?;
    let identity = Identity {
        ca_pem: std::fs::read(&c.ca)?,
        cert_pem: std::fs::read(&c.cert)?,
        key_pem: std::fs::read(&c.key)?,
    };
    let mut req = AdminRequest {
        add_voters: vec![],
        add_learners: vec![],
        remove: vec![],
        member: None,
    };
    match cmd {
        MemberCmd::Add {
            id,
            addr,
            zone,
            learner,
        } => {
            if learner {
                req.add_learners.push(id);
            } else {
                req.add_voters.push(id);
            }
            req.member = Some(zone_node::cluster::Member { id, addr, zone });
        }
        MemberCmd::Promote { id } => req.add_voters.push(id),
        MemberCmd::Remove { id } => req.remove.push(id),
        MemberCmd::Change {
            add_voters,
            add_learners,
            remove,
        } => {
            req.add_voters = add_voters;
            req.add_learners = add_learners;
            req.remove = remove;
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(zone_node::peer::admin(
        &identity,
        c.listen,
        &req,
        std::time::Duration::from_secs(10),
    ))?;
    println!("{}", serde_json::to_string(&reply)?);
    match reply {
        AdminReply::Done { .. } => Ok(()),
        AdminReply::Failed(why) => Err(anyhow::anyhow!("membership change failed: {why}")),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Validated before anything is bound or started.
    let cfg = Config::load(&args.config)?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    if let Some(Cmd::Member(m)) = args.command {
        return member(&cfg, m);
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
