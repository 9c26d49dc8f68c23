//! Metric names served on `/metrics` (Prometheus). Emitted by the driver
//! only; the cores count in plain fields.

/// SIP requests received, by `method`.
pub const REQUESTS: &str = "sipzone_node_requests_total";
/// SIP responses sent, by `method` and `code`.
pub const RESPONSES: &str = "sipzone_node_responses_total";
/// Bindings currently registered (gauge).
pub const REGISTRATIONS: &str = "sipzone_node_registrations";
/// Calls in progress (gauge).
pub const ACTIVE_CALLS: &str = "sipzone_node_active_calls";
/// Failed digest authentications.
pub const AUTH_FAILURES: &str = "sipzone_node_auth_failures_total";
/// Requests refused because a user or source is locked out, by `scope`.
pub const LOCKOUTS: &str = "sipzone_node_lockouts_total";
/// The current Raft term (gauge).
pub const RAFT_TERM: &str = "sipzone_node_raft_term";
/// 1 while this node is the Raft leader (gauge).
pub const RAFT_IS_LEADER: &str = "sipzone_node_raft_is_leader";
/// Proposals given up after their retries.
pub const PROPOSALS_DROPPED: &str = "sipzone_node_proposals_dropped_total";
/// Calls the leader reassigned from silent nodes.
pub const CALLS_REASSIGNED: &str = "sipzone_node_calls_reassigned_total";
/// Calls the replicated state lists as owned by this node (gauge).
pub const OWNED_CALLS: &str = "sipzone_node_owned_calls";
