//! Nomad's plugin API on top of the go-plugin transport: the BasePlugin service (identity,
//! config schema, SetConfig), the Driver service, the plugin and task config schemas, and the
//! fingerprint loop that reports the daemon's health.

pub mod base;
pub mod capabilities;
pub mod config;
pub mod cty;
pub mod daemon_link;
pub mod daemon_start;
pub mod dangling;
pub mod driver;
pub mod driver_state;
pub mod fingerprint;
pub mod hclspec;
pub mod inherited;
pub mod lifecycle;
pub mod state;
pub mod task_config;
pub mod task_io;
pub mod tasks;

use std::sync::Arc;

use crate::goplugin::HandshakeConfig;
use crate::proto::hashicorp::nomad::plugins::{
    base::proto::base_plugin_server::BasePluginServer, drivers::proto::driver_server::DriverServer,
};

/// The driver name jobs use (`driver = "elide"`); keep the plugin file name identical.
pub const PLUGIN_NAME: &str = "elide";
/// Nomad's driver plugin API version we implement.
pub const DRIVER_API_VERSION: &str = "v0.1.0";
/// Our own version, reported in PluginInfo and as `driver.elide.version`.
pub const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Nomad's handshake cookie variable (`base.Handshake` upstream).
pub const MAGIC_COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
/// Nomad's handshake cookie value.
pub const MAGIC_COOKIE_VALUE: &str =
    "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";
/// Nomad's go-plugin app protocol ("0.9+ grpc based").
pub const APP_PROTOCOL_VERSION: u32 = 2;

/// Nomad's go-plugin handshake settings.
pub const HANDSHAKE: HandshakeConfig = HandshakeConfig {
    magic_cookie_key: MAGIC_COOKIE_KEY,
    magic_cookie_value: MAGIC_COOKIE_VALUE,
    protocol_versions: &[APP_PROTOCOL_VERSION],
};

/// Runs the plugin process (the body of the `elide-task-driver` binary); returns the exit code.
pub fn run() -> i32 {
    crate::goplugin::server::run(&HANDSHAKE, |shutdown| {
        let state = Arc::new(state::PluginState::new(shutdown.clone()));
        // The client sends and accepts messages up to MaxInt32; tonic defaults to 4 MiB.
        let base = BasePluginServer::new(base::Base::new(state.clone()))
            .max_decoding_message_size(i32::MAX as usize)
            .max_encoding_message_size(i32::MAX as usize);
        let driver = DriverServer::new(driver::Driver::new(state.clone()))
            .max_decoding_message_size(i32::MAX as usize)
            .max_encoding_message_size(i32::MAX as usize);
        // The daemon's executions may not drive this plugin (see `peer_guard`): known once
        // the plugin reached its daemon.
        // Never the processes above this one (the Nomad agent that launched it, a wrapper).
        let me = std::process::id();
        let check: crate::peer_guard::PeerCheck = Arc::new(move |pid| {
            if crate::peer_guard::descends_from(me, pid) {
                return None;
            }
            state
                .link
                .executions()
                .and_then(|executions| executions.sign_of(pid))
        });
        (tonic::service::Routes::new(base).add_service(driver), check)
    })
}
