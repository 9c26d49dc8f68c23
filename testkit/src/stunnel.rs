//! stunnel (Debian `stunnel4`) as a TLS front for SIPp, whose Debian build
//! has no TLS: a client-mode tunnel lets SIPp's TCP reach a TLS server, a
//! server-mode tunnel lets a TLS client reach SIPp's TCP.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::pki::LeafFiles;
use crate::proc::{Proc, have};

/// Which way the tunnel faces.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Accept plain TCP on `accept`, connect with TLS to `connect`, verifying
    /// the server against `ca`.
    Client {
        /// CA file that signed the server certificate.
        ca: std::path::PathBuf,
    },
    /// Accept TLS on `accept` with `leaf`, connect in plain TCP to `connect`.
    Server {
        /// Certificate and key presented to TLS clients.
        leaf: LeafFiles,
    },
}

/// Starts stunnel in the foreground (its PID is ours to stop) and returns it.
pub fn start(
    dir: &Path,
    name: &str,
    mode: &Mode,
    accept: SocketAddr,
    connect: SocketAddr,
) -> Result<Proc> {
    if !have("stunnel4") && !have("stunnel") {
        bail!("stunnel not found: install the Debian package stunnel4 (.ci/run does)");
    }
    let mut conf = format!(
        "foreground = yes\npid =\nsyslog = no\ndebug = 4\n[{name}]\naccept = {accept}\nconnect = {connect}\nsslVersionMin = TLSv1.2\n"
    );
    match mode {
        Mode::Client { ca } => {
            conf += &format!(
                "client = yes\nCAfile = {}\nverifyChain = yes\ncheckIP = {}\n",
                ca.display(),
                connect.ip()
            );
        }
        Mode::Server { leaf } => {
            conf += &format!(
                "cert = {}\nkey = {}\n",
                leaf.cert.display(),
                leaf.key.display()
            );
        }
    }
    let path = dir.join(format!("{name}-stunnel.conf"));
    std::fs::write(&path, conf)?;
    let prog = if have("stunnel4") {
        "stunnel4"
    } else {
        "stunnel"
    };
    Proc::spawn(
        &format!("stunnel {name}"),
        Command::new(prog).arg(&path),
        &dir.join(format!("{name}-stunnel.log")),
    )
}
