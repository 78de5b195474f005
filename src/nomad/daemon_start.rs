//! Auto-start of `elide-daemon` when nothing answers on `daemon_socket`.
//!
//! The daemon must outlive the plugin (the agent SIGKILLs the plugin on every restart, and the
//! daemon supervises every running task), so it is started detached: its own session
//! (`setsid`), stdin `/dev/null`, stdout/stderr appended to a log file (never the plugin's
//! stdio, which are the agent's handshake and log pipes), no parent-death signal, and without
//! the go-plugin variables of the plugin's environment.
//!
//! Which binary: `daemon.path` when set (a path, or a name looked up on PATH). Otherwise, from
//! the plugin binary's real path `<dir>/<plugin>`: `<dir>/elide-daemon` (cargo's layout,
//! `target/debug`), then `<dir>/../bin/elide-daemon` (our install layout: `build/plugins/elide`
//! and `build/bin/elide-daemon`; Nomad 1.6 launches every executable in `plugin_dir`, so the
//! daemon must not live there), then `elide-daemon` on PATH.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::config::PluginConfig;
use crate::daemon_client::DaemonClient;

/// The daemon binary's file name.
pub const DAEMON_BIN: &str = "elide-daemon";
/// File name of the default log file, next to the socket.
pub const DEFAULT_LOG_NAME: &str = "elide-daemon.log";

/// Why the daemon could not be started.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    /// No binary found.
    #[error("cannot find {DAEMON_BIN} (looked at {}); set daemon.path", tried.join(", "))]
    NotFound {
        /// Candidates that were checked.
        tried: Vec<String>,
    },
    /// Filesystem preparation failed.
    #[error("{what} {path}: {detail}")]
    Prepare {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        detail: String,
    },
    /// exec failed.
    #[error("cannot run {path}: {detail}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        detail: String,
    },
    /// The daemon exited before answering.
    #[error("{path} exited during start-up ({status}); its last words in {log}: {last_words}")]
    Exited {
        /// The binary.
        path: PathBuf,
        /// Exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The log's last line, without its timestamp: the same for every failed attempt of
        /// the same cause, so the fingerprint's health description does not change with each
        /// retry (each change is a node update in Nomad).
        last_words: String,
    },
    /// It did not answer in time.
    #[error("{path} did not answer on {socket} within {timeout:?}; see {log}")]
    Timeout {
        /// The binary.
        path: PathBuf,
        /// The socket.
        socket: PathBuf,
        /// The deadline.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
    },
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Resolves the daemon binary (see the module docs for the order).
pub fn resolve_daemon_path(configured: Option<&str>) -> Result<PathBuf, StartError> {
    resolve_daemon_path_from(configured, std::env::current_exe().ok())
}

/// [`resolve_daemon_path`] for a plugin binary at `exe`.
pub fn resolve_daemon_path_from(
    configured: Option<&str>,
    exe: Option<PathBuf>,
) -> Result<PathBuf, StartError> {
    if let Some(p) = configured {
        if p.contains('/') {
            let path = PathBuf::from(p);
            return if is_executable(&path) {
                Ok(path)
            } else {
                Err(StartError::NotFound {
                    tried: vec![format!("daemon.path {p:?} (not an executable file)")],
                })
            };
        }
        return on_path(p).ok_or_else(|| StartError::NotFound {
            tried: vec![format!("daemon.path {p:?} on PATH")],
        });
    }
    let mut tried = Vec::new();
    if let Some(exe) = exe {
        let real = std::fs::canonicalize(&exe).unwrap_or(exe.clone());
        let mut dirs: Vec<PathBuf> = Vec::new();
        for p in [&real, &exe] {
            if let Some(d) = p.parent()
                && !dirs.iter().any(|x| x == d)
            {
                dirs.push(d.to_path_buf());
            }
        }
        for d in dirs {
            for cand in [
                d.join(DAEMON_BIN),
                d.join("..").join("bin").join(DAEMON_BIN),
            ] {
                if is_executable(&cand) {
                    return Ok(cand);
                }
                tried.push(cand.display().to_string());
            }
        }
    }
    tried.push(format!("{DAEMON_BIN} on PATH"));
    on_path(DAEMON_BIN).ok_or(StartError::NotFound { tried })
}

/// The log file an auto-started daemon writes to.
pub fn log_file(cfg: &PluginConfig) -> PathBuf {
    cfg.daemon.log_file.clone().unwrap_or_else(|| {
        cfg.daemon_socket
            .parent()
            .unwrap_or(Path::new("/"))
            .join(DEFAULT_LOG_NAME)
    })
}

/// How much of the end of the daemon's log [`last_words`] reads (the log is appended to by
/// every start and never rotated here).
const LAST_WORDS_BYTES: u64 = 8 * 1024;

/// The last non-empty line of the log at `path`, without a leading timestamp.
fn last_words(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(LAST_WORDS_BYTES)));
        let _ = f.take(LAST_WORDS_BYTES).read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let Some(line) = text.lines().map(str::trim).rfind(|l| !l.is_empty()) else {
        return "(nothing logged)".to_string();
    };
    // A tracing line starts with its RFC 3339 time ("2026-11-28T14:00:00.123456Z  WARN ...").
    match line.split_once(char::is_whitespace) {
        Some((first, rest)) if is_timestamp(first) => rest.trim_start().to_string(),
        _ => line.to_string(),
    }
}

fn is_timestamp(word: &str) -> bool {
    let b = word.as_bytes();
    b.len() >= 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
}

/// Starts the daemon detached and waits until it answers GetDaemonInfo on the socket, or
/// `daemon.start_timeout` passes. Returns the daemon's pid.
pub async fn start(cfg: &PluginConfig) -> Result<u32, StartError> {
    let bin = resolve_daemon_path(cfg.daemon.path.as_deref())?;
    let log = log_file(cfg);
    let socket = cfg.daemon_socket.clone();
    let prepare = |what: &'static str, path: &Path, e: std::io::Error| StartError::Prepare {
        what,
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| prepare("creating socket dir", dir, e))?;
    }
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| prepare("creating log dir", dir, e))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| prepare("opening log file", &log, e))?;
    let err = out
        .try_clone()
        .map_err(|e| prepare("opening log file", &log, e))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket")
        .arg(&socket)
        .args(&cfg.daemon.args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // The daemon gets the agent's environment, minus the go-plugin handshake variables.
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("PLUGIN_") || name == super::MAGIC_COOKIE_KEY {
            cmd.env_remove(&k);
        }
    }
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| StartError::Spawn {
        path: bin.clone(),
        detail: e.to_string(),
    })?;
    let pid = child.id();
    tracing::info!(path = %bin.display(), pid, socket = %socket.display(), log = %log.display(), "auto-started elide-daemon");
    let (exited_tx, mut exited_rx) = tokio::sync::oneshot::channel();
    // Reap it whenever it exits, so it never lingers as a zombie of the plugin.
    std::thread::spawn(move || {
        let status = child.wait();
        let _ = exited_tx.send(status.map(|s| s.to_string()).unwrap_or_default());
    });
    let deadline = Instant::now() + cfg.daemon.start_timeout;
    loop {
        if let Ok(status) = exited_rx.try_recv() {
            return Err(StartError::Exited {
                path: bin,
                status,
                last_words: last_words(&log),
                log,
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StartError::Timeout {
                path: bin,
                socket,
                timeout: cfg.daemon.start_timeout,
                log,
            });
        }
        if socket.exists()
            && let Ok(c) = DaemonClient::connect(&socket, left.min(Duration::from_secs(2))).await
            && c.daemon_info().await.is_ok()
        {
            return Ok(pid);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_words_are_the_last_line_without_its_time_read_from_the_end() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("daemon.log");
        let mut text = String::new();
        // Far more than is read: an old, long log.
        for i in 0..2000 {
            text.push_str(&format!(
                "2026-11-28T14:00:{:02}.123456Z  INFO line {i}\n",
                i % 60
            ));
        }
        text.push_str("2026-11-28T14:01:02.654321Z ERROR cannot bind /run/elide/daemon.sock\n\n");
        std::fs::write(&log, &text).unwrap();
        assert_eq!(last_words(&log), "ERROR cannot bind /run/elide/daemon.sock");
        // The fatal line the binary prints itself has no time.
        std::fs::write(&log, "elide-daemon: state dir /x: permission denied\n").unwrap();
        assert_eq!(
            last_words(&log),
            "elide-daemon: state dir /x: permission denied"
        );
        std::fs::write(&log, "").unwrap();
        assert_eq!(last_words(&log), "(nothing logged)");
        assert_eq!(last_words(&d.path().join("absent")), "(nothing logged)");
    }

    #[test]
    fn configured_path_must_be_executable() {
        let e = resolve_daemon_path(Some("/nonexistent/elide-daemon")).unwrap_err();
        assert!(e.to_string().contains("not an executable"), "{e}");
        let e = resolve_daemon_path(Some("no-such-binary-xyz")).unwrap_err();
        assert!(e.to_string().contains("on PATH"), "{e}");
        assert_eq!(
            resolve_daemon_path(Some("/bin/sh")).unwrap(),
            PathBuf::from("/bin/sh")
        );
    }

    #[test]
    fn default_path_follows_the_install_layout() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let plugins = d.path().join("build/plugins");
        let bin = d.path().join("build/bin");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let plugin = plugins.join("elide");
        std::fs::write(&plugin, "").unwrap();
        let daemon = bin.join(DAEMON_BIN);
        std::fs::write(&daemon, "").unwrap();
        std::fs::set_permissions(&daemon, std::fs::Permissions::from_mode(0o755)).unwrap();
        let got = resolve_daemon_path_from(None, Some(plugin.clone())).unwrap();
        assert_eq!(got.canonicalize().unwrap(), daemon.canonicalize().unwrap());
        // Next to the plugin wins (cargo's target/debug layout).
        let beside = plugins.join(DAEMON_BIN);
        std::fs::write(&beside, "").unwrap();
        std::fs::set_permissions(&beside, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_daemon_path_from(None, Some(plugin)).unwrap(),
            beside
        );
    }

    #[test]
    fn default_log_file_sits_next_to_the_socket() {
        let cfg = PluginConfig {
            daemon_socket: "/tmp/x/d.sock".into(),
            ..PluginConfig::default()
        };
        assert_eq!(log_file(&cfg), PathBuf::from("/tmp/x/elide-daemon.log"));
    }
}
