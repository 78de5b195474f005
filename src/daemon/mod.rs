//! The node daemon `elide-daemon`: serves the session-based ExecutionAPI
//! (`elide.daemon.v1alpha1`) on a Unix socket and supervises every snippet it runs.
//!
//! - [`config`]: TOML file + flags. [`cli`]: the binary's commands (serve, run, sessions, ...).
//! - [`server`]: the gRPC edge and the socket. [`service`]: sessions and executions, no gRPC.
//! - [`session`], [`execution`]: the two domain objects; [`plan`] validates a start request
//!   into an [`plan::ExecutionPlan`] ([`exec_limits`]: the sizes the kernel allows a new
//!   process's arguments and environment); [`launcher`] turns a plan into a process.
//! - [`runtime`]: python3/node/elide discovery; [`tsstrip`]: TypeScript type stripping.
//! - [`blocking`]: which blocking work runs inline on the async workers and which is handed off.
//! - [`state`]: exit statuses on disk; [`output`]: captured output; [`events`]: event fan-out;
//!   [`exec`]: commands run inside an execution's context; [`reaper`]: the companion process
//!   that kills what a dead daemon left behind; [`pool`]: warm runtimes per session.
//!
//! Intrinsics (per session, enforced by the kernel through [`crate::sandbox`]):
//! - `env` off: the snippet's environment is only PATH, HOME, LANG (+ USER); the requested
//!   variables are not passed. On: exactly the requested variables, nothing inherited.
//! - `io` off: Landlock confines reads to the runtime's own files, the script and
//!   `extra_read_paths`, and writes to the working dir and `extra_write_paths`.
//! - `net` off: a private network namespace with only loopback up.

pub mod blocking;
pub mod cgroup_stock;
pub mod cli;
pub mod config;
pub mod error;
pub mod events;
pub mod exec;
pub mod exec_limits;
pub mod execution;
pub mod journal;
pub mod launcher;
pub mod output;
pub mod plan;
pub mod pool;
pub mod reaper;
pub mod runtime;
pub mod server;
pub mod service;
pub mod session;
pub mod state;
pub mod tsstrip;
