//! Exec: runs a command inside a running execution's context — same cwd, environment, user,
//! cgroup, network namespace and filesystem confinement — over a bidirectional stream carrying
//! stdin, resize events, stdout/stderr and finally the exit result. With `tty`, the command gets
//! a pseudo-terminal as its controlling terminal (stdout and stderr then share it).

use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Status;

use super::error::DaemonError;
use super::execution::Phase;
use super::launcher::{ProcessExit, plan_isolation};
use super::plan::duration;
use super::service::Daemon;
use crate::proto::elide::daemon::v1alpha1 as pb;
use crate::sandbox::Role;

type Out = Pin<Box<dyn Stream<Item = Result<pb::ExecResponse, Status>> + Send + 'static>>;

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);

fn resize(fd: &OwnedFd, size: &pb::TerminalSize) {
    let ws = libc::winsize {
        ws_row: size.height.clamp(0, u16::MAX as i32) as u16,
        ws_col: size.width.clamp(0, u16::MAX as i32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: fd is an open pty master and ws a valid winsize.
    let _ = unsafe { set_winsize(fd.as_raw_fd(), &ws) };
}

fn dev_null() -> Result<OwnedFd, Status> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| Status::internal(format!("opening /dev/null: {e}")))
}

async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    tx: mpsc::Sender<Result<pb::ExecResponse, Status>>,
    wrap: fn(Vec<u8>) -> pb::exec_response::Msg,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            // EIO on a pty master means the slave side is gone: the same as EOF.
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let msg = pb::ExecResponse {
                    msg: Some(wrap(buf[..n].to_vec())),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Starts the Exec stream: reads the setup, spawns the command, and returns the response stream.
pub async fn exec(
    daemon: Arc<Daemon>,
    mut input: tonic::Streaming<pb::ExecRequest>,
) -> Result<Out, Status> {
    let first = input.message().await?.ok_or_else(|| {
        Status::invalid_argument("setup: the stream ended before the setup message")
    })?;
    let Some(pb::exec_request::Msg::Setup(setup)) = first.msg else {
        return Err(DaemonError::invalid("setup", "the first message must carry setup").into());
    };
    if setup.command.is_empty() || setup.command[0].is_empty() {
        return Err(
            DaemonError::invalid("setup.command", "is empty; element 0 is the program").into(),
        );
    }
    if let Some((i, _)) = setup
        .command
        .iter()
        .enumerate()
        .find(|(_, a)| a.contains('\0'))
    {
        return Err(
            DaemonError::invalid(format!("setup.command[{i}]"), "contains a NUL byte").into(),
        );
    }
    let timeout = match &setup.timeout {
        Some(d) => Some(duration("setup.timeout", d)?).filter(|d| !d.is_zero()),
        None => None,
    };
    let e = daemon.execution(&setup.execution_id)?;
    if e.phase() != Phase::Running {
        return Err(DaemonError::FailedPrecondition(format!(
            "execution_id: execution {:?} is not running (it has ended); exec needs a running execution",
            setup.execution_id
        ))
        .into());
    }
    let Some(plan) = e.plan.clone() else {
        return Err(DaemonError::FailedPrecondition(format!(
            "execution {:?} has no context to exec in",
            setup.execution_id
        ))
        .into());
    };
    let pid = e.pid();

    // The pty (or pipes) and the command.
    let mut cmd = std::process::Command::new(&setup.command[0]);
    cmd.args(&setup.command[1..]);
    cmd.env_clear();
    cmd.envs(plan.env.iter().map(|(k, v)| (k, v)));
    let mut spec = plan_isolation(&plan, e.cgroup_procs(), dev_null()?, dev_null()?);
    // Always join the execution's own namespace, whether private or the host's.
    spec.intrinsics.net = true;
    spec.network_namespace = Some(format!("/proc/{pid}/ns/net").into());
    // The operator's session must reach the task's processes (signal them, attach a
    // debugger), which a domain of its own would shut out.
    spec.role = Role::ExecSession;
    let program = setup.command[0].clone();
    let tty = setup.tty;
    // Isolation, pty and fork all happen on the spawner thread (blocking work, and the forking
    // thread must outlive the child for PDEATHSIG).
    let spawned = daemon
        .spawner()
        .run(
            move || -> Result<(tokio::process::Child, Option<OwnedFd>), Status> {
                spec.apply(&mut cmd)
                    .map_err(|err| Status::internal(format!("preparing exec isolation: {err}")))?;
                let mut master = None;
                if tty {
                    let pty = nix::pty::openpty(None, None)
                        .map_err(|err| Status::internal(format!("openpty: {err}")))?;
                    let dup =
                        |fd: &OwnedFd| fd.try_clone().map_err(|e| Status::internal(e.to_string()));
                    cmd.stdin(dup(&pty.slave)?);
                    cmd.stdout(dup(&pty.slave)?);
                    cmd.stderr(pty.slave);
                    // SAFETY: one ioctl on fd 0, async-signal-safe; runs after the sandbox's setsid.
                    unsafe {
                        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    master = Some(pty.master);
                } else {
                    cmd.stdin(std::process::Stdio::piped());
                    cmd.stdout(std::process::Stdio::piped());
                    cmd.stderr(std::process::Stdio::piped());
                }
                let child = tokio::process::Command::from(cmd).spawn().map_err(|err| {
                    Status::from(DaemonError::invalid(
                        "setup.command",
                        format!("starting {program:?}: {err}"),
                    ))
                })?;
                Ok((child, master))
            },
        )
        .await
        .map_err(|err| Status::internal(err.to_string()))?;
    let (mut child, master) = spawned?;
    drop(e);

    let (tx, rx) = mpsc::channel::<Result<pb::ExecResponse, Status>>(32);
    let mut readers = Vec::new();
    let mut stdin_writer: Option<Pin<Box<dyn AsyncWrite + Send>>> = None;
    let mut master_ctl: Option<OwnedFd> = None;
    if let Some(m) = master {
        let set_nonblocking = |fd: &OwnedFd| -> Result<(), Status> {
            let fl = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
                .map_err(|e| Status::internal(e.to_string()))?;
            let fl = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(fl))
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(())
        };
        set_nonblocking(&m)?;
        let read_half = m.try_clone().map_err(|e| Status::internal(e.to_string()))?;
        let write_half = m.try_clone().map_err(|e| Status::internal(e.to_string()))?;
        let r = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(read_half)
            .map_err(|e| Status::internal(format!("pty: {e}")))?;
        let w = tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(write_half)
            .map_err(|e| Status::internal(format!("pty: {e}")))?;
        readers.push(tokio::spawn(pump(
            r,
            tx.clone(),
            pb::exec_response::Msg::Stdout,
        )));
        stdin_writer = Some(Box::pin(w));
        master_ctl = Some(m);
    } else {
        if let Some(o) = child.stdout.take() {
            readers.push(tokio::spawn(pump(
                o,
                tx.clone(),
                pb::exec_response::Msg::Stdout,
            )));
        }
        if let Some(o) = child.stderr.take() {
            readers.push(tokio::spawn(pump(
                o,
                tx.clone(),
                pb::exec_response::Msg::Stderr,
            )));
        }
        if let Some(i) = child.stdin.take() {
            stdin_writer = Some(Box::pin(i));
        }
    }

    // Client → command.
    let stdin_task = tokio::spawn(async move {
        let mut stdin_writer = stdin_writer;
        while let Some(Ok(req)) = input.next().await {
            match req.msg {
                Some(pb::exec_request::Msg::Stdin(bytes)) => {
                    if let Some(w) = stdin_writer.as_mut()
                        && w.write_all(&bytes).await.is_err()
                    {
                        stdin_writer = None;
                    }
                }
                Some(pb::exec_request::Msg::StdinClose(true)) => {
                    if let Some(mut w) = stdin_writer.take() {
                        let _ = w.shutdown().await;
                    }
                }
                Some(pb::exec_request::Msg::Resize(size)) => {
                    if let Some(m) = &master_ctl {
                        resize(m, &size);
                    }
                }
                _ => {}
            }
        }
    });

    // Command → client, then the result.
    tokio::spawn(async move {
        let child_pid = child.id().unwrap_or(0);
        let mut timed_out = false;
        let kill_group = || {
            if child_pid != 0 {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(child_pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        };
        let limit = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        // The command ends by itself, by its timeout, or when the client goes away (nobody
        // would ever read its output or result).
        let status = tokio::select! {
            s = child.wait() => s,
            _ = limit => {
                timed_out = true;
                kill_group();
                child.wait().await
            }
            _ = tx.closed() => {
                kill_group();
                child.wait().await
            }
        };
        // Output still buffered in the pipes is delivered before the result.
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        stdin_task.abort();
        let result = match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (Some(c), _) => exit_result(ProcessExit::Exited(c), timed_out),
                    (None, Some(sig)) => exit_result(ProcessExit::Signaled(sig), timed_out),
                    _ => exit_result(ProcessExit::Exited(-1), timed_out),
                }
            }
            Err(err) => pb::ExecutionResult {
                exit_code: -1,
                error: format!("waiting for the command failed: {err}"),
                ..Default::default()
            },
        };
        let _ = tx
            .send(Ok(pb::ExecResponse {
                msg: Some(pb::exec_response::Msg::Exited(result)),
            }))
            .await;
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

fn exit_result(e: ProcessExit, timed_out: bool) -> pb::ExecutionResult {
    match e {
        ProcessExit::Exited(c) => pb::ExecutionResult {
            exit_code: c,
            timed_out,
            ..Default::default()
        },
        ProcessExit::Signaled(s) => pb::ExecutionResult {
            exit_code: 128 + s,
            signal: s,
            timed_out,
            ..Default::default()
        },
    }
}
