//! The tokio driver of the transaction layer: one task owns a
//! [`TxnTable`], feeds it what the [`Transports`] receive and what the clock
//! says, sends what it outputs, and hands transaction-user events to the
//! element above (UA, registrar, B2BUA, proxy).
//!
//! Requests leave with [`Transports::send`]; responses with
//! [`Transports::send_response`], which applies the RFC 3261 §18.2.2 and RFC
//! 3581 rules for where a response goes. A failed send is reported back to
//! the table as a failed flow, so the transactions on it end with a
//! transport error (§17.1.4, §17.2.4).
//!
//! Sends that need a new TCP/TLS connection (a connect and a handshake can
//! take seconds, or never finish for a peer that drops SYNs) do not hold up
//! the loop: they go to a connector task per destination, which sends in
//! order and reports failures back. Everything else is sent inline, so
//! messages on one flow keep their order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::flow::{Flow, Transport};
use crate::msg::Message;
use crate::transport::{Incoming, Transports};
use crate::txn::{Config, Event, Input, Output, TxnError, TxnKey, TxnTable};

/// Why an endpoint call failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The transaction table refused the input.
    #[error(transparent)]
    Txn(#[from] TxnError),
    /// The driver task has stopped.
    #[error("endpoint stopped")]
    Stopped,
}

enum Command {
    Request {
        flow: Flow,
        msg: Message,
        reply: oneshot::Sender<Result<TxnKey, TxnError>>,
    },
    Response {
        key: TxnKey,
        msg: Message,
        reply: oneshot::Sender<Result<(), TxnError>>,
    },
    Cancel {
        key: TxnKey,
        reply: oneshot::Sender<Result<TxnKey, TxnError>>,
    },
}

/// A handle to the driver task; clones share it. The task stops when every
/// handle is dropped and the transports close.
#[derive(Clone, Debug)]
pub struct Endpoint {
    cmd: mpsc::Sender<Command>,
    transports: Transports,
}

#[allow(clippy::disallowed_methods)] // the driver owns the clock
fn now() -> Instant {
    Instant::now()
}

impl Endpoint {
    /// Starts the driver over `transports` and their `incoming` messages.
    /// Returns the handle and the channel of transaction-user events
    /// (bounded by `events_capacity`: a slow TU slows the endpoint down
    /// rather than growing a queue).
    pub fn start(
        transports: Transports,
        incoming: mpsc::Receiver<Incoming>,
        config: Config,
        events_capacity: usize,
    ) -> (Endpoint, mpsc::Receiver<Event>) {
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (ev_tx, ev_rx) = mpsc::channel(events_capacity.max(1));
        let (failed_tx, failed_rx) = mpsc::channel(1024);
        let driver = Driver {
            table: TxnTable::with_config(config),
            transports: transports.clone(),
            events: ev_tx,
            connectors: HashMap::new(),
            failed_tx,
        };
        tokio::spawn(driver.run(incoming, cmd_rx, failed_rx));
        (
            Endpoint {
                cmd: cmd_tx,
                transports,
            },
            ev_rx,
        )
    }

    /// The transports under this endpoint (for stateless sends such as the
    /// ACK for a 2xx or a retransmitted 2xx, which live outside transactions).
    pub fn transports(&self) -> &Transports {
        &self.transports
    }

    /// Starts a client transaction for `msg` (top Via with branch already
    /// set) on `flow`. Responses arrive as [`Event::Response`] with the key
    /// returned here, which equals [`TxnKey::client`] of `msg`.
    pub async fn send_request(&self, flow: Flow, msg: Message) -> Result<TxnKey, EndpointError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Request { flow, msg, reply })
            .await
            .map_err(|_| EndpointError::Stopped)?;
        Ok(rx.await.map_err(|_| EndpointError::Stopped)??)
    }

    /// Sends `msg` on server transaction `key`.
    pub async fn send_response(&self, key: TxnKey, msg: Message) -> Result<(), EndpointError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Response { key, msg, reply })
            .await
            .map_err(|_| EndpointError::Stopped)?;
        Ok(rx.await.map_err(|_| EndpointError::Stopped)??)
    }

    /// Sends a CANCEL for client INVITE transaction `key` (RFC 3261 §9.1);
    /// returns the CANCEL's own client transaction.
    pub async fn cancel(&self, key: TxnKey) -> Result<TxnKey, EndpointError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Cancel { key, reply })
            .await
            .map_err(|_| EndpointError::Stopped)?;
        Ok(rx.await.map_err(|_| EndpointError::Stopped)??)
    }
}

/// Messages queued per connector before sends to that destination fail.
const CONNECTOR_QUEUE: usize = 64;
/// A connector with nothing to send for this long ends.
const CONNECTOR_IDLE: Duration = Duration::from_secs(5);

struct Driver {
    table: TxnTable,
    transports: Transports,
    events: mpsc::Sender<Event>,
    /// Connector tasks by destination, for sends that need a new connection.
    connectors: HashMap<(Transport, SocketAddr), mpsc::Sender<(Flow, Message)>>,
    /// Flows whose send failed in a connector.
    failed_tx: mpsc::Sender<Flow>,
}

/// Sends one message: requests to their flow, responses by RFC 3261 §18.2.2.
async fn send(transports: &Transports, flow: &Flow, msg: &Message) -> bool {
    let sent = if msg.is_request() {
        transports.send(flow, msg).await
    } else {
        transports.send_response(flow, msg).await
    };
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, remote = %flow.remote, "send failed");
            false
        }
    }
}

/// Sends what is queued for one destination, in order, then ends after
/// [`CONNECTOR_IDLE`] without work (draining what arrived meanwhile).
async fn connector(
    transports: Transports,
    mut rx: mpsc::Receiver<(Flow, Message)>,
    failed: mpsc::Sender<Flow>,
) {
    loop {
        match tokio::time::timeout(CONNECTOR_IDLE, rx.recv()).await {
            Ok(Some((flow, msg))) => {
                if !send(&transports, &flow, &msg).await {
                    let _ = failed.send(flow).await;
                }
            }
            Ok(None) => return,
            Err(_) => break,
        }
    }
    rx.close();
    while let Ok((flow, msg)) = rx.try_recv() {
        if !send(&transports, &flow, &msg).await {
            let _ = failed.send(flow).await;
        }
    }
}

impl Driver {
    async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Incoming>,
        mut cmds: mpsc::Receiver<Command>,
        mut failed: mpsc::Receiver<Flow>,
    ) {
        let mut incoming_open = true;
        let mut cmds_open = true;
        while incoming_open || cmds_open {
            let deadline = self.table.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = incoming.recv(), if incoming_open => match m {
                    Some(Incoming { msg, flow }) => {
                        if let Err(e) = self.table.handle(now(), Input::Received { flow, msg }) {
                            tracing::debug!(error = %e, "message refused by the transaction layer");
                        }
                    }
                    None => incoming_open = false,
                },
                c = cmds.recv(), if cmds_open => match c {
                    Some(c) => self.command(c),
                    None => cmds_open = false,
                },
                Some(flow) = failed.recv() => {
                    let _ = self.table.handle(now(), Input::FlowFailed { flow });
                }
                () = sleep => self.table.handle_timeout(now()),
            }
            if !self.drain().await {
                break;
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Request { flow, msg, reply } => {
                let key = TxnKey::client(&msg);
                let r = key.and_then(|key| {
                    self.table
                        .handle(now(), Input::SendRequest { flow, msg })
                        .map(|()| key)
                });
                let _ = reply.send(r);
            }
            Command::Response { key, msg, reply } => {
                let _ = reply.send(self.table.handle(now(), Input::SendResponse { key, msg }));
            }
            Command::Cancel { key, reply } => {
                let r = self.table.cancel(&key).and_then(|(flow, msg)| {
                    let k = TxnKey::client(&msg)?;
                    self.table
                        .handle(now(), Input::SendRequest { flow, msg })
                        .map(|()| k)
                });
                let _ = reply.send(r);
            }
        }
    }

    /// Hands a send that needs a new connection to the destination's
    /// connector, starting one when there is none (or it ended).
    fn send_via_connector(&mut self, flow: Flow, msg: Message) {
        let key = (flow.transport, flow.remote);
        let mut item = (flow, msg);
        if let Some(tx) = self.connectors.get(&key) {
            match tx.try_send(item) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let _ = self.table.handle(now(), Input::FlowFailed { flow });
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(back)) => item = back,
            }
        }
        let (tx, rx) = mpsc::channel(CONNECTOR_QUEUE);
        // A new channel has room for one message.
        let _ = tx.try_send(item);
        self.connectors.retain(|_, c| !c.is_closed());
        self.connectors.insert(key, tx);
        tokio::spawn(connector(
            self.transports.clone(),
            rx,
            self.failed_tx.clone(),
        ));
    }

    /// Performs every pending output. Returns false when the TU is gone.
    async fn drain(&mut self) -> bool {
        while let Some(out) = self.table.poll_output() {
            match out {
                Output::Send { flow, msg } => {
                    if self.transports.is_connected(&flow) {
                        if !send(&self.transports, &flow, &msg).await {
                            let _ = self.table.handle(now(), Input::FlowFailed { flow });
                        }
                    } else {
                        self.send_via_connector(flow, msg);
                    }
                }
                Output::ToTu(ev) => {
                    if self.events.send(ev).await.is_err() {
                        return false;
                    }
                }
                Output::Terminated(_) => {}
            }
        }
        true
    }
}
