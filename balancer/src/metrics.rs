//! Metric names served on `/metrics` (Prometheus). Emitted by the driver
//! only; the core counts in plain fields ([`crate::route::Stats`]).

/// Requests forwarded, by `direction` (`to_node`, `to_device`).
pub const FORWARDED: &str = "sipzone_balancer_requests_forwarded_total";
/// Responses forwarded.
pub const RESPONSES: &str = "sipzone_balancer_responses_forwarded_total";
/// Requests refused or dropped, by `reason` (`bad_token`, `rate_limited`,
/// `scanner`, `loop`, `no_node`, `unroutable`).
pub const REFUSED: &str = "sipzone_balancer_requests_refused_total";
/// Responses dropped (not ours, or a Via token that does not verify).
pub const RESPONSES_DROPPED: &str = "sipzone_balancer_responses_dropped_total";
/// In-dialog requests sent to another node because the owner was down.
pub const REROUTED: &str = "sipzone_balancer_rerouted_total";
/// 1 while a node is up, by `node` and `zone` (gauge).
pub const NODE_UP: &str = "sipzone_balancer_node_up";
/// Probes sent, by `node`.
pub const PROBES: &str = "sipzone_balancer_probes_total";
/// Probes failed (timeout or 5xx), by `node`.
pub const PROBES_FAILED: &str = "sipzone_balancer_probes_failed_total";
/// Times a node was picked for a new request, by `node` and `zone`.
pub const PICKED: &str = "sipzone_balancer_node_picked_total";
/// Calls a node reported in its last probe reply, by `node` (gauge).
pub const NODE_CALLS: &str = "sipzone_balancer_node_calls";
/// Registrations a node reported in its last probe reply, by `node` (gauge).
pub const NODE_REGISTRATIONS: &str = "sipzone_balancer_node_registrations";
/// Messages the driver could not send, by `kind`.
pub const SEND_ERRORS: &str = "sipzone_balancer_send_errors_total";
