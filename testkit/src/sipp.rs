//! Running SIPp (Debian package `sip-tester`) and reading its statistics.
//!
//! Debian's SIPp is built without TLS; TLS runs put [`crate::stunnel`] in
//! front of it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::proc::{Proc, have};

/// SIPp's transport mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SippTransport {
    /// `-t u1`
    Udp,
    /// `-t t1`
    Tcp,
}

/// Final counters from SIPp's `-trace_stat` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SippStats {
    /// `SuccessfulCall(C)`
    pub successful: u64,
    /// `FailedCall(C)`
    pub failed: u64,
    /// `Retransmissions(C)`
    pub retransmissions: u64,
    /// `OutOfCallMsgs(C)` — messages SIPp could not match to a call.
    pub out_of_call: u64,
}

/// A SIPp run being prepared.
#[derive(Debug, Clone)]
pub struct Sipp {
    args: Vec<String>,
    dir: PathBuf,
    name: String,
}

impl Sipp {
    /// A SIPp with a built-in scenario (`uac`, `uas`, ...), writing its
    /// files under `dir` with prefix `name`.
    pub fn builtin(scenario: &str, dir: &Path, name: &str) -> Result<Sipp> {
        if !have("sipp") {
            bail!("sipp not found: install the Debian package sip-tester (.ci/run does)");
        }
        let stat = dir.join(format!("{name}-stat.csv"));
        let _ = std::fs::remove_file(&stat);
        let args = vec![
            "-sn".into(),
            scenario.into(),
            "-nostdin".into(),
            "-trace_stat".into(),
            "-stf".into(),
            stat.display().to_string(),
            "-fd".into(),
            "1".into(),
            "-trace_err".into(),
            "-error_file".into(),
            dir.join(format!("{name}-errors.log")).display().to_string(),
            "-buff_size".into(),
            "1048576".into(),
        ];
        Ok(Sipp {
            args,
            dir: dir.to_path_buf(),
            name: name.into(),
        })
    }

    /// A SIPp with a scenario file from `testkit/scenarios/`.
    pub fn scenario_file(file: &str, dir: &Path, name: &str) -> Result<Sipp> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scenarios")
            .join(file);
        Self::scenario_path(&path, dir, name)
    }

    /// A SIPp with the scenario file at `path`.
    pub fn scenario_path(path: &Path, dir: &Path, name: &str) -> Result<Sipp> {
        let mut s = Self::builtin("uas", dir, name)?;
        s.args[0] = "-sf".into();
        s.args[1] = path.display().to_string();
        Ok(s)
    }

    /// Adds raw arguments.
    pub fn arg(mut self, a: impl ToString) -> Sipp {
        self.args.push(a.to_string());
        self
    }

    /// Local address and port (`-i`, `-p`).
    pub fn local(self, addr: SocketAddr) -> Sipp {
        self.arg("-i").arg(addr.ip()).arg("-p").arg(addr.port())
    }

    /// Transport mode (`-t`).
    pub fn transport(self, t: SippTransport) -> Sipp {
        self.arg("-t").arg(match t {
            SippTransport::Udp => "u1",
            SippTransport::Tcp => "t1",
        })
    }

    /// Stops after `n` calls (`-m`).
    pub fn calls(self, n: u64) -> Sipp {
        self.arg("-m").arg(n)
    }

    /// Remote address (the last positional argument).
    pub fn remote(self, addr: SocketAddr) -> Sipp {
        self.arg(addr)
    }

    /// Starts SIPp in the background.
    pub fn spawn(&self) -> Result<Proc> {
        let log = self.dir.join(format!("{}-sipp.log", self.name));
        Proc::spawn(
            &format!("sipp {}", self.name),
            Command::new("sipp").args(&self.args).current_dir(&self.dir),
            &log,
        )
    }

    /// Runs SIPp to completion (bounded by `limit`) and returns its exit
    /// code and final statistics.
    pub fn run(&self, limit: Duration) -> Result<(i32, SippStats)> {
        let mut p = self.spawn()?;
        let status = p.wait_timeout(limit)?;
        let stats = self.stats()?;
        Ok((status.code().unwrap_or(-1), stats))
    }

    /// Reads the last line of the statistics file.
    pub fn stats(&self) -> Result<SippStats> {
        let path = self.dir.join(format!("{}-stat.csv", self.name));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading SIPp statistics {}", path.display()))?;
        parse_stats(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The path of SIPp's log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}-sipp.log", self.name))
    }
}

/// Writes a SIPp `-inf` file for `register_auth.xml` and `uac_auth.xml`:
/// users 1000 to 1999 with the local-testing passwords (`pw` + user), in
/// order.
pub fn write_test_users(path: &Path) -> Result<()> {
    let mut csv = String::from("SEQUENTIAL\n");
    for u in 1000..2000 {
        csv += &format!("{u};[authentication username={u} password=pw{u}]\n");
    }
    std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

/// Parses a `-trace_stat` CSV (`;`-separated, header line first).
pub fn parse_stats(text: &str) -> Result<SippStats> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .context("empty stat file")?
        .split(';')
        .collect();
    let last: Vec<&str> = lines
        .next_back()
        .context("no data line")?
        .split(';')
        .collect();
    let col = |name: &str| -> Result<u64> {
        let i = header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("no column {name}"))?;
        let v = last.get(i).copied().unwrap_or("0").trim();
        v.parse().with_context(|| format!("{name}={v}"))
    };
    Ok(SippStats {
        successful: col("SuccessfulCall(C)")?,
        failed: col("FailedCall(C)")?,
        retransmissions: col("Retransmissions(C)")?,
        out_of_call: col("OutOfCallMsgs(C)").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_last_line() {
        let s = "StartTime;SuccessfulCall(P);SuccessfulCall(C);FailedCall(C);Retransmissions(C);OutOfCallMsgs(C);\n\
                 x;0;0;0;0;0;\n\
                 y;5;1000;2;17;3;\n";
        let st = parse_stats(s).unwrap();
        assert_eq!(
            st,
            SippStats {
                successful: 1000,
                failed: 2,
                retransmissions: 17,
                out_of_call: 3
            }
        );
    }
}
