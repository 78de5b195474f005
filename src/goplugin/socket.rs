//! The plugin's Unix socket: a fresh `plugin*` path in `PLUGIN_UNIX_SOCKET_DIR` (or the temp
//! dir), optional group ownership, and removal when the listener goes away.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Longest path that fits in `sockaddr_un.sun_path` with its terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Socket setup failures, each naming the path or setting involved.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The directory would give a path longer than `sun_path` allows.
    #[error(
        "socket path {path} is {len} bytes, more than the {MAX_SOCKET_PATH} a unix socket allows; set PLUGIN_UNIX_SOCKET_DIR to a shorter directory"
    )]
    TooLong {
        /// The offending path.
        path: String,
        /// Its length in bytes.
        len: usize,
    },
    /// bind/listen failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// `PLUGIN_UNIX_SOCKET_GROUP` names no group.
    #[error("PLUGIN_UNIX_SOCKET_GROUP={group}: no such group")]
    UnknownGroup {
        /// The value given.
        group: String,
    },
    /// chown/chmod for the group failed.
    #[error("cannot give socket {path} to group {group}: {source}")]
    Permissions {
        /// Socket path.
        path: PathBuf,
        /// Group requested.
        group: String,
        /// Cause.
        source: io::Error,
    },
}

/// A bound, listening socket whose file is unlinked on drop.
#[derive(Debug)]
pub struct PluginSocket {
    path: PathBuf,
    listener: Option<tokio::net::UnixListener>,
}

impl PluginSocket {
    /// Binds and listens on a new socket in `dir` (already listening on return, so the
    /// handshake may be printed right after).
    pub fn bind_in(dir: &Path, group: Option<&str>) -> Result<Self, SocketError> {
        let mut last_err = None;
        for _ in 0..16 {
            let path = dir.join(format!("plugin{}", random_suffix()));
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(SocketError::TooLong {
                    path: path.display().to_string(),
                    len,
                });
            }
            match tokio::net::UnixListener::bind(&path) {
                Ok(listener) => {
                    let socket = PluginSocket {
                        path,
                        listener: Some(listener),
                    };
                    if let Some(group) = group.filter(|g| !g.is_empty()) {
                        socket.give_to_group(group)?;
                    }
                    return Ok(socket);
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some((path, e)),
                Err(source) => return Err(SocketError::Bind { path, source }),
            }
        }
        let (path, source) = last_err.unwrap_or_else(|| {
            (
                dir.to_path_buf(),
                io::Error::other("no free socket name after 16 attempts"),
            )
        });
        Err(SocketError::Bind { path, source })
    }

    fn give_to_group(&self, group: &str) -> Result<(), SocketError> {
        let gid = match group.parse::<u32>() {
            Ok(n) => nix::unistd::Gid::from_raw(n),
            Err(_) => match nix::unistd::Group::from_name(group) {
                Ok(Some(g)) => g.gid,
                _ => {
                    return Err(SocketError::UnknownGroup {
                        group: group.to_string(),
                    });
                }
            },
        };
        let perm_err = |source: io::Error| SocketError::Permissions {
            path: self.path.clone(),
            group: group.to_string(),
            source,
        };
        nix::unistd::chown(&self.path, None, Some(gid)).map_err(|e| perm_err(e.into()))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o660))
            .map_err(perm_err)?;
        Ok(())
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands out the listener (once); the file stays owned by `self`.
    pub fn take_listener(&mut self) -> Option<tokio::net::UnixListener> {
        self.listener.take()
    }
}

impl Drop for PluginSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The directory for the socket: `PLUGIN_UNIX_SOCKET_DIR`, else `TMPDIR`, else `/tmp`.
pub fn socket_dir(env_dir: Option<&str>, tmpdir: Option<&str>) -> PathBuf {
    env_dir
        .filter(|d| !d.is_empty())
        .or(tmpdir.filter(|d| !d.is_empty()))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

fn random_suffix() -> u32 {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) % 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_is_listening_and_removed_on_drop() {
        let dir = tempfile::Builder::new()
            .prefix("e")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = PluginSocket::bind_in(dir.path(), None).unwrap();
        let path = sock.path().to_path_buf();
        assert!(
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("plugin")
        );
        // Listening already: a connect succeeds before anyone accepts.
        tokio::net::UnixStream::connect(&path).await.unwrap();
        drop(sock);
        assert!(!path.exists());
    }

    #[test]
    fn too_long_dir_is_rejected_with_the_path() {
        let long = format!("/tmp/{}", "d".repeat(120));
        let err = PluginSocket::bind_in(Path::new(&long), None).unwrap_err();
        assert!(err.to_string().contains("PLUGIN_UNIX_SOCKET_DIR"), "{err}");
    }

    #[tokio::test]
    async fn unknown_group_is_named() {
        let dir = tempfile::Builder::new()
            .prefix("e")
            .tempdir_in("/tmp")
            .unwrap();
        let err = PluginSocket::bind_in(dir.path(), Some("no-such-group-xyz")).unwrap_err();
        assert!(err.to_string().contains("no-such-group-xyz"), "{err}");
    }

    #[tokio::test]
    async fn numeric_group_sets_mode_0660() {
        let dir = tempfile::Builder::new()
            .prefix("e")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = PluginSocket::bind_in(dir.path(), Some("0")).unwrap();
        let mode = std::fs::metadata(sock.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
    }

    #[test]
    fn socket_dir_prefers_plugin_variable() {
        assert_eq!(socket_dir(Some("/a"), Some("/b")), PathBuf::from("/a"));
        assert_eq!(socket_dir(None, Some("/b")), PathBuf::from("/b"));
        assert_eq!(socket_dir(Some(""), None), PathBuf::from("/tmp"));
    }
}
