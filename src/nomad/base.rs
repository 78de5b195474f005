//! The BasePlugin service: identity, config schema and SetConfig.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::config::{PluginConfig, schema};
use super::state::PluginState;
use super::{DRIVER_API_VERSION, PLUGIN_NAME, PLUGIN_VERSION};
use crate::proto::hashicorp::nomad::plugins::base::proto::{
    self as pb, base_plugin_server::BasePlugin,
};

/// Deadline for creating the session during SetConfig: the agent waits on this call.
pub const SESSION_SETUP_TIMEOUT: Duration = Duration::from_secs(3);

/// BasePlugin implementation.
#[derive(Debug, Clone)]
pub struct Base {
    state: Arc<PluginState>,
}

impl Base {
    /// A base service over shared state.
    pub fn new(state: Arc<PluginState>) -> Self {
        Self { state }
    }
}

/// PluginInfo's answer (pure: works before SetConfig).
pub fn plugin_info() -> pb::PluginInfoResponse {
    pb::PluginInfoResponse {
        r#type: pb::PluginType::Driver as i32,
        plugin_api_versions: vec![DRIVER_API_VERSION.to_string()],
        plugin_version: PLUGIN_VERSION.to_string(),
        name: PLUGIN_NAME.to_string(),
    }
}

#[tonic::async_trait]
impl BasePlugin for Base {
    async fn plugin_info(
        &self,
        _req: Request<pb::PluginInfoRequest>,
    ) -> Result<Response<pb::PluginInfoResponse>, Status> {
        Ok(Response::new(plugin_info()))
    }

    async fn config_schema(
        &self,
        _req: Request<pb::ConfigSchemaRequest>,
    ) -> Result<Response<pb::ConfigSchemaResponse>, Status> {
        Ok(Response::new(pb::ConfigSchemaResponse {
            spec: Some(schema()),
        }))
    }

    async fn set_config(
        &self,
        req: Request<pb::SetConfigRequest>,
    ) -> Result<Response<pb::SetConfigResponse>, Status> {
        let req = req.into_inner();
        let config = PluginConfig::from_msgpack(&req.msgpack_config).map_err(|e| {
            tracing::error!(error = %e, "rejected plugin config");
            Status::invalid_argument(e.to_string())
        })?;
        if !req.plugin_api_version.is_empty() && req.plugin_api_version != DRIVER_API_VERSION {
            tracing::warn!(requested = %req.plugin_api_version, "unexpected plugin API version");
        }
        if req.nomad_config.is_none() {
            // The agent's validation launch: it kills us right after, so nothing irreversible.
            tracing::debug!("plugin config validated");
            self.state.set_validated_config(config);
            return Ok(Response::new(pb::SetConfigResponse {}));
        }
        let socket = config.daemon_socket.clone();
        let dangling = config.dangling.clone();
        self.state.set_agent_config(config);
        super::dangling::arm(&self.state, dangling);
        // Connect (auto-starting the daemon if allowed) and create our session. Bounded: the
        // agent waits on SetConfig; an unfinished start goes on in the background and the
        // fingerprint loop reports the outcome.
        let state = self.state.clone();
        let setup = tokio::spawn(async move {
            let snapshot = state.snapshot();
            let r = state.link.client(&snapshot).await.map(|_| ());
            state.notify();
            r
        });
        match tokio::time::timeout(SESSION_SETUP_TIMEOUT, setup).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!(socket = %socket.display(), "daemon session ready")
            }
            Ok(Ok(Err(e))) => {
                // Not fatal: the driver reports UNHEALTHY and keeps retrying.
                tracing::warn!(error = %e, "elide-daemon not reachable at SetConfig")
            }
            Ok(Err(e)) => tracing::error!(error = %e, "daemon setup task failed"),
            Err(_) => {
                tracing::info!(socket = %socket.display(), "elide-daemon still starting; continuing in the background")
            }
        }
        self.state.notify();
        Ok(Response::new(pb::SetConfigResponse {}))
    }
}
