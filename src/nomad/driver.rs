//! The Driver service surface. Each RPC delegates to one function: schema, capabilities and
//! fingerprint live here; task RPCs live in [`super::lifecycle`].

use std::sync::Arc;

use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::lifecycle;
use super::state::PluginState;
use crate::goplugin::services::BoxStream;
use crate::proto::hashicorp::nomad::plugins::drivers::proto::{self as pb, driver_server};

/// Driver implementation over shared plugin state.
#[derive(Debug, Clone)]
pub struct Driver {
    state: Arc<PluginState>,
}

impl Driver {
    /// A driver over `state`.
    pub fn new(state: Arc<PluginState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl driver_server::Driver for Driver {
    type FingerprintStream = BoxStream<pb::FingerprintResponse>;
    type TaskStatsStream = BoxStream<pb::TaskStatsResponse>;
    type TaskEventsStream = BoxStream<pb::DriverTaskEvent>;
    type ExecTaskStreamingStream = BoxStream<pb::ExecTaskStreamingResponse>;

    async fn init(
        &self,
        _req: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        Ok(Response::new(pb::InitResponse {}))
    }

    async fn shutdown(
        &self,
        _req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        // A notice only: tasks must keep running across agent restarts.
        tracing::debug!("driver shutdown notice from the Nomad client");
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    async fn task_config_schema(
        &self,
        _req: Request<pb::TaskConfigSchemaRequest>,
    ) -> Result<Response<pb::TaskConfigSchemaResponse>, Status> {
        Ok(Response::new(pb::TaskConfigSchemaResponse {
            spec: Some(super::task_config::schema()),
        }))
    }

    async fn capabilities(
        &self,
        _req: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        Ok(Response::new(pb::CapabilitiesResponse {
            capabilities: Some(super::capabilities::capabilities(
                self.state
                    .snapshot()
                    .config
                    .as_ref()
                    .is_some_and(|c| c.dynamic_workload_users),
            )),
        }))
    }

    async fn fingerprint(
        &self,
        _req: Request<pb::FingerprintRequest>,
    ) -> Result<Response<Self::FingerprintStream>, Status> {
        let rx = super::fingerprint::spawn(self.state.clone());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }

    async fn recover_task(
        &self,
        req: Request<pb::RecoverTaskRequest>,
    ) -> Result<Response<pb::RecoverTaskResponse>, Status> {
        lifecycle::recover_task(&self.state, req.into_inner()).await
    }

    async fn start_task(
        &self,
        req: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::StartTaskResponse>, Status> {
        lifecycle::start_task(&self.state, req.into_inner()).await
    }

    async fn wait_task(
        &self,
        req: Request<pb::WaitTaskRequest>,
    ) -> Result<Response<pb::WaitTaskResponse>, Status> {
        lifecycle::wait_task(&self.state, req.into_inner()).await
    }

    async fn stop_task(
        &self,
        req: Request<pb::StopTaskRequest>,
    ) -> Result<Response<pb::StopTaskResponse>, Status> {
        lifecycle::stop_task(&self.state, req.into_inner()).await
    }

    async fn destroy_task(
        &self,
        req: Request<pb::DestroyTaskRequest>,
    ) -> Result<Response<pb::DestroyTaskResponse>, Status> {
        lifecycle::destroy_task(&self.state, req.into_inner()).await
    }

    async fn inspect_task(
        &self,
        req: Request<pb::InspectTaskRequest>,
    ) -> Result<Response<pb::InspectTaskResponse>, Status> {
        lifecycle::inspect_task(&self.state, req.into_inner()).await
    }

    async fn task_stats(
        &self,
        req: Request<pb::TaskStatsRequest>,
    ) -> Result<Response<Self::TaskStatsStream>, Status> {
        lifecycle::task_stats(&self.state, req.into_inner()).await
    }

    async fn task_events(
        &self,
        req: Request<pb::TaskEventsRequest>,
    ) -> Result<Response<Self::TaskEventsStream>, Status> {
        lifecycle::task_events(&self.state, req.into_inner()).await
    }

    async fn signal_task(
        &self,
        req: Request<pb::SignalTaskRequest>,
    ) -> Result<Response<pb::SignalTaskResponse>, Status> {
        lifecycle::signal_task(&self.state, req.into_inner()).await
    }

    async fn exec_task(
        &self,
        req: Request<pb::ExecTaskRequest>,
    ) -> Result<Response<pb::ExecTaskResponse>, Status> {
        lifecycle::exec_task(&self.state, req.into_inner()).await
    }

    async fn exec_task_streaming(
        &self,
        req: Request<Streaming<pb::ExecTaskStreamingRequest>>,
    ) -> Result<Response<Self::ExecTaskStreamingStream>, Status> {
        lifecycle::exec_task_streaming(&self.state, req.into_inner()).await
    }

    async fn create_network(
        &self,
        req: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::CreateNetworkResponse>, Status> {
        lifecycle::create_network(&self.state, req.into_inner()).await
    }

    async fn destroy_network(
        &self,
        req: Request<pb::DestroyNetworkRequest>,
    ) -> Result<Response<pb::DestroyNetworkResponse>, Status> {
        lifecycle::destroy_network(&self.state, req.into_inner()).await
    }
}
