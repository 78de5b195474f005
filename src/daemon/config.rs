//! Daemon configuration: an optional TOML file, overridden by command-line flags.
//!
//! ```toml
//! socket = "/run/elide/daemon.sock"
//! socket_mode = "0660"          # default 0600
//! socket_group = "nomad"        # optional
//! allowed_uids = [0, 1000]      # peers allowed on the socket (the daemon's own uid always is)
//! state_dir = "/var/lib/elide"
//! run_dir = "/run/elide/exec"
//! max_code_bytes = 4194304
//! max_capture_bytes = 67108864  # output kept per captured stream
//! session_idle_ttl = "1h"
//! ended_retention = "24h"
//! output_roots = ["/var/lib/nomad/alloc"]
//! sink_open_timeout = "10s"
//! cgroup_root = "/sys/fs/cgroup"
//! cgroup_parent = "elide"
//! syscall_filter = true         # false: executions run without the seccomp filter
//! [runtimes.python]
//! command = "/usr/bin/python3"
//! [runtimes.javascript]
//! enabled = false               # the language is unavailable on this node
//! [runtimes.typescript]
//! backend = "elide"             # "native" (default) or "elide"
//! elide = "/usr/local/bin/elide"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parsing config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key).
        message: String,
    },
    /// A value is out of range.
    #[error("config field `{field}`: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Per-language runtime settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Interpreter to use instead of the one found on PATH.
    pub command: Option<PathBuf>,
    /// "native" (python3/node) or "elide".
    pub backend: Option<String>,
    /// The `elide` binary for the elide backend.
    pub elide: Option<PathBuf>,
    /// Set to false to disable the language on this node.
    pub enabled: Option<bool>,
}

/// Runtime settings for each language.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimesConfig {
    /// python
    #[serde(default)]
    pub python: RuntimeConfig,
    /// javascript
    #[serde(default)]
    pub javascript: RuntimeConfig,
    /// typescript
    #[serde(default)]
    pub typescript: RuntimeConfig,
}

/// The TOML file as written; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    allowed_uids: Option<Vec<u32>>,
    state_dir: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    max_code_bytes: Option<u64>,
    max_capture_bytes: Option<u64>,
    session_idle_ttl: Option<String>,
    ended_retention: Option<String>,
    output_roots: Option<Vec<PathBuf>>,
    sink_open_timeout: Option<String>,
    cgroup_root: Option<PathBuf>,
    cgroup_parent: Option<String>,
    syscall_filter: Option<bool>,
    #[serde(default)]
    runtimes: RuntimesConfig,
}

/// The effective daemon configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Unix socket the API is served on.
    pub socket: PathBuf,
    /// Permission bits of the socket.
    pub socket_mode: u32,
    /// Group owning the socket, when set.
    pub socket_group: Option<String>,
    /// Peer uids allowed to call (the daemon's own uid is always allowed).
    pub allowed_uids: Vec<u32>,
    /// Where exit statuses and sessions are persisted.
    pub state_dir: PathBuf,
    /// Where per-execution files (inline code) are written; must be traversable by task users.
    pub run_dir: PathBuf,
    /// Largest inline code accepted.
    pub max_code_bytes: u64,
    /// Captured output kept per stream (older bytes are dropped past it).
    pub max_capture_bytes: u64,
    /// Idle sessions (no running execution, no activity) are closed after this.
    pub session_idle_ttl: Duration,
    /// Ended executions are forgotten after this.
    pub ended_retention: Duration,
    /// Regular-file output sinks must live under one of these.
    pub output_roots: Vec<PathBuf>,
    /// How long to wait for a FIFO reader when opening an output sink.
    pub sink_open_timeout: Duration,
    /// cgroupfs mount point.
    pub cgroup_root: PathBuf,
    /// Name of the daemon's parent cgroup under each hierarchy.
    pub cgroup_parent: String,
    /// Whether executions run under the seccomp filter ([`crate::sandbox::syscall_filter`]).
    pub syscall_filter: bool,
    /// Runtime overrides.
    pub runtimes: RuntimesConfig,
}

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/elide/daemon.sock";

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: 0o600,
            socket_group: None,
            allowed_uids: vec![0],
            state_dir: PathBuf::from("/var/lib/elide"),
            run_dir: PathBuf::from("/run/elide/exec"),
            max_code_bytes: 4 * 1024 * 1024,
            max_capture_bytes: 64 * 1024 * 1024,
            session_idle_ttl: Duration::from_secs(3600),
            ended_retention: Duration::from_secs(24 * 3600),
            output_roots: Vec::new(),
            sink_open_timeout: Duration::from_secs(10),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "elide".to_string(),
            syscall_filter: true,
            runtimes: RuntimesConfig::default(),
        }
    }
}

/// Command-line overrides (all optional), filled by the CLI.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// --config
    pub config_file: Option<PathBuf>,
    /// --socket
    pub socket: Option<PathBuf>,
    /// --socket-mode (octal)
    pub socket_mode: Option<String>,
    /// --socket-group
    pub socket_group: Option<String>,
    /// --allowed-uid (repeatable)
    pub allowed_uids: Vec<u32>,
    /// --state-dir
    pub state_dir: Option<PathBuf>,
    /// --run-dir
    pub run_dir: Option<PathBuf>,
    /// --max-code-bytes
    pub max_code_bytes: Option<u64>,
    /// --session-idle-ttl
    pub session_idle_ttl: Option<String>,
    /// --output-root (repeatable)
    pub output_roots: Vec<PathBuf>,
    /// --sink-open-timeout
    pub sink_open_timeout: Option<String>,
    /// --cgroup-root
    pub cgroup_root: Option<PathBuf>,
    /// --cgroup-parent
    pub cgroup_parent: Option<String>,
}

fn duration(field: &'static str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| ConfigError::Invalid {
        field,
        message: format!("{text:?} is not a duration like \"30s\" or \"1h\": {e}"),
    })
}

fn mode(field: &'static str, text: &str) -> Result<u32, ConfigError> {
    let digits = text.trim_start_matches("0o");
    let m = u32::from_str_radix(digits, 8).map_err(|_| ConfigError::Invalid {
        field,
        message: format!("{text:?} is not an octal mode like \"0600\""),
    })?;
    if m & !0o777 != 0 || m & 0o600 != 0o600 {
        return Err(ConfigError::Invalid {
            field,
            message: format!("{text:?} must be within 0777 and give the owner rw (0600)"),
        });
    }
    Ok(m)
}

impl DaemonConfig {
    /// Reads the file (when given) and applies the overrides.
    pub fn load(o: &Overrides) -> Result<Self, ConfigError> {
        let file = match &o.config_file {
            Some(path) => Self::read_file(path)?,
            None => FileConfig::default(),
        };
        let mut c = Self::default();
        if let Some(v) = file.socket {
            c.socket = v;
        }
        if let Some(v) = &file.socket_mode {
            c.socket_mode = mode("socket_mode", v)?;
        }
        c.socket_group = file.socket_group;
        if let Some(v) = file.allowed_uids {
            c.allowed_uids = v;
        }
        if let Some(v) = file.state_dir {
            c.state_dir = v;
        }
        if let Some(v) = file.run_dir {
            c.run_dir = v;
        }
        if let Some(v) = file.max_code_bytes {
            c.max_code_bytes = v;
        }
        if let Some(v) = file.max_capture_bytes {
            c.max_capture_bytes = v;
        }
        if let Some(v) = &file.session_idle_ttl {
            c.session_idle_ttl = duration("session_idle_ttl", v)?;
        }
        if let Some(v) = &file.ended_retention {
            c.ended_retention = duration("ended_retention", v)?;
        }
        if let Some(v) = file.output_roots {
            c.output_roots = v;
        }
        if let Some(v) = &file.sink_open_timeout {
            c.sink_open_timeout = duration("sink_open_timeout", v)?;
        }
        if let Some(v) = file.cgroup_root {
            c.cgroup_root = v;
        }
        if let Some(v) = file.cgroup_parent {
            c.cgroup_parent = v;
        }
        if let Some(v) = file.syscall_filter {
            c.syscall_filter = v;
        }
        c.runtimes = file.runtimes;

        if let Some(v) = &o.socket {
            c.socket = v.clone();
        }
        if let Some(v) = &o.socket_mode {
            c.socket_mode = mode("--socket-mode", v)?;
        }
        if let Some(v) = &o.socket_group {
            c.socket_group = Some(v.clone());
        }
        c.allowed_uids.extend(o.allowed_uids.iter().copied());
        if let Some(v) = &o.state_dir {
            c.state_dir = v.clone();
        }
        if let Some(v) = &o.run_dir {
            c.run_dir = v.clone();
        }
        if let Some(v) = o.max_code_bytes {
            c.max_code_bytes = v;
        }
        if let Some(v) = &o.session_idle_ttl {
            c.session_idle_ttl = duration("--session-idle-ttl", v)?;
        }
        c.output_roots.extend(o.output_roots.iter().cloned());
        if let Some(v) = &o.sink_open_timeout {
            c.sink_open_timeout = duration("--sink-open-timeout", v)?;
        }
        if let Some(v) = &o.cgroup_root {
            c.cgroup_root = v.clone();
        }
        if let Some(v) = &o.cgroup_parent {
            c.cgroup_parent = v.clone();
        }
        c.validate()?;
        Ok(c)
    }

    fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let abs = |field: &'static str, p: &Path| {
            if p.is_absolute() {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    field,
                    message: format!("{} must be an absolute path", p.display()),
                })
            }
        };
        abs("socket", &self.socket)?;
        abs("state_dir", &self.state_dir)?;
        abs("run_dir", &self.run_dir)?;
        abs("cgroup_root", &self.cgroup_root)?;
        for r in &self.output_roots {
            abs("output_roots", r)?;
        }
        if self.socket.as_os_str().len() > 107 {
            return Err(ConfigError::Invalid {
                field: "socket",
                message: format!(
                    "{} is longer than the 107 bytes a Unix socket path may have",
                    self.socket.display()
                ),
            });
        }
        // Zero would close every session the moment it idles, forget an exit before its
        // waiter asks, or fail every start whose log FIFO's reader is a moment late.
        for (field, d) in [
            ("session_idle_ttl", self.session_idle_ttl),
            ("ended_retention", self.ended_retention),
            ("sink_open_timeout", self.sink_open_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be longer than 0s".into(),
                });
            }
        }
        for (field, rc) in [
            ("runtimes.python.backend", &self.runtimes.python),
            ("runtimes.javascript.backend", &self.runtimes.javascript),
            ("runtimes.typescript.backend", &self.runtimes.typescript),
        ] {
            if let Some(b) = rc.backend.as_deref()
                && b != "native"
                && b != "elide"
            {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("{b:?} is not \"native\" or \"elide\""),
                });
            }
        }
        if self.max_code_bytes == 0 {
            return Err(ConfigError::Invalid {
                field: "max_code_bytes",
                message: "must be greater than 0".into(),
            });
        }
        // Joined onto each hierarchy's root: an absolute path would replace the root and put
        // the daemon's cgroups on the host's filesystem, `..` would leave the hierarchy.
        let parent = Path::new(&self.cgroup_parent);
        let plain = parent
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if self.cgroup_parent.is_empty() || !plain {
            return Err(ConfigError::Invalid {
                field: "cgroup_parent",
                message: format!(
                    "{:?} must be a relative name under each cgroup hierarchy (\"elide\", \
                     \"system.slice/elide\"), without \"/\" at the start or \"..\"",
                    self.cgroup_parent
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_overrides_combine() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.toml");
        std::fs::write(
            &f,
            "socket_mode = \"0660\"\nmax_code_bytes = 10\nsession_idle_ttl = \"5m\"\n\
             [runtimes.python]\ncommand = \"/usr/bin/python3\"\n",
        )
        .unwrap();
        let o = Overrides {
            config_file: Some(f),
            max_code_bytes: Some(20),
            ..Default::default()
        };
        let c = DaemonConfig::load(&o).unwrap();
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.max_code_bytes, 20);
        assert_eq!(c.session_idle_ttl, Duration::from_secs(300));
        assert_eq!(
            c.runtimes.python.command.as_deref(),
            Some(Path::new("/usr/bin/python3"))
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        let o = Overrides {
            socket_mode: Some("0400".into()),
            ..Default::default()
        };
        assert!(
            DaemonConfig::load(&o)
                .unwrap_err()
                .to_string()
                .contains("--socket-mode")
        );
        let o = Overrides {
            session_idle_ttl: Some("soon".into()),
            ..Default::default()
        };
        assert!(
            DaemonConfig::load(&o)
                .unwrap_err()
                .to_string()
                .contains("ttl")
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.toml");
        std::fs::write(&f, "sockett = \"/x\"\n").unwrap();
        let o = Overrides {
            config_file: Some(f.clone()),
            ..Default::default()
        };
        assert!(
            DaemonConfig::load(&o)
                .unwrap_err()
                .to_string()
                .contains("sockett")
        );
        std::fs::write(&f, "syscall_filter = \"off\"\n").unwrap();
        let o = Overrides {
            config_file: Some(f.clone()),
            ..Default::default()
        };
        let e = DaemonConfig::load(&o).unwrap_err().to_string();
        assert!(e.contains("syscall_filter") && e.contains("bool"), "{e}");
        std::fs::write(&f, "[runtimes.typescript]\nbackend = \"deno\"\n").unwrap();
        let e = DaemonConfig::load(&o).unwrap_err().to_string();
        assert!(
            e.contains("runtimes.typescript.backend") && e.contains("\"deno\""),
            "{e}"
        );
        for key in ["session_idle_ttl", "ended_retention", "sink_open_timeout"] {
            std::fs::write(&f, format!("{key} = \"0s\"\n")).unwrap();
            let e = DaemonConfig::load(&o).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("longer than 0s"), "{e}");
        }
        for bad in ["/elide", "", "../elide", "elide/../..", "./elide"] {
            std::fs::write(&f, format!("cgroup_parent = {bad:?}\n")).unwrap();
            let e = DaemonConfig::load(&o).unwrap_err().to_string();
            assert!(
                e.contains("cgroup_parent") && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
        for good in ["elide", "system.slice/elide"] {
            std::fs::write(&f, format!("cgroup_parent = {good:?}\n")).unwrap();
            assert_eq!(DaemonConfig::load(&o).unwrap().cgroup_parent, good);
        }
        std::fs::write(&f, "syscall_filter = false\n").unwrap();
        assert!(!DaemonConfig::load(&o).unwrap().syscall_filter);
        assert!(
            DaemonConfig::load(&Overrides::default())
                .unwrap()
                .syscall_filter
        );
    }
}
