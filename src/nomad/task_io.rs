//! The task streams: TaskStats (one sample per interval), TaskEvents (the daemon's execution
//! events routed to Nomad tasks), ExecTask and ExecTaskStreaming (`nomad alloc exec`, script
//! checks) over the daemon's Exec.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status, Streaming};

use super::lifecycle::daemon_status;
use super::state::PluginState;
use crate::goplugin::services::BoxStream;
use crate::proto::elide::daemon::v1alpha1 as api;
use crate::proto::hashicorp::nomad::plugins::drivers::proto as pb;

/// Shortest stats interval honoured (a typo guard against hot loops).
pub const MIN_STATS_INTERVAL: Duration = Duration::from_millis(100);
/// Combined output kept by ExecTask, like Nomad's `CheckBufSize`.
pub const EXEC_OUTPUT_CAP: usize = 4 * 1024;
/// First pause before re-watching the daemon's events after the stream broke; doubles up to
/// [`EVENTS_RETRY_MAX`] while the daemon stays away.
pub const EVENTS_RETRY: Duration = Duration::from_millis(200);
/// Longest pause between attempts to re-watch the daemon's events.
pub const EVENTS_RETRY_MAX: Duration = Duration::from_secs(5);

fn not_found(id: &str) -> Status {
    Status::not_found(format!("task with ID {id:?} not found"))
}

/// MHz of one core (Nomad's `total_ticks` is in MHz).
fn core_mhz() -> Option<f64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok();
    mhz_from(cpuinfo.as_deref(), || {
        std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").ok()
    })
}

/// The clock from /proc/cpuinfo's `cpu MHz` (x86 lists it), else from cpufreq's maximum in kHz
/// (arm64's /proc/cpuinfo lists no clock).
fn mhz_from(
    cpuinfo: Option<&str>,
    cpufreq_max_khz: impl FnOnce() -> Option<String>,
) -> Option<f64> {
    let listed = cpuinfo.and_then(|text| {
        text.lines()
            .find(|l| l.starts_with("cpu MHz"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    listed
        .filter(|v| *v > 0.0)
        .or_else(|| {
            cpufreq_max_khz()
                .and_then(|khz| khz.trim().parse::<f64>().ok())
                .map(|khz| khz / 1000.0)
        })
        .filter(|v| v.is_finite() && *v > 0.0)
}

/// Converts one daemon sample; `prev` (time, user s, system s) gives per-interval percents.
pub fn stats_of(
    s: &api::ExecutionStats,
    prev: Option<(std::time::Instant, f64, f64)>,
    now: std::time::Instant,
    mhz: Option<f64>,
) -> pb::TaskStats {
    use pb::cpu_usage::Fields as C;
    use pb::memory_usage::Fields as M;
    let has = |n: &str| s.measured.iter().any(|m| m == n);
    let mut cpu = pb::CpuUsage::default();
    if has("cpu_percent") {
        cpu.percent = s.cpu_percent;
        cpu.measured_fields.push(C::Percent as i32);
        if let Some(mhz) = mhz {
            cpu.total_ticks = s.cpu_percent / 100.0 * mhz;
            cpu.measured_fields.push(C::TotalTicks as i32);
        }
    }
    if let Some((t, user, system)) = prev
        && has("cpu_user")
        && has("cpu_system")
    {
        let dt = now.duration_since(t).as_secs_f64();
        if dt > 0.0 {
            cpu.user_mode = ((s.cpu_user_seconds - user) / dt * 100.0).max(0.0);
            cpu.system_mode = ((s.cpu_system_seconds - system) / dt * 100.0).max(0.0);
            cpu.measured_fields.push(C::UserMode as i32);
            cpu.measured_fields.push(C::SystemMode as i32);
        }
    }
    if has("throttled_periods") {
        cpu.throttled_periods = s.throttled_periods;
        cpu.measured_fields.push(C::ThrottledPeriods as i32);
    }
    if has("throttled_time") {
        cpu.throttled_time = s.throttled_time_ns;
        cpu.measured_fields.push(C::ThrottledTime as i32);
    }
    let mut mem = pb::MemoryUsage::default();
    if has("rss") {
        mem.rss = s.rss_bytes;
        mem.measured_fields.push(M::Rss as i32);
    }
    if has("memory_usage") {
        mem.usage = s.memory_usage_bytes;
        mem.measured_fields.push(M::Usage as i32);
    }
    if has("memory_max_usage") {
        mem.max_usage = s.memory_max_usage_bytes;
        mem.measured_fields.push(M::MaxUsage as i32);
    }
    let by_pid = s
        .processes
        .iter()
        .map(|(pid, p)| {
            (
                pid.to_string(),
                pb::TaskResourceUsage {
                    cpu: Some(pb::CpuUsage::default()),
                    memory: Some(pb::MemoryUsage {
                        rss: p.rss_bytes,
                        measured_fields: vec![M::Rss as i32],
                        ..Default::default()
                    }),
                },
            )
        })
        .collect();
    pb::TaskStats {
        id: String::new(),
        timestamp: Some(
            s.timestamp
                .unwrap_or_else(|| std::time::SystemTime::now().into()),
        ),
        agg_resource_usage: Some(pb::TaskResourceUsage {
            cpu: Some(cpu),
            memory: Some(mem),
        }),
        resource_usage_by_pid: by_pid,
    }
}

/// A sample with nothing measured (the daemon could not be asked, or the task ended).
pub fn empty_stats() -> pb::TaskStats {
    pb::TaskStats {
        id: String::new(),
        timestamp: Some(std::time::SystemTime::now().into()),
        agg_resource_usage: Some(pb::TaskResourceUsage {
            cpu: Some(pb::CpuUsage::default()),
            memory: Some(pb::MemoryUsage::default()),
        }),
        resource_usage_by_pid: Default::default(),
    }
}

/// TaskStats: one message per interval until the client cancels or the task is destroyed.
/// Failures never end the stream: the sample then says nothing was measured.
pub async fn task_stats(
    state: &Arc<PluginState>,
    req: pb::TaskStatsRequest,
) -> Result<Response<BoxStream<pb::TaskStatsResponse>>, Status> {
    let entry = state
        .tasks
        .get(&req.task_id)
        .ok_or_else(|| not_found(&req.task_id))?;
    let interval = req
        .collection_interval
        .as_ref()
        .map(|d| {
            Duration::new(
                d.seconds.max(0) as u64,
                d.nanos.clamp(0, 999_999_999) as u32,
            )
        })
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(1))
        .max(MIN_STATS_INTERVAL);
    let (tx, rx) = mpsc::channel(2);
    let state = state.clone();
    tokio::spawn(async move {
        let mhz = core_mhz();
        let mut prev = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = tx.closed() => return,
                () = entry.cancel.cancelled() => return,
                () = state.shutdown.cancelled() => return,
            }
            let sample = if entry.exit().is_some() {
                empty_stats()
            } else {
                match state.link.client(&state.snapshot()).await {
                    Ok(c) => match c.stats(&entry.execution_id).await {
                        Ok(s) => {
                            let now = std::time::Instant::now();
                            let out = stats_of(&s, prev, now, mhz);
                            prev = Some((now, s.cpu_user_seconds, s.cpu_system_seconds));
                            out
                        }
                        Err(e) => {
                            if e.is_unreachable() {
                                state.link.invalidate();
                            }
                            tracing::debug!(task = %entry.id, error = %e, "stats unavailable");
                            empty_stats()
                        }
                    },
                    Err(_) => empty_stats(),
                }
            };
            let msg = pb::TaskStatsResponse {
                stats: Some(sample),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// Splits a Nomad task id `<alloc_id>/<task name>/<short>` into (alloc_id, task name).
pub fn route_of(client_ref: &str) -> Option<(&str, &str)> {
    let (alloc, rest) = client_ref.split_once('/')?;
    let (name, short) = rest.rsplit_once('/')?;
    (!alloc.is_empty() && !name.is_empty() && !short.is_empty()).then_some((alloc, name))
}

fn kind_name(kind: i32) -> &'static str {
    match api::EventKind::try_from(kind).unwrap_or(api::EventKind::Unspecified) {
        api::EventKind::Queued => "queued",
        api::EventKind::Started => "started",
        api::EventKind::Exited => "exited",
        api::EventKind::OomKilled => "oom_killed",
        api::EventKind::TimedOut => "timed_out",
        api::EventKind::Signaled => "signaled",
        api::EventKind::PoolFallback => "pool_fallback",
        api::EventKind::SessionClosed => "session_closed",
        api::EventKind::Unspecified => "unspecified",
    }
}

/// The Nomad event for a daemon event, when it belongs to a Nomad task.
pub fn driver_event(ev: &api::ExecutionEvent) -> Option<pb::DriverTaskEvent> {
    let (alloc_id, task_name) = route_of(&ev.client_ref)?;
    let kind = kind_name(ev.kind);
    let mut annotations = ev.annotations.clone();
    annotations.insert("kind".into(), kind.into());
    annotations.insert("execution_id".into(), ev.execution_id.clone());
    Some(pb::DriverTaskEvent {
        task_id: ev.client_ref.clone(),
        alloc_id: alloc_id.to_string(),
        task_name: task_name.to_string(),
        timestamp: Some(
            ev.timestamp
                .unwrap_or_else(|| std::time::SystemTime::now().into()),
        ),
        message: format!("elide: {}", ev.message),
        annotations,
    })
}

/// TaskEvents: forwards the daemon's execution events for Nomad tasks. Never ends on its own
/// (the client would re-open it in a hot loop): daemon trouble means a quiet retry.
pub async fn task_events(
    state: &Arc<PluginState>,
    _req: pb::TaskEventsRequest,
) -> Result<Response<BoxStream<pb::DriverTaskEvent>>, Status> {
    let (tx, rx) = mpsc::channel(64);
    let state = state.clone();
    tokio::spawn(async move {
        let mut pause = EVENTS_RETRY;
        loop {
            let watched = async {
                let client = state.link.client(&state.snapshot()).await.ok()?;
                client.watch_events("").await.ok()
            };
            let stream = tokio::select! {
                s = watched => s,
                () = tx.closed() => return,
                () = state.shutdown.cancelled() => return,
            };
            if let Some(mut stream) = stream {
                pause = EVENTS_RETRY;
                loop {
                    let next = tokio::select! {
                        m = stream.message() => m,
                        () = tx.closed() => return,
                        () = state.shutdown.cancelled() => return,
                    };
                    match next {
                        Ok(Some(ev)) => {
                            if ev.kind == api::EventKind::Queued as i32 {
                                continue;
                            }
                            if let Some(out) = driver_event(&ev)
                                && tx.send(Ok(out)).await.is_err()
                            {
                                return;
                            }
                        }
                        _ => break,
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = tx.closed() => return,
                () = state.shutdown.cancelled() => return,
            }
            pause = (pause * 2).min(EVENTS_RETRY_MAX);
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

fn exit_result(r: &api::ExecutionResult) -> pb::ExitResult {
    pb::ExitResult {
        exit_code: r.exit_code,
        signal: r.signal,
        oom_killed: r.oom_killed,
    }
}

/// ExecTask: runs `command` in the task's context; stdout+stderr combined (first 4 KiB).
pub async fn exec_task(
    state: &Arc<PluginState>,
    req: pb::ExecTaskRequest,
) -> Result<Response<pb::ExecTaskResponse>, Status> {
    let entry = state
        .tasks
        .get(&req.task_id)
        .ok_or_else(|| not_found(&req.task_id))?;
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(Status::invalid_argument(
            "command: empty; give the program and its arguments",
        ));
    }
    let timeout = req
        .timeout
        .as_ref()
        .map(|d| {
            Duration::new(
                d.seconds.max(0) as u64,
                d.nanos.clamp(0, 999_999_999) as u32,
            )
        })
        .filter(|d| !d.is_zero());
    let client = state
        .link
        .client(&state.snapshot())
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let input = vec![
        api::ExecRequest {
            msg: Some(api::exec_request::Msg::Setup(api::ExecSetup {
                execution_id: entry.execution_id.clone(),
                command: req.command.clone(),
                tty: false,
                timeout: timeout.map(|t| prost_types::Duration {
                    seconds: t.as_secs() as i64,
                    nanos: t.subsec_nanos() as i32,
                }),
            })),
        },
        api::ExecRequest {
            msg: Some(api::exec_request::Msg::StdinClose(true)),
        },
    ];
    let run = async {
        let mut out = client
            .exec(tokio_stream::iter(input))
            .await
            .map_err(|e| daemon_status(state, &req.task_id, &e))?;
        let mut combined = Vec::new();
        let mut result = None;
        while let Some(msg) = out
            .message()
            .await
            .map_err(|s| Status::failed_precondition(format!("exec: {}", s.message())))?
        {
            match msg.msg {
                Some(api::exec_response::Msg::Stdout(d) | api::exec_response::Msg::Stderr(d)) => {
                    let room = EXEC_OUTPUT_CAP.saturating_sub(combined.len());
                    combined.extend_from_slice(&d[..d.len().min(room)]);
                }
                Some(api::exec_response::Msg::Exited(r)) => result = Some(exit_result(&r)),
                None => {}
            }
        }
        Ok::<_, Status>((combined, result))
    };
    let (stdout, result) = match timeout {
        // The daemon enforces the timeout too; this is a backstop with some slack.
        Some(t) => tokio::time::timeout(t + Duration::from_secs(5), run)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("exec in task {} timed out", req.task_id))
            })??,
        None => run.await?,
    };
    Ok(Response::new(pb::ExecTaskResponse {
        stdout,
        stderr: Vec::new(),
        result: Some(result.unwrap_or(pb::ExitResult {
            exit_code: -1,
            signal: 0,
            oom_killed: false,
        })),
    }))
}

fn io(data: Vec<u8>, close: bool) -> Option<pb::ExecTaskStreamingIoOperation> {
    Some(pb::ExecTaskStreamingIoOperation { data, close })
}

/// ExecTaskStreaming: setup first; then stdin, tty resizes and heartbeats (ignored); output
/// chunks back, both streams closed, then one `exited` message with the result.
pub async fn exec_task_streaming(
    state: &Arc<PluginState>,
    mut req: Streaming<pb::ExecTaskStreamingRequest>,
) -> Result<Response<BoxStream<pb::ExecTaskStreamingResponse>>, Status> {
    let first = req
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("setup: the stream ended before setup"))?;
    let setup = first
        .setup
        .ok_or_else(|| Status::invalid_argument("setup: the first message must carry setup"))?;
    let entry = state
        .tasks
        .get(&setup.task_id)
        .ok_or_else(|| not_found(&setup.task_id))?;
    if setup.command.is_empty() || setup.command[0].is_empty() {
        return Err(Status::invalid_argument(
            "setup.command: empty; give the program and its arguments",
        ));
    }
    let client = state
        .link
        .client(&state.snapshot())
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let (in_tx, in_rx) = mpsc::channel::<api::ExecRequest>(16);
    let _ = in_tx
        .send(api::ExecRequest {
            msg: Some(api::exec_request::Msg::Setup(api::ExecSetup {
                execution_id: entry.execution_id.clone(),
                command: setup.command.clone(),
                tty: setup.tty,
                timeout: None,
            })),
        })
        .await;
    let mut out = client
        .exec(ReceiverStream::new(in_rx))
        .await
        .map_err(|e| daemon_status(state, &setup.task_id, &e))?;
    // Client → daemon: stdin, close, resize; heartbeats (nothing set) are dropped. Ends with
    // the output side, so nothing lingers after the command exited.
    let done = tokio_util::sync::CancellationToken::new();
    let input_done = done.clone();
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                m = req.message() => match m {
                    Ok(Some(m)) => m,
                    _ => break,
                },
                () = input_done.cancelled() => return,
            };
            let msg = if let Some(size) = m.tty_size {
                Some(api::exec_request::Msg::Resize(api::TerminalSize {
                    height: size.height,
                    width: size.width,
                }))
            } else if let Some(stdin) = m.stdin {
                if !stdin.data.is_empty() {
                    let _ = in_tx
                        .send(api::ExecRequest {
                            msg: Some(api::exec_request::Msg::Stdin(stdin.data)),
                        })
                        .await;
                }
                stdin
                    .close
                    .then_some(api::exec_request::Msg::StdinClose(true))
            } else {
                None
            };
            if let Some(msg) = msg
                && in_tx
                    .send(api::ExecRequest { msg: Some(msg) })
                    .await
                    .is_err()
            {
                return;
            }
        }
        // The client stopped sending: the process keeps running until it exits (§3.16).
        tokio::select! {
            () = in_tx.closed() => {}
            () = input_done.cancelled() => {}
        }
    });
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let _done = done.drop_guard();
        let mut result = None;
        loop {
            match out.message().await {
                Ok(Some(m)) => {
                    let resp = match m.msg {
                        Some(api::exec_response::Msg::Stdout(d)) => pb::ExecTaskStreamingResponse {
                            stdout: io(d, false),
                            ..Default::default()
                        },
                        Some(api::exec_response::Msg::Stderr(d)) => pb::ExecTaskStreamingResponse {
                            stderr: io(d, false),
                            ..Default::default()
                        },
                        Some(api::exec_response::Msg::Exited(r)) => {
                            result = Some(exit_result(&r));
                            continue;
                        }
                        None => continue,
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    let _ = tx
                        .send(Err(Status::failed_precondition(format!(
                            "exec: {}",
                            s.message()
                        ))))
                        .await;
                    return;
                }
            }
        }
        let closing = [
            pb::ExecTaskStreamingResponse {
                stdout: io(Vec::new(), true),
                ..Default::default()
            },
            pb::ExecTaskStreamingResponse {
                stderr: io(Vec::new(), true),
                ..Default::default()
            },
            pb::ExecTaskStreamingResponse {
                exited: true,
                result: Some(result.unwrap_or(pb::ExitResult {
                    exit_code: -1,
                    signal: 0,
                    oom_killed: false,
                })),
                ..Default::default()
            },
        ];
        for m in closing {
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(
        ReceiverStream::new(rx).map(|m: Result<_, Status>| m),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_nomad_task_ids() {
        assert_eq!(route_of("a1/web/xyz"), Some(("a1", "web")));
        assert_eq!(route_of("a1/we/b/xyz"), Some(("a1", "we/b")));
        assert_eq!(route_of("cli"), None);
        assert_eq!(route_of(""), None);
        assert_eq!(route_of("a//x"), None);
    }

    #[test]
    fn core_clock_from_cpuinfo_or_cpufreq() {
        let x86 = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2450.000\n";
        let arm64 = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n";
        let never = || -> Option<String> { panic!("cpufreq read although cpuinfo had the clock") };
        assert_eq!(mhz_from(Some(x86), never), Some(2450.0));
        assert_eq!(
            mhz_from(Some(arm64), || Some("2000000\n".into())),
            Some(2000.0)
        );
        assert_eq!(mhz_from(None, || Some("1500000".into())), Some(1500.0));
        // A zero clock (some VMs) falls through to cpufreq.
        let zero = "cpu MHz\t\t: 0.000\n";
        assert_eq!(
            mhz_from(Some(zero), || Some("3000000".into())),
            Some(3000.0)
        );
        assert_eq!(mhz_from(Some(arm64), || None), None);
        assert_eq!(mhz_from(Some(arm64), || Some("fast".into())), None);
        assert_eq!(mhz_from(Some(arm64), || Some("0".into())), None);
    }

    #[test]
    fn stats_report_only_measured_fields() {
        let s = api::ExecutionStats {
            cpu_percent: 50.0,
            rss_bytes: 1000,
            cpu_user_seconds: 2.0,
            cpu_system_seconds: 1.0,
            measured: vec![
                "cpu_percent".into(),
                "rss".into(),
                "cpu_user".into(),
                "cpu_system".into(),
            ],
            ..Default::default()
        };
        let now = std::time::Instant::now();
        let t = stats_of(&s, None, now, Some(2000.0));
        let agg = t.agg_resource_usage.unwrap();
        let cpu = agg.cpu.unwrap();
        assert_eq!(cpu.percent, 50.0);
        assert_eq!(cpu.total_ticks, 1000.0);
        assert!(
            !cpu.measured_fields
                .contains(&(pb::cpu_usage::Fields::UserMode as i32))
        );
        let mem = agg.memory.unwrap();
        assert_eq!(mem.rss, 1000);
        assert_eq!(
            mem.measured_fields,
            vec![pb::memory_usage::Fields::Rss as i32]
        );
        assert!(t.timestamp.is_some());
        let later = now + Duration::from_secs(1);
        let s2 = api::ExecutionStats {
            cpu_user_seconds: 2.5,
            ..s
        };
        let t2 = stats_of(&s2, Some((now, 2.0, 1.0)), later, None);
        let cpu2 = t2.agg_resource_usage.unwrap().cpu.unwrap();
        assert!((cpu2.user_mode - 50.0).abs() < 1e-6);
    }
}
