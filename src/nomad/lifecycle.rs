//! Task lifecycle RPCs. Placeholders until the task-lifecycle work lands: each answers
//! `Unimplemented` at once (never hangs, never crashes). Replace a function here to implement
//! its RPC; `driver.rs` only delegates.

use std::sync::Arc;

use tonic::{Response, Status, Streaming};

use super::state::PluginState;
use crate::goplugin::services::BoxStream;
use crate::proto::hashicorp::nomad::plugins::drivers::proto as pb;

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not implemented yet by the elide driver (task lifecycle pending)"
    ))
}

/// RecoverTask.
pub async fn recover_task(
    _state: &Arc<PluginState>,
    _req: pb::RecoverTaskRequest,
) -> Result<Response<pb::RecoverTaskResponse>, Status> {
    Err(not_yet("RecoverTask"))
}

/// StartTask.
pub async fn start_task(
    _state: &Arc<PluginState>,
    _req: pb::StartTaskRequest,
) -> Result<Response<pb::StartTaskResponse>, Status> {
    Err(not_yet("StartTask"))
}

/// WaitTask.
pub async fn wait_task(
    _state: &Arc<PluginState>,
    _req: pb::WaitTaskRequest,
) -> Result<Response<pb::WaitTaskResponse>, Status> {
    Err(not_yet("WaitTask"))
}

/// StopTask.
pub async fn stop_task(
    _state: &Arc<PluginState>,
    _req: pb::StopTaskRequest,
) -> Result<Response<pb::StopTaskResponse>, Status> {
    Err(not_yet("StopTask"))
}

/// DestroyTask.
pub async fn destroy_task(
    _state: &Arc<PluginState>,
    _req: pb::DestroyTaskRequest,
) -> Result<Response<pb::DestroyTaskResponse>, Status> {
    Err(not_yet("DestroyTask"))
}

/// InspectTask.
pub async fn inspect_task(
    _state: &Arc<PluginState>,
    _req: pb::InspectTaskRequest,
) -> Result<Response<pb::InspectTaskResponse>, Status> {
    Err(not_yet("InspectTask"))
}

/// TaskStats.
pub async fn task_stats(
    _state: &Arc<PluginState>,
    _req: pb::TaskStatsRequest,
) -> Result<Response<BoxStream<pb::TaskStatsResponse>>, Status> {
    Err(not_yet("TaskStats"))
}

/// TaskEvents: a long-lived stream the client re-opens at once if it ends, so it stays open
/// (silent: no tasks yet) until the client cancels or the plugin stops.
pub async fn task_events(
    state: &Arc<PluginState>,
    _req: pb::TaskEventsRequest,
) -> Result<Response<BoxStream<pb::DriverTaskEvent>>, Status> {
    Ok(Response::new(crate::goplugin::services::silent_until(
        state.shutdown.clone(),
    )))
}

/// SignalTask.
pub async fn signal_task(
    _state: &Arc<PluginState>,
    _req: pb::SignalTaskRequest,
) -> Result<Response<pb::SignalTaskResponse>, Status> {
    Err(not_yet("SignalTask"))
}

/// ExecTask.
pub async fn exec_task(
    _state: &Arc<PluginState>,
    _req: pb::ExecTaskRequest,
) -> Result<Response<pb::ExecTaskResponse>, Status> {
    Err(not_yet("ExecTask"))
}

/// ExecTaskStreaming.
pub async fn exec_task_streaming(
    _state: &Arc<PluginState>,
    _req: Streaming<pb::ExecTaskStreamingRequest>,
) -> Result<Response<BoxStream<pb::ExecTaskStreamingResponse>>, Status> {
    Err(not_yet("ExecTaskStreaming"))
}

/// CreateNetwork: not advertised (`must_create_network = false`).
pub async fn create_network(
    _state: &Arc<PluginState>,
    _req: pb::CreateNetworkRequest,
) -> Result<Response<pb::CreateNetworkResponse>, Status> {
    Err(Status::unimplemented(
        "CreateNetwork: the elide driver does not create networks (must_create_network = false)",
    ))
}

/// DestroyNetwork: not advertised.
pub async fn destroy_network(
    _state: &Arc<PluginState>,
    _req: pb::DestroyNetworkRequest,
) -> Result<Response<pb::DestroyNetworkResponse>, Status> {
    Err(Status::unimplemented(
        "DestroyNetwork: the elide driver does not create networks (must_create_network = false)",
    ))
}
