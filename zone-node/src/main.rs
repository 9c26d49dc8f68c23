//! `sipzone-node --config FILE`: the call switch.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use zone_node::config::Config;

/// sipzone call switch: registrar and B2BUA.
#[derive(Parser, Debug)]
#[command(name = "sipzone-node", version)]
struct Args {
    /// Configuration file (TOML); see docs/config.md. Needed by everything
    /// but `cluster-pki`.
    #[arg(long)]
    config: Option<PathBuf>,
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
    /// Add or remove directory users in the replicated state, through the
    /// node that runs with `--config`.
    #[command(subcommand)]
    User(UserCmd),
    /// Create the cluster CA in `--dir` on first use (`ca.pem`, `ca.key`),
    /// and a certificate for each `--name` that has none yet (`NAME.pem`,
    /// `NAME.key`), for `[cluster]` ca/cert/key.
    ClusterPki {
        /// Where the CA and the certificates live.
        #[arg(long)]
        dir: PathBuf,
        /// A node name (repeat for several).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
}

/// The CA's subject name; a reloaded CA must use the same one.
const CLUSTER_CA: &str = "sipzone cluster CA";

fn cluster_pki(dir: &std::path::Path, names: &[String]) -> Result<()> {
    use sip::transport::pki::Ca;
    std::fs::create_dir_all(dir)?;
    let ca = if dir.join("ca.key").is_file() {
        Ca::load(dir, CLUSTER_CA)?
    } else {
        let ca = Ca::new(CLUSTER_CA)?;
        ca.write(dir)?;
        println!("created {}", dir.join("ca.pem").display());
        ca
    };
    for name in names {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            anyhow::bail!("node name {name:?}: letters, digits or '-' only");
        }
        if dir.join(format!("{name}.pem")).is_file() {
            println!("kept {}", dir.join(format!("{name}.pem")).display());
            continue;
        }
        let files = ca
            .issue(&[zone_node::peer::CLUSTER_NAME])?
            .write(dir, name)?;
        println!("created {}", files.cert.display());
    }
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
enum UserCmd {
    /// Add (or replace) a user; the password is read from the first line
    /// of standard input and only its HA1 hashes leave this process.
    Add {
        /// The digest user name.
        #[arg(long)]
        name: String,
    },
    /// Remove a user.
    Remove {
        /// The digest user name.
        #[arg(long)]
        name: String,
    },
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

/// Sends an operator's request to the node of `cfg` and prints the reply.
fn admin(cfg: &Config, req: zone_node::peer::AdminRequest) -> Result<()> {
    use zone_node::peer::{AdminReply, Identity};
    let c = cfg
        .cluster
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the configuration has no [cluster]"))?;
    let identity = Identity {
        ca_pem: std::fs::read(&c.ca)?,
        cert_pem: std::fs::read(&c.cert)?,
        key_pem: std::fs::read(&c.key)?,
    };
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
        AdminReply::Done { .. } | AdminReply::Committed => Ok(()),
        AdminReply::Failed(why) => Err(anyhow::anyhow!("refused: {why}")),
    }
}

fn user(cfg: &Config, cmd: UserCmd) -> Result<()> {
    use zone_node::peer::AdminRequest;
    let req = match cmd {
        UserCmd::Add { name } => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                anyhow::bail!("no password on standard input");
            }
            let user = zone_node::directory::User::from_password(&name, &cfg.auth.realm, password);
            AdminRequest::PutUser { name, user }
        }
        UserCmd::Remove { name } => AdminRequest::RemoveUser { name },
    };
    admin(cfg, req)
}

fn member(cfg: &Config, cmd: MemberCmd) -> Result<()> {
    use zone_node::peer::AdminRequest;
    let members = |add_voters, add_learners, remove, member| AdminRequest::Members {
        add_voters,
        add_learners,
        remove,
        member,
    };
    let req = match cmd {
        MemberCmd::Add {
            id,
            addr,
            zone,
            learner,
        } => {
            let m = Some(zone_node::cluster::Member { id, addr, zone });
            if learner {
                members(vec![], vec![id], vec![], m)
            } else {
                members(vec![id], vec![], vec![], m)
            }
        }
        MemberCmd::Promote { id } => members(vec![id], vec![], vec![], None),
        MemberCmd::Remove { id } => members(vec![], vec![], vec![id], None),
        MemberCmd::Change {
            add_voters,
            add_learners,
            remove,
        } => members(add_voters, add_learners, remove, None),
    };
    admin(cfg, req)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Cmd::ClusterPki { dir, names }) = &args.command {
        return cluster_pki(dir, names);
    }
    let path = args
        .config
        .ok_or_else(|| anyhow::anyhow!("--config FILE is required"))?;
    // Validated before anything is bound or started.
    let cfg = Config::load(&path)?;
    if args.check {
        println!("{}: ok", path.display());
        return Ok(());
    }
    match args.command {
        Some(Cmd::Member(m)) => return member(&cfg, m),
        Some(Cmd::User(u)) => return user(&cfg, u),
        Some(Cmd::ClusterPki { .. }) | None => {}
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
