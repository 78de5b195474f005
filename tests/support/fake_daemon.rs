//! A minimal fake ExecutionAPI (GetDaemonInfo, CreateSession, GetSession) on a real Unix
//! socket, for fingerprint health transitions, plus a StartExecution that answers after a set
//! delay and recorded StopExecution/RemoveExecution, for a StartTask that Nomad cancels. Every
//! other RPC answers Unimplemented.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elide_task_driver::proto::elide::daemon::v1alpha1::{
    self as api,
    execution_api_server::{ExecutionApi, ExecutionApiServer},
};
use futures::Stream;
use std::pin::Pin;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

type S<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Calls the fake saw, for assertions.
#[derive(Debug, Default)]
pub struct Calls {
    pub create_session: Vec<api::CreateSessionRequest>,
    pub get_session: usize,
    pub daemon_info: usize,
    /// Ids of the executions StartExecution started, in order.
    pub started: Vec<String>,
    pub stop_execution: Vec<api::StopExecutionRequest>,
    pub remove_execution: Vec<api::RemoveExecutionRequest>,
}

#[derive(Clone, Default)]
struct Fake {
    sessions: Arc<Mutex<HashMap<String, api::Session>>>,
    calls: Arc<Mutex<Calls>>,
    start_delay: Arc<Mutex<Duration>>,
}

/// A running fake daemon; stops (and removes its socket) on drop.
pub struct FakeDaemon {
    pub socket: PathBuf,
    calls: Arc<Mutex<Calls>>,
    start_delay: Arc<Mutex<Duration>>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl FakeDaemon {
    /// Serves on `socket` (removing a stale file first).
    pub async fn start(socket: &Path) -> FakeDaemon {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).expect("bind fake daemon socket");
        let fake = Fake::default();
        let calls = fake.calls.clone();
        let start_delay = fake.start_delay.clone();
        let token = CancellationToken::new();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let t = token.clone();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ExecutionApiServer::new(fake))
                .serve_with_incoming_shutdown(incoming, t.cancelled_owned())
                .await;
        });
        FakeDaemon {
            socket: socket.to_path_buf(),
            calls,
            start_delay,
            token,
            task,
        }
    }

    /// How long StartExecution takes to answer after it has started the execution.
    pub fn set_start_delay(&self, delay: Duration) {
        *self.start_delay.lock().unwrap() = delay;
    }

    /// What the fake has seen so far, for assertions.
    pub fn with_calls<T>(&self, f: impl FnOnce(&Calls) -> T) -> T {
        f(&self.calls.lock().unwrap())
    }

    /// Number of CreateSession calls so far.
    pub fn create_session_calls(&self) -> Vec<api::CreateSessionRequest> {
        self.calls.lock().unwrap().create_session.clone()
    }

    /// Stops serving and removes the socket, like a daemon that went away.
    pub async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn unimpl<T>() -> Result<T, Status> {
    Err(Status::unimplemented("fake daemon"))
}

#[tonic::async_trait]
impl ExecutionApi for Fake {
    async fn get_daemon_info(
        &self,
        _r: Request<api::GetDaemonInfoRequest>,
    ) -> Result<Response<api::DaemonInfo>, Status> {
        self.calls.lock().unwrap().daemon_info += 1;
        let rt = |lang: &str, version: &str, available: bool| api::Runtime {
            language: lang.into(),
            version: version.into(),
            available,
            backend: "native".into(),
            ..Default::default()
        };
        Ok(Response::new(api::DaemonInfo {
            version: "9.9.9-fake".into(),
            api_version: "v1alpha1".into(),
            runtimes: vec![
                rt("python", "3.11.7", true),
                rt("javascript", "v20.20.2", true),
                rt("typescript", "v20.20.2", false),
            ],
            cgroup_mode: "v1".into(),
            ..Default::default()
        }))
    }
    async fn create_session(
        &self,
        r: Request<api::CreateSessionRequest>,
    ) -> Result<Response<api::Session>, Status> {
        let req = r.into_inner();
        self.calls.lock().unwrap().create_session.push(req.clone());
        let id = if req.session_id.is_empty() {
            "generated".to_string()
        } else {
            req.session_id.clone()
        };
        let mut sessions = self.sessions.lock().unwrap();
        if sessions.contains_key(&id) {
            return Err(Status::already_exists(format!("session {id} exists")));
        }
        let s = api::Session {
            id: id.clone(),
            config: req.config,
            owner: req.owner,
            ..Default::default()
        };
        sessions.insert(id, s.clone());
        Ok(Response::new(s))
    }
    async fn get_session(
        &self,
        r: Request<api::GetSessionRequest>,
    ) -> Result<Response<api::Session>, Status> {
        self.calls.lock().unwrap().get_session += 1;
        let id = r.into_inner().session_id;
        self.sessions
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no session {id}")))
    }
    async fn list_sessions(
        &self,
        _r: Request<api::ListSessionsRequest>,
    ) -> Result<Response<api::ListSessionsResponse>, Status> {
        unimpl()
    }
    async fn close_session(
        &self,
        _r: Request<api::CloseSessionRequest>,
    ) -> Result<Response<api::CloseSessionResponse>, Status> {
        unimpl()
    }
    async fn start_execution(
        &self,
        r: Request<api::StartExecutionRequest>,
    ) -> Result<Response<api::Execution>, Status> {
        let req = r.into_inner();
        // Started (committed) before the delay: the answer comes whether or not the caller
        // is still there, like a daemon that had already launched the snippet.
        let id = {
            let mut calls = self.calls.lock().unwrap();
            let id = format!("e-fake-{}", calls.started.len() + 1);
            calls.started.push(id.clone());
            id
        };
        let delay = *self.start_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        Ok(Response::new(api::Execution {
            id,
            session_id: req.session_id,
            state: api::ExecutionState::Running as i32,
            pid: 4242,
            ..Default::default()
        }))
    }
    async fn get_execution(
        &self,
        _r: Request<api::GetExecutionRequest>,
    ) -> Result<Response<api::Execution>, Status> {
        unimpl()
    }
    async fn list_executions(
        &self,
        _r: Request<api::ListExecutionsRequest>,
    ) -> Result<Response<api::ListExecutionsResponse>, Status> {
        unimpl()
    }
    async fn wait_execution(
        &self,
        _r: Request<api::WaitExecutionRequest>,
    ) -> Result<Response<api::WaitExecutionResponse>, Status> {
        unimpl()
    }
    type StreamOutputStream = S<api::OutputChunk>;
    async fn stream_output(
        &self,
        _r: Request<api::StreamOutputRequest>,
    ) -> Result<Response<Self::StreamOutputStream>, Status> {
        unimpl()
    }
    async fn signal_execution(
        &self,
        _r: Request<api::SignalExecutionRequest>,
    ) -> Result<Response<api::SignalExecutionResponse>, Status> {
        unimpl()
    }
    async fn stop_execution(
        &self,
        r: Request<api::StopExecutionRequest>,
    ) -> Result<Response<api::StopExecutionResponse>, Status> {
        let req = r.into_inner();
        self.calls.lock().unwrap().stop_execution.push(req);
        Ok(Response::new(api::StopExecutionResponse::default()))
    }
    async fn get_execution_stats(
        &self,
        _r: Request<api::GetExecutionStatsRequest>,
    ) -> Result<Response<api::ExecutionStats>, Status> {
        unimpl()
    }
    async fn remove_execution(
        &self,
        r: Request<api::RemoveExecutionRequest>,
    ) -> Result<Response<api::RemoveExecutionResponse>, Status> {
        let req = r.into_inner();
        self.calls.lock().unwrap().remove_execution.push(req);
        Ok(Response::new(api::RemoveExecutionResponse::default()))
    }
    type WatchEventsStream = S<api::ExecutionEvent>;
    async fn watch_events(
        &self,
        _r: Request<api::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        unimpl()
    }
    type ExecStream = S<api::ExecResponse>;
    async fn exec(
        &self,
        _r: Request<Streaming<api::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        unimpl()
    }
}
