//! Test harness that plays the Nomad client exactly as the fact sheet describes: launches the
//! real plugin binary with go-plugin's environment, reads the handshake line, dials the Unix
//! socket, encodes config as cty msgpack from the returned hclspec, calls RPCs, and collects
//! the plugin's stderr (hclog JSON lines).
//!
//! Use from a test file with `mod support;`.
#![allow(dead_code)]

pub mod cty;
pub mod fake_daemon;
pub mod hcl;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use elide_task_driver::proto::hashicorp::nomad::plugins::base::proto::{
    self as base, base_plugin_client::BasePluginClient,
};
use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::{
    self as drivers, driver_client::DriverClient,
};
use elide_task_driver::proto::plugin::{
    grpc_broker_client::GrpcBrokerClient, grpc_controller_client::GrpcControllerClient,
    grpc_stdio_client::GrpcStdioClient,
};
use tonic::transport::{Channel, Endpoint};

/// Nomad's cookie variable and value (`base.Handshake`).
pub const COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
pub const COOKIE_VALUE: &str = "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";
/// Generous deadline for anything on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The plugin binary under test.
pub fn plugin_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_elide-task-driver"))
}

/// A short temp dir (socket paths must stay under ~107 bytes).
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("e")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// How to launch the plugin.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Cookie value; `None` leaves the variable out.
    pub cookie: Option<String>,
    /// `PLUGIN_PROTOCOL_VERSIONS`; Nomad always sends "2".
    pub protocol_versions: Option<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Put the socket in this dir via PLUGIN_UNIX_SOCKET_DIR (default: a fresh temp dir).
    pub socket_dir: Option<PathBuf>,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            cookie: Some(COOKIE_VALUE.into()),
            protocol_versions: Some("2".into()),
            env: Vec::new(),
            socket_dir: None,
        }
    }
}

/// The parsed handshake line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub raw: String,
    pub fields: Vec<String>,
}

impl Handshake {
    pub fn address(&self) -> &str {
        self.fields.get(3).map(String::as_str).unwrap_or_default()
    }
}

/// The launched plugin process with its stdio readers.
pub struct PluginProcess {
    pub child: Child,
    first_line: mpsc::Receiver<String>,
    pub stdout_rest: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    stdio_done: Arc<Mutex<usize>>,
    pub started: Instant,
}

impl PluginProcess {
    /// Spawns the plugin like go-plugin's client: the host env plus the plugin variables,
    /// argv[0] = the binary path, stdout/stderr piped.
    pub fn spawn(opts: &Launch, socket_dir: &Path) -> PluginProcess {
        let mut cmd = Command::new(plugin_bin());
        cmd.env_remove(COOKIE_KEY)
            .env_remove("PLUGIN_PROTOCOL_VERSIONS")
            .env("PLUGIN_MIN_PORT", "10000")
            .env("PLUGIN_MAX_PORT", "25000")
            .env("PLUGIN_UNIX_SOCKET_DIR", socket_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(c) = &opts.cookie {
            cmd.env(COOKIE_KEY, c);
        }
        if let Some(v) = &opts.protocol_versions {
            cmd.env("PLUGIN_PROTOCOL_VERSIONS", v);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn plugin");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, first_line) = mpsc::channel();
        let stdout_rest = Arc::new(Mutex::new(Vec::new()));
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let stdio_done = Arc::new(Mutex::new(0usize));
        {
            let rest = stdout_rest.clone();
            let done = stdio_done.clone();
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                if let Some(Ok(l)) = lines.next() {
                    let _ = tx.send(l);
                }
                for l in lines.map_while(Result::ok) {
                    rest.lock().unwrap().push(l);
                }
                *done.lock().unwrap() += 1;
            });
        }
        {
            let lines_out = stderr_lines.clone();
            let done = stdio_done.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lines_out.lock().unwrap().push(l);
                }
                *done.lock().unwrap() += 1;
            });
        }
        PluginProcess {
            child,
            first_line,
            stdout_rest,
            stderr: stderr_lines,
            stdio_done,
            started,
        }
    }

    /// Reads the first stdout line (what go-plugin's client does), or None if stdout closed.
    pub fn read_handshake(&self, timeout: Duration) -> Option<Handshake> {
        let raw = self.first_line.recv_timeout(timeout).ok()?;
        let fields = raw.trim().split('|').map(str::to_string).collect();
        Some(Handshake { raw, fields })
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until both stdout and stderr reached EOF (after exit).
    pub fn wait_stdio_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if *self.stdio_done.lock().unwrap() == 2 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// stderr lines parsed as JSON objects (panics on a line that is not one: a host would
    /// demote it).
    pub fn log_entries(&self) -> Vec<serde_json::Value> {
        self.stderr_lines()
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits for a log entry whose `@message` contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .log_entries()
                .into_iter()
                .find(|e| e["@message"].as_str().is_some_and(|m| m.contains(needle)))
            {
                return Some(e);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Dials a Unix socket the way go-plugin does (h2c, prior knowledge).
pub async fn dial(path: &str) -> Channel {
    Endpoint::from_shared(format!("unix://{path}"))
        .expect("endpoint")
        .connect_timeout(DEADLINE)
        .connect()
        .await
        .expect("connect to plugin socket")
}

/// The Nomad client side of one plugin instance.
pub struct NomadClient {
    pub process: PluginProcess,
    pub handshake: Handshake,
    pub channel: Channel,
    pub base: BasePluginClient<Channel>,
    pub driver: DriverClient<Channel>,
    pub socket_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl NomadClient {
    /// Launches with Nomad's defaults.
    pub async fn launch() -> NomadClient {
        Self::launch_with(Launch::default()).await
    }

    /// Launches, reads the handshake and connects.
    pub async fn launch_with(opts: Launch) -> NomadClient {
        let (dir, socket_dir) = match &opts.socket_dir {
            Some(d) => (None, d.clone()),
            None => {
                let d = short_tempdir();
                let p = d.path().to_path_buf();
                (Some(d), p)
            }
        };
        let process = PluginProcess::spawn(&opts, &socket_dir);
        let handshake = process
            .read_handshake(DEADLINE)
            .unwrap_or_else(|| panic!("no handshake line; stderr: {:?}", process.stderr_lines()));
        assert_eq!(handshake.fields.len(), 6, "handshake: {:?}", handshake.raw);
        let channel = dial(handshake.address()).await;
        NomadClient {
            base: BasePluginClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
            driver: DriverClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
            channel,
            process,
            handshake,
            socket_dir,
            _dir: dir,
        }
    }

    pub fn controller(&self) -> GrpcControllerClient<Channel> {
        GrpcControllerClient::new(self.channel.clone())
    }
    pub fn stdio(&self) -> GrpcStdioClient<Channel> {
        GrpcStdioClient::new(self.channel.clone())
    }
    pub fn broker(&self) -> GrpcBrokerClient<Channel> {
        GrpcBrokerClient::new(self.channel.clone())
    }
    pub fn health(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel.clone())
    }

    pub async fn plugin_info(&self) -> base::PluginInfoResponse {
        self.base
            .clone()
            .plugin_info(base::PluginInfoRequest {})
            .await
            .expect("PluginInfo")
            .into_inner()
    }

    pub async fn config_schema(
        &self,
    ) -> elide_task_driver::proto::hashicorp::nomad::plugins::shared::hclspec::Spec {
        self.base
            .clone()
            .config_schema(base::ConfigSchemaRequest {})
            .await
            .expect("ConfigSchema")
            .into_inner()
            .spec
            .expect("ConfigSchema returned no spec")
    }

    /// The driver's task config schema (what Nomad decodes a job's `config` block against).
    pub async fn task_config_schema(
        &self,
    ) -> elide_task_driver::proto::hashicorp::nomad::plugins::shared::hclspec::Spec {
        self.driver
            .clone()
            .task_config_schema(drivers::TaskConfigSchemaRequest {})
            .await
            .expect("TaskConfigSchema")
            .into_inner()
            .spec
            .expect("TaskConfigSchema returned no spec")
    }

    /// SetConfig with raw msgpack; `nomad_config` present when `agent` (long-lived instance).
    pub async fn set_config_raw(&self, msgpack: Vec<u8>, agent: bool) -> Result<(), tonic::Status> {
        let nomad_config = agent.then_some(base::NomadConfig {
            driver: Some(base::NomadDriverConfig {
                client_max_port: 14512,
                client_min_port: 14000,
                topology: None,
            }),
        });
        self.base
            .clone()
            .set_config(base::SetConfigRequest {
                msgpack_config: msgpack,
                nomad_config,
                plugin_api_version: "v0.1.0".into(),
            })
            .await
            .map(|_| ())
    }

    /// SetConfig the way Nomad builds it: decode `config` with our ConfigSchema, encode as cty.
    pub async fn set_config(
        &self,
        config: serde_json::Value,
        agent: bool,
    ) -> Result<(), tonic::Status> {
        let spec = self.config_schema().await;
        let bytes = cty::encode_config(&spec, &config).expect("config decodes against the spec");
        self.set_config_raw(bytes, agent).await
    }

    /// Opens the Fingerprint stream.
    pub async fn fingerprint(&self) -> tonic::Streaming<drivers::FingerprintResponse> {
        self.driver
            .clone()
            .fingerprint(drivers::FingerprintRequest {})
            .await
            .expect("Fingerprint")
            .into_inner()
    }

    /// Asks the plugin to exit via GRPCController.Shutdown and waits for the exit.
    pub async fn controller_shutdown(&mut self) -> Option<ExitStatus> {
        let _ = self
            .controller()
            .shutdown(elide_task_driver::proto::plugin::Empty {})
            .await;
        self.process.wait_exit(DEADLINE)
    }
}

/// Polls `f` every 50 ms until it holds; fails the test, naming `what`, after `within`.
pub async fn eventually_within(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Next message of a stream, with a deadline.
pub async fn next_within<T>(s: &mut tonic::Streaming<T>, timeout: Duration) -> Option<T> {
    match tokio::time::timeout(timeout, s.message()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => panic!("stream failed: {e}"),
        Err(_) => None,
    }
}

/// Reads fingerprints until one satisfies `pred`.
pub async fn fingerprint_until(
    s: &mut tonic::Streaming<drivers::FingerprintResponse>,
    timeout: Duration,
    pred: impl Fn(&drivers::FingerprintResponse) -> bool,
) -> drivers::FingerprintResponse {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_within(s, left).await {
            Some(m) if pred(&m) => return m,
            Some(m) => last = Some(m),
            None => break,
        }
    }
    panic!("no matching fingerprint within {timeout:?}; last: {last:?}");
}
