//! Helpers of the lifecycle tests: a Nomad-like allocation dir (task dir, logmon FIFOs read
//! by a thread like logmon does), TaskConfig building with the job `config {}` encoded from
//! the plugin's own TaskConfigSchema, and a configured plugin talking to a real daemon.
//!
//! Use with `mod support; mod lifecycle_support;` (and `#[path] mod daemon_support;`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto as pb;
use serde_json::{Value, json};

use crate::support::{self, NomadClient};

/// Generous deadline for anything on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Bytes a logmon-like reader collected from one FIFO.
#[derive(Clone, Default)]
pub struct Collected(Arc<Mutex<Vec<u8>>>, Arc<Mutex<bool>>);

impl Collected {
    /// Everything read so far, lossily as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    /// True once the reader saw EOF (every writer closed).
    pub fn eof(&self) -> bool {
        *self.1.lock().unwrap()
    }
    /// Waits for EOF.
    pub async fn wait_eof(&self) -> String {
        let deadline = Instant::now() + DEADLINE;
        while !self.eof() {
            assert!(
                Instant::now() < deadline,
                "FIFO never reached EOF: {:?}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.text()
    }
    /// Waits until the text satisfies `f`.
    pub async fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let t = self.text();
            if f(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; have {t:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Creates the FIFO (mode 0600, like logmon) and reads it in a thread until EOF. Returns once
/// that thread waits in its `open`, as logmon's reader normally does by the time the client
/// calls StartTask (its prestart hook ran earlier): the driver's open then finds a reader.
pub fn logmon(path: &Path) -> Collected {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let c = Collected::default();
    let out = c.clone();
    let p = path.to_path_buf();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tid_tx.send(nix::unistd::gettid().as_raw());
        let mut f = std::fs::File::open(&p).unwrap();
        let mut buf = [0u8; 8192];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.0.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
        *out.1.lock().unwrap() = true;
    });
    if let Ok(tid) = tid_rx.recv() {
        wait_in_open(tid);
    }
    c
}

/// Waits (up to a second) until thread `tid` of this process blocks in `openat`.
fn wait_in_open(tid: i32) {
    let syscall = format!("/proc/self/task/{tid}/syscall");
    let openat = libc::SYS_openat.to_string();
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match std::fs::read_to_string(&syscall) {
            Ok(s) if s.split_whitespace().next() == Some(openat.as_str()) => return,
            // The thread is gone: a writer came and went already.
            Err(_) => return,
            _ => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

/// One allocation dir laid out like Nomad's (`<data>/alloc/<alloc_id>`).
#[derive(Clone)]
pub struct Alloc {
    pub id: String,
    pub dir: PathBuf,
}

impl Alloc {
    /// Creates `alloc/{logs,tmp,data}` under `root`.
    pub fn new(root: &Path) -> Alloc {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = root.join("alloc").join(&id);
        for d in ["alloc/logs", "alloc/tmp", "alloc/data"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        Alloc { id, dir }
    }

    /// Creates the task dir (`local`, `tmp`, `secrets`, `private`) and its logmon FIFOs.
    pub fn task(&self, name: &str) -> Task {
        use std::os::unix::fs::PermissionsExt;
        let task_dir = self.dir.join(name);
        for d in ["local", "tmp", "secrets", "private"] {
            std::fs::create_dir_all(task_dir.join(d)).unwrap();
        }
        std::fs::set_permissions(&task_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let logs = self.dir.join("alloc/logs");
        let stdout_path = logs.join(format!(".{name}.stdout.fifo"));
        let stderr_path = logs.join(format!(".{name}.stderr.fifo"));
        let stdout = logmon(&stdout_path);
        let stderr = logmon(&stderr_path);
        let short: String = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        Task {
            id: format!("{}/{name}/{short}", self.id),
            name: name.to_string(),
            alloc_id: self.id.clone(),
            alloc_dir: self.dir.clone(),
            task_dir,
            stdout_path,
            stderr_path,
            stdout,
            stderr,
            memory_mb: 256,
            cpuset_cpus: String::new(),
            extra_env: HashMap::new(),
        }
    }
}

/// One task of an allocation.
pub struct Task {
    pub id: String,
    pub name: String,
    pub alloc_id: String,
    pub alloc_dir: PathBuf,
    pub task_dir: PathBuf,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    pub stdout: Collected,
    pub stderr: Collected,
    pub memory_mb: i64,
    /// The cores Nomad reserved for it (`resources { cores }`), comma-joined.
    pub cpuset_cpus: String,
    pub extra_env: HashMap<String, String>,
}

impl Task {
    /// Nomad's task environment (the NOMAD_* variables plus the host's PATH/HOME).
    pub fn env(&self) -> HashMap<String, String> {
        let mut env: HashMap<String, String> = [
            (
                "NOMAD_ALLOC_DIR",
                self.alloc_dir.join("alloc").display().to_string(),
            ),
            (
                "NOMAD_TASK_DIR",
                self.task_dir.join("local").display().to_string(),
            ),
            (
                "NOMAD_SECRETS_DIR",
                self.task_dir.join("secrets").display().to_string(),
            ),
            ("NOMAD_ALLOC_ID", self.alloc_id.clone()),
            ("NOMAD_TASK_NAME", self.name.clone()),
            ("NOMAD_MEMORY_LIMIT", self.memory_mb.to_string()),
            ("NOMAD_JOB_NAME", "lifecycle-test".to_string()),
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("HOME", "/root".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(self.extra_env.clone());
        env
    }

    /// The TaskConfig Nomad would send for job config `config` (encoded with `spec`).
    pub fn config(
        &self,
        spec: &elide_task_driver::proto::hashicorp::nomad::plugins::shared::hclspec::Spec,
        config: &Value,
    ) -> pb::TaskConfig {
        let msgpack =
            support::cty::encode_config(spec, config).expect("job config fits the schema");
        self.config_raw(msgpack)
    }

    /// The TaskConfig with raw msgpack.
    pub fn config_raw(&self, msgpack: Vec<u8>) -> pb::TaskConfig {
        pb::TaskConfig {
            id: self.id.clone(),
            name: self.name.clone(),
            msgpack_driver_config: msgpack,
            env: self.env(),
            resources: Some(pb::Resources {
                allocated_resources: Some(pb::AllocatedTaskResources {
                    cpu: Some(pb::AllocatedCpuResources { cpu_shares: 100 }),
                    memory: Some(pb::AllocatedMemoryResources {
                        memory_mb: self.memory_mb,
                        memory_max_mb: 0,
                    }),
                    networks: vec![],
                }),
                linux_resources: Some(pb::LinuxResources {
                    cpu_shares: 100,
                    memory_limit_bytes: self.memory_mb * 1024 * 1024,
                    cpuset_cpus: self.cpuset_cpus.clone(),
                    ..Default::default()
                }),
                ports: vec![],
            }),
            alloc_dir: self.alloc_dir.display().to_string(),
            stdout_path: self.stdout_path.display().to_string(),
            stderr_path: self.stderr_path.display().to_string(),
            task_group_name: "g".into(),
            job_name: "lifecycle-test".into(),
            alloc_id: self.alloc_id.clone(),
            job_id: "lifecycle-test".into(),
            namespace: "default".into(),
            node_name: "test-node".into(),
            node_id: "node-1".into(),
            ..Default::default()
        }
    }
}

/// Settings of the daemon an auto-starting plugin launches (temp dirs, own cgroup parent).
pub struct AutoDaemon {
    pub socket: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub cgroup_parent: String,
}

impl AutoDaemon {
    /// Dirs under `root` (which must be short: the socket lives there).
    pub fn new(root: &Path) -> AutoDaemon {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let name = root.file_name().unwrap().to_string_lossy().to_string();
        let cgroup_parent = format!("elide-test-{name}");
        AutoDaemon {
            socket: root.join("d.sock"),
            args: vec![
                "--state-dir".into(),
                root.join("state").display().to_string(),
                "--run-dir".into(),
                root.join("run").display().to_string(),
                "--cgroup-parent".into(),
                cgroup_parent.clone(),
            ],
            log: root.join("daemon.log"),
            cgroup_parent,
        }
    }

    /// Asks the daemon (if any) for its pid and SIGKILLs it, then removes its cgroups.
    pub async fn kill(&self) {
        if let Some(pid) = daemon_pid(&self.socket).await {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for h in ["memory", "cpu,cpuacct", "cpu", "cpuacct", "pids", "unified"] {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(h)
                    .join(&self.cgroup_parent),
            );
        }
    }
}

/// Pids of processes whose command line names `socket` (the auto-started daemon).
pub fn daemons_on(socket: &Path) -> Vec<i32> {
    let needle = socket.display().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for AutoDaemon {
    /// A test that fails half-way must not leave its auto-started daemon behind.
    fn drop(&mut self) {
        for pid in daemons_on(&self.socket) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// The pid of the daemon answering on `socket`.
pub async fn daemon_pid(socket: &Path) -> Option<u32> {
    let c = elide_task_driver::daemon_client::DaemonClient::connect(socket, Duration::from_secs(2))
        .await
        .ok()?;
    c.daemon_info().await.ok().map(|i| i.pid)
}

/// Plugin config for a daemon on `socket`.
pub fn plugin_config(socket: &Path, auto: Option<&AutoDaemon>) -> Value {
    let daemon = match auto {
        Some(a) => json!([{
            "auto_start": true,
            "path": env!("CARGO_BIN_EXE_elide-daemon"),
            "args": a.args,
            "log_file": a.log.display().to_string(),
            "start_timeout": "60s",
        }]),
        None => json!([{ "auto_start": false }]),
    };
    json!({
        "daemon_socket": socket.display().to_string(),
        "fingerprint_period": "1s",
        "session_config": [{ "context_pool_size": 1 }],
        "daemon": daemon,
    })
}

/// A launched and configured plugin, with its task config schema.
pub struct Plugin {
    pub client: NomadClient,
    pub spec: elide_task_driver::proto::hashicorp::nomad::plugins::shared::hclspec::Spec,
}

impl Plugin {
    /// Launches the plugin and sends the agent's SetConfig.
    pub async fn launch(config: &Value) -> Plugin {
        let client = NomadClient::launch().await;
        client
            .set_config(config.clone(), true)
            .await
            .expect("SetConfig");
        let spec = client.task_config_schema().await;
        Plugin { client, spec }
    }

    pub fn driver(&self) -> elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::driver_client::DriverClient<tonic::transport::Channel>{
        self.client.driver.clone()
    }

    /// StartTask; the handle on success.
    pub async fn start(&self, cfg: pb::TaskConfig) -> Result<pb::TaskHandle, tonic::Status> {
        let r = tokio::time::timeout(
            DEADLINE,
            self.driver()
                .start_task(pb::StartTaskRequest { task: Some(cfg) }),
        )
        .await
        .expect("StartTask hung")?;
        Ok(r.into_inner().handle.expect("handle set on success"))
    }

    /// StartTask for job config `config`.
    pub async fn start_json(
        &self,
        task: &Task,
        config: Value,
    ) -> Result<pb::TaskHandle, tonic::Status> {
        self.start(task.config(&self.spec, &config)).await
    }

    /// WaitTask with a deadline.
    pub async fn wait(&self, id: &str) -> pb::WaitTaskResponse {
        self.wait_within(id, DEADLINE).await
    }

    pub async fn wait_within(&self, id: &str, t: Duration) -> pb::WaitTaskResponse {
        tokio::time::timeout(
            t,
            self.driver()
                .wait_task(pb::WaitTaskRequest { task_id: id.into() }),
        )
        .await
        .expect("WaitTask hung")
        .expect("WaitTask failed")
        .into_inner()
    }

    /// StopTask.
    pub async fn stop(
        &self,
        id: &str,
        signal: &str,
        timeout: Duration,
    ) -> Result<(), tonic::Status> {
        tokio::time::timeout(
            DEADLINE,
            self.driver().stop_task(pb::StopTaskRequest {
                task_id: id.into(),
                timeout: Some(prost_types::Duration {
                    seconds: timeout.as_secs() as i64,
                    nanos: timeout.subsec_nanos() as i32,
                }),
                signal: signal.into(),
            }),
        )
        .await
        .expect("StopTask hung")
        .map(|_| ())
    }

    /// DestroyTask.
    pub async fn destroy(&self, id: &str, force: bool) -> Result<(), tonic::Status> {
        tokio::time::timeout(
            DEADLINE,
            self.driver().destroy_task(pb::DestroyTaskRequest {
                task_id: id.into(),
                force,
            }),
        )
        .await
        .expect("DestroyTask hung")
        .map(|_| ())
    }

    /// InspectTask.
    pub async fn inspect(&self, id: &str) -> Result<pb::InspectTaskResponse, tonic::Status> {
        self.driver()
            .inspect_task(pb::InspectTaskRequest { task_id: id.into() })
            .await
            .map(|r| r.into_inner())
    }

    /// Still serving?
    pub async fn alive(&self) {
        assert_eq!(self.client.plugin_info().await.name, "elide");
    }
}

/// Polls `f` until true.
pub async fn eventually(what: &str, f: impl FnMut() -> bool) {
    support::eventually_within(what, DEADLINE, f).await
}

/// Whether `pid` is alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// The pid recorded in a handle's driver_state.
pub fn handle_pid(h: &pb::TaskHandle) -> u32 {
    let v: Value = serde_json::from_slice(&h.driver_state).unwrap();
    v["pid"].as_u64().unwrap() as u32
}
