//! A user agent client on the project's SIP stack: places N calls (INVITE,
//! ACK, hold, BYE) at a given rate and reports how many succeeded. Exits 0
//! only when every call got a 2xx to its INVITE and to its BYE.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;
use sip::flow::{Flow, Transport};
use sip::transport::{TransportConfig, tls};
use testkit::ua::{Ua, UaConfig};
use tokio::sync::Semaphore;

/// Places calls through a next hop.
#[derive(Parser, Debug)]
#[command(name = "sipzone-uac")]
struct Args {
    /// Request-URI of the calls.
    #[arg(long, default_value = "sip:service@127.0.0.1:5060")]
    target: String,
    /// Where requests go (the peer or an outbound proxy).
    #[arg(long, default_value = "127.0.0.1:5060")]
    next_hop: SocketAddr,
    /// udp, tcp or tls.
    #[arg(long, default_value = "udp")]
    transport: String,
    /// Local address (UDP and TCP; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Number of calls.
    #[arg(long, default_value_t = 1000)]
    calls: u64,
    /// New calls per second.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Most calls in progress at once.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// Milliseconds between ACK and BYE.
    #[arg(long, default_value_t = 100)]
    hold_ms: u64,
    /// CA (PEM) that signed the TLS server certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS server name to check (default: the next hop's IP).
    #[arg(long)]
    server_name: Option<String>,
    /// Seconds to stay up after the last call, answering retransmissions and
    /// keeping connections open while the peer finishes its own timers.
    #[arg(long, default_value_t = 5)]
    linger_s: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    testkit::init_logging();
    let args = Args::parse();
    let Some(transport) = Transport::from_token(&args.transport) else {
        bail!("--transport must be udp, tcp or tls");
    };
    let mut tc = TransportConfig {
        udp: vec![args.listen],
        tcp: vec![args.listen],
        tls_server_name: args.server_name.clone(),
        ..TransportConfig::default()
    };
    if transport == Transport::Tls {
        let Some(ca) = &args.ca else {
            bail!("--transport tls needs --ca FILE");
        };
        tc.tls_client = Some(tls::client_config(&std::fs::read(ca)?, None)?);
    }
    let ua = Ua::start(UaConfig {
        transport: tc,
        user: "uac".into(),
        ..UaConfig::default()
    })
    .await?;
    let flow = Flow::to(transport, args.next_hop);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let hold = Duration::from_millis(args.hold_ms);
    let run = async {
        let mut tick = tokio::time::interval(interval);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..args.calls {
            tick.tick().await;
            let permit = slots.clone().acquire_owned().await.unwrap();
            let (ua, ok, failed, target) =
                (ua.clone(), ok.clone(), failed.clone(), args.target.clone());
            tasks.spawn(async move {
                let r = ua.call(&target, flow, hold).await;
                match r {
                    Ok(rep) if rep.invite_status == 200 && rep.bye_status == Some(200) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("call failed: {other:?}");
                    }
                }
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
    };
    let timed_out = tokio::time::timeout(Duration::from_secs(args.timeout_s), run)
        .await
        .is_err();
    tokio::time::sleep(Duration::from_secs(args.linger_s)).await;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let not_finished = args.calls - ok - failed;
    println!(
        "sipzone-uac: calls={} ok={ok} failed={failed} unfinished={not_finished}",
        args.calls
    );
    if timed_out || failed > 0 || not_finished > 0 {
        std::process::exit(1);
    }
    Ok(())
}
