//! Commits per second and commit latency of a 5-voter region on loopback:
//! five replicas in this process, each with its Raft log in redb (one
//! fdatasync per Ready), its state in sled and its own QUIC endpoint with
//! mutual TLS, as `sipzone-node` runs them. Entries are registrations (one
//! binding each). Proposals go to replica 1, leader or not (a follower
//! forwards them), with at most `WINDOW` outstanding.
//!
//! ```text
//! cargo bench -p zone-node --bench raft            # N=20000 WINDOW=256
//! N=50000 WINDOW=1 cargo bench -p zone-node --bench raft
//! cargo bench -p zone-node --bench raft -- --test  # a short run (CI)
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use zone_node::cluster::{NodeStore, Proposals, run_replica};
use zone_node::config::{ClusterConfig, PeerConfig};
use zone_node::state::{Aor, Binding, Command, Entry, MemberRecord, ProposalId};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn entry(i: usize) -> Entry {
    let user = 100_000 + i;
    Entry {
        id: ProposalId(i as u64 + 1),
        at_unix: 1_800_000_000,
        cmds: vec![Command::UpsertBinding {
            aor: Aor::parse(&format!("sip:{user}@sipzone.local")).unwrap(),
            binding: Binding {
                received: Some("udp:192.0.2.10:5060".into()),
                ..Binding::plain(
                    format!("sip:{user}@192.0.2.10:5060;transport=udp"),
                    1_800_003_600,
                    format!("{i:016x}@bench"),
                    2,
                    "a1",
                )
            },
        }],
    }
}

fn main() {
    let test = std::env::args().any(|a| a == "--test");
    let n = if test { 300 } else { env("N", 20_000) };
    let window = env("WINDOW", 256).max(1);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("raft-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = testkit::pki::Ca::new("bench cluster").unwrap();
    let ca_file = ca.write_ca(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ids: Vec<u64> = (1..=5).collect();
        let ports: HashMap<u64, u16> = ids
            .iter()
            .map(|id| (*id, testkit::net::free_port()))
            .collect();
        let (stop, stop_rx) = watch::channel(false);
        let (tx, entries) = mpsc::channel(window * 2);
        let (numbered_tx, mut numbered) = mpsc::unbounded_channel();
        let (committed_tx, mut committed) = mpsc::unbounded_channel();
        let mut proposals = Some(Proposals {
            entries,
            numbered: numbered_tx,
            committed: committed_tx,
        });
        let mut tasks = vec![];
        for id in &ids {
            let name = format!("n{id}");
            let files = ca
                .issue(&[zone_node::peer::CLUSTER_NAME])
                .unwrap()
                .write(&dir, &name)
                .unwrap();
            let cfg = ClusterConfig {
                raft_id: *id,
                listen: testkit::net::addr(ports[id]),
                ca: ca_file.clone(),
                cert: files.cert,
                key: files.key,
                bootstrap: ids.clone(),
                tick_ms: 50,
                takeover_after_ms: 1000,
                peers: ids
                    .iter()
                    .filter(|p| *p != id)
                    .map(|p| PeerConfig {
                        id: *p,
                        addr: testkit::net::addr(ports[p]),
                        zone: String::new(),
                    })
                    .collect(),
            };
            let me = MemberRecord {
                name: name.clone(),
                zone: String::new(),
                witness: true,
                raft_addr: Some(cfg.listen),
            };
            let (store, events) = NodeStore::open_raft(&cfg, me, &dir.join(&name), *id).unwrap();
            let p = if *id == 1 { proposals.take() } else { None };
            tasks.push(tokio::spawn(run_replica(
                store,
                events,
                Duration::from_millis(50),
                stop_rx.clone(),
                p,
            )));
        }
        // Warm up: wait for a leader by committing one entry.
        tx.send(entry(n + 1)).await.unwrap();
        let _ = numbered.recv().await.unwrap();
        let _ = committed.recv().await.unwrap();

        let mut sent_at: HashMap<u64, Instant> = HashMap::new();
        let mut latencies = Vec::with_capacity(n);
        let start = Instant::now();
        let mut next = 0;
        while latencies.len() < n {
            while next < n && sent_at.len() < window {
                tx.send(entry(next)).await.unwrap();
                let (_, used) = numbered.recv().await.unwrap();
                sent_at.insert(used.0, Instant::now());
                next += 1;
            }
            let id = committed.recv().await.unwrap();
            if let Some(t) = sent_at.remove(&id.0) {
                latencies.push(t.elapsed());
            }
        }
        let wall = start.elapsed();
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        println!(
            "raft: 5 voters on loopback, redb log (fsync per Ready), sled state, QUIC mutual TLS"
        );
        println!(
            "raft: {n} commits, window {window}: {:.0} commits/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            n as f64 / wall.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            latencies[latencies.len() - 1].as_secs_f64() * 1e3,
        );
        let _ = stop.send(true);
        for t in tasks {
            let _ = t.await;
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
