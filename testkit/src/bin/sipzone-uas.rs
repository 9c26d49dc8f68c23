//! A user agent server on the project's SIP stack: answers every INVITE
//! (180, 200 with SDP, retransmitting the 200 until the ACK), BYE, OPTIONS,
//! INFO, UPDATE and MESSAGE. Runs until Ctrl-C or SIGTERM and prints its
//! counters then.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use sip::flow::Transport;
use sip::transport::{TransportConfig, tls};
use testkit::ua::{Answer, Ua, UaConfig};

/// Answers calls on UDP and TCP (and TLS with --tls-listen).
#[derive(Parser, Debug)]
#[command(name = "sipzone-uas")]
struct Args {
    /// UDP and TCP listen address.
    #[arg(long, default_value = "127.0.0.1:5060")]
    listen: SocketAddr,
    /// TLS listen address (needs --cert and --key, or --self-signed).
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) for TLS.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Private key (PEM) for TLS.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Generate a throw-away certificate for 127.0.0.1/localhost and write
    /// its CA to this file (for local tests only).
    #[arg(long)]
    self_signed: Option<PathBuf>,
    /// Milliseconds between 180 and 200.
    #[arg(long, default_value_t = 0)]
    ring_ms: u64,
    /// Reject every INVITE with this status instead of answering.
    #[arg(long)]
    reject: Option<u16>,
    /// User part of the Contact.
    #[arg(long, default_value = "uas")]
    user: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    testkit::init_logging();
    let args = Args::parse();
    let mut transport = TransportConfig {
        udp: vec![args.listen],
        tcp: vec![args.listen],
        ..TransportConfig::default()
    };
    if let Some(tls_addr) = args.tls_listen {
        let (cert, key) = match (&args.cert, &args.key, &args.self_signed) {
            (Some(c), Some(k), _) => (std::fs::read(c)?, std::fs::read(k)?),
            (_, _, Some(ca_out)) => {
                let ca = testkit::pki::Ca::new("sipzone-uas test CA")?;
                let leaf = ca.issue(&["127.0.0.1", "localhost"])?;
                std::fs::write(ca_out, &ca.cert_pem)
                    .with_context(|| format!("writing {}", ca_out.display()))?;
                (leaf.cert_pem.into_bytes(), leaf.key_pem.into_bytes())
            }
            _ => anyhow::bail!("--tls-listen needs --cert and --key, or --self-signed CA_FILE"),
        };
        transport.tls = vec![tls_addr];
        transport.tls_server = Some(tls::server_config(&cert, &key, None)?);
    }
    let answer = match args.reject {
        Some(code) => Answer::Reject(code),
        None => Answer::Accept {
            ring: Duration::from_millis(args.ring_ms),
        },
    };
    let ua = Ua::start(UaConfig {
        transport,
        user: args.user,
        answer,
        ..UaConfig::default()
    })
    .await?;
    println!(
        "sipzone-uas listening: udp {} tcp {}{}",
        ua.local_addr(Transport::Udp).unwrap(),
        ua.local_addr(Transport::Tcp).unwrap(),
        ua.local_addr(Transport::Tls)
            .map(|a| format!(" tls {a}"))
            .unwrap_or_default()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let s = ua.stats();
    println!(
        "sipzone-uas stats: answered={} acked={} byes={} retransmitted_2xx={} unacked={}",
        s.answered, s.acked, s.byes, s.retransmitted_2xx, s.unacked
    );
    Ok(())
}
