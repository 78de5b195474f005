//! elide-task-driver: a Nomad task driver that runs Python, JavaScript and TypeScript snippets
//! in one long-lived node daemon.
//!
//! Layers (each knows nothing of the ones above it):
//! - [`proto`]: generated protobuf bindings (Nomad plugin API, go-plugin housekeeping, and our
//!   own `elide.daemon.v1alpha1` ExecutionAPI).
//! - [`goplugin`]: the go-plugin transport (handshake, socket, housekeeping services, hclog).
//! - [`nomad`]: Nomad's plugin API on top (BasePlugin, Driver, config schemas, fingerprint).
//! - [`daemon_client`]: the plugin's typed client of the daemon's ExecutionAPI.
//! - [`daemon`]: the node daemon serving the ExecutionAPI (sessions, executions, runtimes).
//! - [`sandbox`]: isolation and limits of one execution (cgroups, Landlock, netns, user, sinks).
//! - [`paced_accept`]: the listeners of both servers, which pause instead of spinning when
//!   `accept` fails (out of descriptors).
//! - [`peer_guard`]: keeps the daemon's executions off both servers' sockets.

pub mod daemon;
pub mod daemon_client;
pub mod goplugin;
pub mod nomad;
pub mod paced_accept;
pub mod peer_guard;
pub mod proto;
pub mod sandbox;
