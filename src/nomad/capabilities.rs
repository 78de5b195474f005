//! What the driver advertises: only what works today. The task-lifecycle work raises these as
//! features land.

use crate::proto::hashicorp::nomad::plugins::drivers::proto::{
    DriverCapabilities, driver_capabilities, network_isolation_spec::NetworkIsolationMode,
};

/// The current capabilities.
pub fn capabilities() -> DriverCapabilities {
    DriverCapabilities {
        send_signals: false,
        exec: false,
        fs_isolation: driver_capabilities::FsIsolation::None as i32,
        // Host networking only; group (bridge) mode needs the daemon to join the netns.
        network_isolation_modes: vec![NetworkIsolationMode::Host as i32],
        must_create_network: false,
        // Snippets do not get volume mounts placed into their view of the filesystem.
        mount_configs: driver_capabilities::MountConfigs::NoMounts as i32,
        disable_log_collection: false,
        dynamic_workload_users: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_honest_for_the_foundation() {
        let c = capabilities();
        assert!(!c.send_signals && !c.exec && !c.must_create_network);
        assert_eq!(
            c.fs_isolation,
            driver_capabilities::FsIsolation::None as i32
        );
        assert_eq!(
            c.network_isolation_modes,
            vec![NetworkIsolationMode::Host as i32]
        );
        assert_eq!(
            c.mount_configs,
            driver_capabilities::MountConfigs::NoMounts as i32
        );
    }
}
