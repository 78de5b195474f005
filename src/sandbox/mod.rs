//! Isolation and limits for one execution: cgroups, Landlock filesystem confinement, network
//! namespaces, user switching, output sinks, signal names, and the single `pre_exec` that applies
//! them all to a `std::process::Command`.
//!
//! The daemon resolves and opens everything it can in the parent ([`user::resolve_user`],
//! [`sink::open_sink`], [`cgroup::CgroupManager::create`]), fills an [`IsolationSpec`], and calls
//! [`IsolationSpec::apply`]. [`IsolationSpec::plan`] describes the same steps as data so another
//! launcher (the future Python zygote) can replay them.

pub mod cgroup;
pub mod landlock_rules;
pub mod netns;
pub mod probe;
pub mod signal;
pub mod sink;
pub mod spawn;
pub mod user;

pub use spawn::{Intrinsics, IsolationPlan, IsolationSpec, PlanStep};

use std::path::PathBuf;

/// Everything that can go wrong while preparing an isolated execution.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Landlock(#[from] landlock_rules::LandlockError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    User(#[from] user::UserError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    /// The working directory is unusable.
    #[error("working_dir {path:?}: {reason}")]
    WorkingDir { path: PathBuf, reason: String },
    /// A file the child needs could not be opened in the parent.
    #[error("cannot open {what} {path:?}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
