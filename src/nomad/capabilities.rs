//! What the driver advertises: only what works (fact sheet §3.18).
//!
//! - signals and exec go through the daemon to the execution's process group / context;
//! - no filesystem isolation of the task dir (tasks see host paths: `fs_isolation = NONE`;
//!   Landlock confinement is an intrinsic, not a chroot);
//! - host networking, and group networking (bridge/cni) by joining the netns Nomad made;
//! - no volume mounts placed into the snippet's view;
//! - Nomad's logmon collects the logs from the FIFOs the executions write.

use crate::proto::hashicorp::nomad::plugins::drivers::proto::{
    DriverCapabilities, driver_capabilities, network_isolation_spec::NetworkIsolationMode,
};

/// The capabilities; `dynamic_workload_users` as the plugin config says (off until SetConfig).
pub fn capabilities(dynamic_workload_users: bool) -> DriverCapabilities {
    DriverCapabilities {
        send_signals: true,
        exec: true,
        fs_isolation: driver_capabilities::FsIsolation::None as i32,
        // Group mode: the execution joins the netns Nomad created for the allocation.
        network_isolation_modes: vec![
            NetworkIsolationMode::Host as i32,
            NetworkIsolationMode::Group as i32,
        ],
        must_create_network: false,
        // Snippets do not get volume mounts placed into their view of the filesystem.
        mount_configs: driver_capabilities::MountConfigs::NoMounts as i32,
        disable_log_collection: false,
        // A task without `user` then gets `nomad-<N>`, which StartTask honours like any user.
        dynamic_workload_users,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_honest() {
        let c = capabilities(false);
        assert!(!c.dynamic_workload_users);
        assert!(capabilities(true).dynamic_workload_users);
        assert!(c.send_signals && c.exec && !c.must_create_network);
        assert!(!c.disable_log_collection);
        assert_eq!(
            c.fs_isolation,
            driver_capabilities::FsIsolation::None as i32
        );
        assert_eq!(
            c.network_isolation_modes,
            vec![
                NetworkIsolationMode::Host as i32,
                NetworkIsolationMode::Group as i32
            ]
        );
        assert_eq!(
            c.mount_configs,
            driver_capabilities::MountConfigs::NoMounts as i32
        );
    }
}
