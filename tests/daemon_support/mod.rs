//! Shared helpers of the daemon integration tests: start the real `elide-daemon` binary on a
//! temporary socket and state dir, talk to it with the generated client, read FIFOs like
//! Nomad's logmon does.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use elide_task_driver::proto::elide::daemon::v1alpha1 as pb;
use pb::execution_api_client::ExecutionApiClient;
use tonic::transport::{Channel, Endpoint};

/// Generous deadline for anything on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub type Client = ExecutionApiClient<Channel>;

/// A running daemon under test.
pub struct TestDaemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub cgroup_parent: String,
    pub extra_args: Vec<String>,
    /// The open-file limits the daemon is started with, soft and (when given) hard, when not
    /// the harness's own.
    pub open_file_limit: Option<(u64, Option<u64>)>,
    /// A tmpfs dir of this daemon's (`/dev/shm/<name>`: its run dir and a second output root;
    /// removed on drop).
    tmpfs: Option<PathBuf>,
}

impl TestDaemon {
    /// Starts a daemon with default settings.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a daemon whose run dir (per-execution files) lies on tmpfs (`/dev/shm`), as
    /// `/run/elide/exec` does on a systemd host; state dir and the usual output root (`dir`)
    /// stay on disk, and [`Self::tmpfs_output_root`] is a second one, on tmpfs.
    pub async fn start_with_tmpfs_run_dir() -> Self {
        let mut d = Self::configure(&[]);
        let tmpfs = Path::new("/dev/shm").join(&d.cgroup_parent);
        std::fs::create_dir_all(tmpfs.join("out")).unwrap();
        d.run_dir = tmpfs.join("run");
        d.extra_args.push("--output-root".into());
        d.extra_args
            .push(tmpfs.join("out").to_string_lossy().into_owned());
        d.tmpfs = Some(tmpfs);
        d.spawn().await;
        d
    }

    /// The output root on tmpfs of a daemon from [`Self::start_with_tmpfs_run_dir`].
    pub fn tmpfs_output_root(&self) -> Option<PathBuf> {
        self.tmpfs.as_ref().map(|t| t.join("out"))
    }

    /// Starts a daemon reading `toml` as its config file (written into `dir`).
    pub async fn start_with_config(dir: &Path, toml: &str) -> Self {
        let config = dir.join("daemon.toml");
        std::fs::write(&config, toml).unwrap();
        Self::start_with(&["--config", config.to_str().unwrap()]).await
    }

    /// Starts a daemon whose soft open-file limit is `soft` (the hard limit stays), as a
    /// service manager starts one (systemd: a soft limit of 1,024).
    pub async fn start_with_open_file_limit(soft: u64) -> Self {
        Self::start_with_open_file_limits(soft, None).await
    }

    /// Starts a daemon with these open-file limits (`hard`: None keeps the harness's).
    pub async fn start_with_open_file_limits(soft: u64, hard: Option<u64>) -> Self {
        Self::start_with_args_and_open_file_limits(&[], soft, hard).await
    }

    /// Starts a daemon with extra command-line flags and these open-file limits.
    pub async fn start_with_args_and_open_file_limits(
        extra: &[&str],
        soft: u64,
        hard: Option<u64>,
    ) -> Self {
        let mut d = Self::configure(extra);
        d.open_file_limit = Some((soft, hard));
        d.spawn().await;
        d
    }

    /// Starts a daemon with extra command-line flags.
    pub async fn start_with(extra: &[&str]) -> Self {
        let mut d = Self::configure(extra);
        d.spawn().await;
        d
    }

    fn configure(extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("e")
            .tempdir_in("/tmp")
            .unwrap();
        // Task users (nobody) must reach the run dir inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("d.sock");
        let state_dir = dir.path().join("state");
        let run_dir = dir.path().join("run");
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        Self {
            child: None,
            socket,
            state_dir,
            run_dir,
            cgroup_parent: format!("elide-test-{name}"),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            open_file_limit: None,
            tmpfs: None,
            dir,
        }
    }

    /// (Re)starts the daemon process with the same dirs.
    pub async fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_elide-daemon"));
        cmd.arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--output-root")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .env("ELIDE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("daemon.log")).unwrap());
        // A harness ended by a signal (an interrupted `cargo bench`, a CI timeout) never runs
        // Drop: the kernel then sends the daemon SIGTERM when the thread that started it ends,
        // and it shuts down as usual, its zygotes, workers and cgroups with it.
        let open_files = self.open_file_limit;
        // SAFETY: prctl, getrlimit and setrlimit are async-signal-safe and touch no memory of
        // the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((soft, hard)) = open_files {
                    let mut l = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    l.rlim_cur = soft;
                    l.rlim_max = hard.unwrap_or(l.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(mut c) = self.try_client().await
                && c.get_daemon_info(pb::GetDaemonInfoRequest {}).await.is_ok()
            {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited early with {st}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not come up: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    async fn try_client(&self) -> Result<Client, tonic::transport::Error> {
        let ch = Endpoint::from_shared(format!("unix://{}", self.socket.display()))
            .unwrap()
            .connect()
            .await?;
        Ok(ExecutionApiClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    /// A new client connection.
    pub async fn client(&self) -> Client {
        self.try_client().await.unwrap()
    }

    /// Runs the operator CLI against this daemon: `elide-daemon CMD --socket SOCKET REST...`.
    pub async fn cli(&self, cmd: &str, rest: &[&std::ffi::OsStr]) -> std::process::Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_elide-daemon"));
        command
            .arg(cmd)
            .arg("--socket")
            .arg(&self.socket)
            .args(rest);
        tokio::task::spawn_blocking(move || command.output().expect("elide-daemon"))
            .await
            .expect("the CLI's thread")
    }

    /// Pid of the daemon process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A path inside the test dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl TestDaemon {
    /// Asks the daemon to stop (SIGTERM), as systemd would.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// This daemon's parent cgroup in every hierarchy that has one now.
    pub fn cgroup_parents(&self) -> Vec<PathBuf> {
        std::fs::read_dir("/sys/fs/cgroup")
            .map(|hs| {
                hs.flatten()
                    .map(|h| h.path().join(&self.cgroup_parent))
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.terminate();
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        for line in self
            .log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        {
            eprintln!("daemon log: {line}");
        }
        if let Some(t) = &self.tmpfs {
            let _ = std::fs::remove_dir_all(t);
        }
        // The daemon's parent cgroups go with its reaper (a_stopped_daemon_leaves_no_cgroup_behind).
    }
}

/// The real path of the `python3` on PATH (behind any version-manager shim).
pub fn real_python3() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Writes `text` to `path` as an executable script (a fake interpreter or tool).
pub fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The daemon's GetDaemonInfo answer.
pub async fn daemon_info(c: &mut Client) -> pb::DaemonInfo {
    c.get_daemon_info(pb::GetDaemonInfoRequest {})
        .await
        .expect("GetDaemonInfo")
        .into_inner()
}

/// What the daemon reports of its runtime for `language`.
pub async fn runtime_info(c: &mut Client, language: &str) -> pb::Runtime {
    daemon_info(c)
        .await
        .runtimes
        .into_iter()
        .find(|r| r.language == language)
        .unwrap_or_else(|| panic!("no {language} runtime reported"))
}

/// A session enabling every language and the given intrinsics, without warm pools.
pub async fn session(c: &mut Client, intrinsics: &[&str]) -> String {
    session_with_pool(c, intrinsics, 0).await
}

/// A session enabling every language and the given intrinsics, `pool` warm workers per language.
pub async fn session_with_pool(c: &mut Client, intrinsics: &[&str], pool: u32) -> String {
    session_with_config(
        c,
        pb::SessionConfig {
            enabled_intrinsics: intrinsics.iter().map(|s| s.to_string()).collect(),
            context_pool_size: pool,
            ..Default::default()
        },
    )
    .await
}

/// A session with `config`.
pub async fn session_with_config(c: &mut Client, config: pb::SessionConfig) -> String {
    c.create_session(pb::CreateSessionRequest {
        config: Some(config),
        owner: "test".into(),
        session_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .id
}

/// A capture sink.
pub fn capture() -> Option<pb::OutputSink> {
    Some(pb::OutputSink {
        kind: Some(pb::output_sink::Kind::Capture(pb::Capture {})),
    })
}

/// A path sink.
pub fn path_sink(p: &Path) -> Option<pb::OutputSink> {
    Some(pb::OutputSink {
        kind: Some(pb::output_sink::Kind::Path(p.display().to_string())),
    })
}

/// A start request for inline code with captured output.
pub fn code_req(session: &str, language: &str, code: &str) -> pb::StartExecutionRequest {
    pb::StartExecutionRequest {
        session_id: session.into(),
        language: language.into(),
        code: code.into(),
        stdout: capture(),
        stderr: capture(),
        ..Default::default()
    }
}

/// Everything captured of one stream, after the execution ended.
pub async fn output(c: &mut Client, id: &str, stream: pb::OutputStream) -> Vec<u8> {
    output_read(c, id, stream, true).await
}

/// One captured stream from its start until its stream ends: with `follow`, the execution's
/// whole output; without, what it has written so far (all of it, once it has ended).
pub async fn output_read(
    c: &mut Client,
    id: &str,
    stream: pb::OutputStream,
    follow: bool,
) -> Vec<u8> {
    let mut s = c
        .stream_output(pb::StreamOutputRequest {
            execution_id: id.into(),
            streams: vec![stream as i32],
            offset: 0,
            follow,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, s.message())
        .await
        .unwrap()
        .unwrap()
    {
        assert_eq!(chunk.offset as usize, out.len());
        out.extend_from_slice(&chunk.data);
    }
    out
}

/// The execution as GetExecution shows it.
pub async fn execution(c: &mut Client, id: &str) -> pb::Execution {
    c.get_execution(pb::GetExecutionRequest {
        execution_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// The executions of session `s` (ListExecutions).
pub async fn executions_of(c: &mut Client, s: &str) -> Vec<pb::Execution> {
    c.list_executions(pb::ListExecutionsRequest {
        session_id: s.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .executions
}

/// Stops the execution with SIGKILL at once (no grace).
pub async fn kill_now(c: &mut Client, id: &str) {
    stop_with(c, id, "KILL").await;
}

/// Stops the execution with `signal` (no grace).
pub async fn stop_with(c: &mut Client, id: &str, signal: &str) {
    c.stop_execution(pb::StopExecutionRequest {
        execution_id: id.into(),
        signal: signal.into(),
        grace: None,
    })
    .await
    .unwrap();
}

/// Waits for the execution's result.
pub async fn wait(c: &mut Client, id: &str) -> pb::ExecutionResult {
    tokio::time::timeout(
        DEADLINE,
        c.wait_execution(pb::WaitExecutionRequest {
            execution_id: id.into(),
        }),
    )
    .await
    .expect("wait timed out")
    .unwrap()
    .into_inner()
    .result
    .unwrap()
}

/// The events of session `s` from now on.
pub async fn events_of(c: &mut Client, s: &str) -> tonic::Streaming<pb::ExecutionEvent> {
    c.watch_events(pb::WatchEventsRequest {
        session_id: s.to_string(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// The next event of `kind` about execution `id`.
pub async fn next_event(
    events: &mut tonic::Streaming<pb::ExecutionEvent>,
    kind: pb::EventKind,
    id: &str,
) -> pb::ExecutionEvent {
    loop {
        let ev = tokio::time::timeout(DEADLINE, events.message())
            .await
            .unwrap_or_else(|_| panic!("no {kind:?} event for {id}"))
            .unwrap()
            .expect("the event stream goes on");
        if ev.kind() == kind && ev.execution_id == id {
            return ev;
        }
    }
}

/// Runs code to completion: (result, stdout, stderr).
pub async fn run(
    c: &mut Client,
    req: pb::StartExecutionRequest,
) -> (pb::ExecutionResult, String, String) {
    let e = c.start_execution(req).await.unwrap().into_inner();
    let out = output(c, &e.id, pb::OutputStream::Stdout).await;
    let err = output(c, &e.id, pb::OutputStream::Stderr).await;
    let r = wait(c, &e.id).await;
    (
        r,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// A FIFO with a reader thread draining it (like Nomad's logmon); join to get the bytes.
pub fn fifo_reader(path: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&p).unwrap();
        let mut out = Vec::new();
        f.read_to_end(&mut out).unwrap();
        out
    })
}

/// How many fds process `pid` holds.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

/// CPU time process `pid` has used so far (user + system), in clock ticks (100 per second).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name: state is the first, utime and stime the 12th and 13th.
    let after_comm = stat.rsplit(')').next().expect("stat fields");
    after_comm
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse::<u64>().expect("tick count"))
        .sum()
}

/// This test process's seccomp mode and number of filters (`Seccomp`, `Seccomp_filters` in
/// /proc/self/status): a container may run the tests under a filter of its own.
pub fn own_seccomp() -> (String, u32) {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (
        field("Seccomp:"),
        field("Seccomp_filters:").parse().expect("a count"),
    )
}

/// (pid, ppid, state, cmdline) of every process.
pub fn processes() -> Vec<(u32, u32, char, String)> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.to_string()) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        v.push((pid, ppid, state, cmd));
    }
    v
}

/// Every descendant of `root`, children first: (pid, state, cmdline).
pub fn all_descendants(root: u32) -> Vec<(u32, char, String)> {
    let procs = processes();
    let mut children: std::collections::HashMap<u32, Vec<usize>> = Default::default();
    for (i, p) in procs.iter().enumerate() {
        children.entry(p.1).or_default().push(i);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &i in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            let (pid, _, state, cmd) = &procs[i];
            out.push((*pid, *state, cmd.clone()));
            stack.push(*pid);
        }
    }
    out
}

/// Whether a start's refusal says the daemon ran out of descriptors and that it can be
/// retried. Which descriptor runs out first is a race: one the daemon opens (EMFILE), or a
/// pooled child's pidfd it receives (dropped by the kernel, named as the open-file limit).
pub fn refused_for_want_of_descriptors(message: &str) -> bool {
    (message.contains("Too many open files") || message.contains("its open-file limit"))
        && message.contains("can be retried")
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

/// Runs `req` until an execution of it takes the path asked for (a new session's pool warms up
/// in the background, so its first starts may run cold); a session without a pool must never
/// run pooled. The execution, its result, its stdout and its stderr.
pub async fn run_on_path(
    c: &mut Client,
    req: pb::StartExecutionRequest,
    pooled: bool,
) -> (pb::Execution, pb::ExecutionResult, String, String) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let e = c
            .start_execution(req.clone())
            .await
            .unwrap_or_else(|s| panic!("start: {s}"))
            .into_inner();
        let out = output(c, &e.id, pb::OutputStream::Stdout).await;
        let err = output(c, &e.id, pb::OutputStream::Stderr).await;
        let r = wait(c, &e.id).await;
        assert!(pooled || !e.pooled, "a session without a pool ran pooled");
        if e.pooled == pooled {
            let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
            return (e, r, text(out), text(err));
        }
        assert!(Instant::now() < deadline, "never ran pooled: {req:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` until true or the deadline.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `req` until an execution of it takes the path asked for, and returns that one; the
/// ones that took the other path are killed and waited for. Like [`run_on_path`] for
/// executions that keep running (a session without a pool must never run pooled).
pub async fn start_on_path(
    c: &mut Client,
    req: pb::StartExecutionRequest,
    pooled: bool,
) -> pb::Execution {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let e = c
            .start_execution(req.clone())
            .await
            .unwrap_or_else(|s| panic!("start: {s}"))
            .into_inner();
        assert!(pooled || !e.pooled, "a session without a pool ran pooled");
        if e.pooled == pooled {
            return e;
        }
        kill_now(c, &e.id).await;
        wait(c, &e.id).await;
        assert!(Instant::now() < deadline, "never ran pooled: {req:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status of `runtime`'s pool ("python", "node") in session `s`, as GetSession shows it.
pub async fn pool_status(c: &mut Client, s: &str, runtime: &str) -> pb::PoolStatus {
    pool_statuses(c, s)
        .await
        .into_iter()
        .find(|p| p.runtime == runtime)
        .unwrap_or_else(|| panic!("no {runtime} pool in session {s}"))
}

/// Every pool status of session `s` (GetSession).
pub async fn pool_statuses(c: &mut Client, s: &str) -> Vec<pb::PoolStatus> {
    c.get_session(pb::GetSessionRequest {
        session_id: s.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .pools
}

/// Waits until session `s` has at least `n` idle node workers (GetSession's pool status).
pub async fn idle_node_workers(c: &mut Client, s: &str, n: u32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let node = pool_status(c, s, "node").await;
        if node.idle_workers >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never {n} idle node workers: {node:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until session `s`'s python pool is warm (a start now runs on the zygote).
pub async fn python_pool_warm(c: &mut Client, s: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let python = pool_status(c, s, "python").await;
        if python.state() == pb::PoolState::Warm {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the python pool never warmed: {python:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which launch path a session exercises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Cold,
    Pooled,
}

/// Both paths, cold first.
pub const KINDS: [Kind; 2] = [Kind::Cold, Kind::Pooled];

/// A session of `kind` (`context_pool_size` 2, or 0) with `intrinsics`. Node workers need the
/// io intrinsic to take a job, so sessions that run javascript pooled ask for it.
pub async fn session_of(c: &mut Client, kind: Kind, intrinsics: &[&str]) -> String {
    let pool = if kind == Kind::Pooled { 2 } else { 0 };
    session_with_pool(c, intrinsics, pool).await
}

/// What a client says first on an HTTP/2 connection: the preface and an empty SETTINGS frame.
pub const H2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Connects to `socket`, greets it as an HTTP/2 client and prints whether the server answered.
pub fn greet_snippet(socket: &std::path::Path) -> String {
    format!(
        "import socket\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.settimeout(20)\n\
         s.connect({socket:?})\n\
         try:\n    s.sendall({hello})\n    data = s.recv(64)\n\
         except (ConnectionResetError, BrokenPipeError):\n    data = b''\n\
         print('answered' if data else 'refused')",
        socket = socket.display().to_string(),
        hello = python_bytes(H2_HELLO),
    )
}

pub fn python_bytes(b: &[u8]) -> String {
    let inner: String = b.iter().map(|c| format!("\\x{c:02x}")).collect();
    format!("b'{inner}'")
}
