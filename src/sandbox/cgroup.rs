//! Per-execution cgroups on cgroup v2 (unified) or v1 (one hierarchy per controller).
//!
//! Layout: `<hierarchy>/<parent_name>/<execution>` in every hierarchy used. The root is a
//! parameter so tests can run the v2 logic against a temporary directory laid out like
//! cgroupfs. Files are written with plain `write(2)`, which is all cgroupfs needs.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which cgroup interface this machine offers for our use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Unified hierarchy with memory, cpu and pids controllers available.
    V2,
    /// Legacy hierarchies, one mount per controller.
    V1,
    /// No usable cgroup controllers: executions run without cgroup limits.
    None,
}

impl CgroupMode {
    /// "v2", "v1" or "none".
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupMode::V2 => "v2",
            CgroupMode::V1 => "v1",
            CgroupMode::None => "none",
        }
    }
}

/// Cgroup failures, each naming the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid cgroup limit {field} = {value}: {reason}")]
    InvalidLimit {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
    #[error("cgroups are not available on this machine (no v2 controllers, no v1 hierarchies)")]
    Unavailable,
    #[error("cgroup {path:?}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path:?}: still has processes after kill: {pids:?}")]
    Busy { path: PathBuf, pids: Vec<u32> },
}

fn io_err(path: &Path, op: &'static str, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Limits for one execution. `None` means unlimited / default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// Hard memory limit in bytes (swap is disabled for the group when the kernel allows it).
    pub memory_bytes: Option<u64>,
    /// Relative CPU weight in Nomad's unit (MHz, used as v1 `cpu.shares`).
    pub cpu_shares: Option<u64>,
    /// Maximum number of tasks (processes + threads).
    pub pids: Option<u64>,
}

/// Smallest memory limit accepted: below this an interpreter cannot even start, and the
/// kernel refuses limits under the current usage.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;

impl CgroupLimits {
    /// Rejects limits no execution could run under.
    pub fn validate(&self) -> Result<(), CgroupError> {
        if let Some(m) = self.memory_bytes
            && m < MIN_MEMORY_BYTES
        {
            return Err(CgroupError::InvalidLimit {
                field: "memory_bytes",
                value: m,
                reason: "must be at least 4 MiB",
            });
        }
        if self.pids == Some(0) {
            return Err(CgroupError::InvalidLimit {
                field: "pids",
                value: 0,
                reason: "must be at least 1 (the execution's own process)",
            });
        }
        if self.cpu_shares == Some(0) {
            return Err(CgroupError::InvalidLimit {
                field: "cpu_shares",
                value: 0,
                reason: "must be at least 1 (use None for the default weight)",
            });
        }
        Ok(())
    }
}

/// Resource usage of an execution cgroup; `None` means "not measured on this machine".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    pub cpu_user_ns: Option<u64>,
    pub cpu_system_ns: Option<u64>,
    pub cpu_total_ns: Option<u64>,
    pub cpu_throttled_periods: Option<u64>,
    pub cpu_throttled_ns: Option<u64>,
    pub memory_usage_bytes: Option<u64>,
    pub memory_max_usage_bytes: Option<u64>,
    pub memory_rss_bytes: Option<u64>,
}

impl CgroupStats {
    /// Names of the fields that were measured (for Nomad's `Measured` lists).
    pub fn measured(&self) -> Vec<&'static str> {
        [
            ("cpu_user_ns", self.cpu_user_ns),
            ("cpu_system_ns", self.cpu_system_ns),
            ("cpu_total_ns", self.cpu_total_ns),
            ("cpu_throttled_periods", self.cpu_throttled_periods),
            ("cpu_throttled_ns", self.cpu_throttled_ns),
            ("memory_usage_bytes", self.memory_usage_bytes),
            ("memory_max_usage_bytes", self.memory_max_usage_bytes),
            ("memory_rss_bytes", self.memory_rss_bytes),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|_| n))
        .collect()
    }
}

/// A v1 controller we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum V1Controller {
    Memory,
    Cpu,
    Cpuacct,
    Pids,
}

impl V1Controller {
    const ALL: [V1Controller; 4] = [
        V1Controller::Memory,
        V1Controller::Cpu,
        V1Controller::Cpuacct,
        V1Controller::Pids,
    ];

    /// Directory name under the cgroup root.
    pub fn name(self) -> &'static str {
        match self {
            V1Controller::Memory => "memory",
            V1Controller::Cpu => "cpu",
            V1Controller::Cpuacct => "cpuacct",
            V1Controller::Pids => "pids",
        }
    }

    /// A file that only exists in a hierarchy where this controller is attached.
    fn marker(self) -> &'static str {
        match self {
            V1Controller::Memory => "memory.usage_in_bytes",
            V1Controller::Cpu => "cpu.shares",
            V1Controller::Cpuacct => "cpuacct.usage",
            V1Controller::Pids => "pids.current",
        }
    }
}

/// Whether a v1 hierarchy with `controller` is mounted at `dir` (per /proc/self/mountinfo).
/// Needed because some root cgroups (pids) have no controller file to recognise them by.
fn v1_mounted_at(dir: &Path, controller: &str) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    info.lines().any(|line| {
        let Some((pre, post)) = line.split_once(" - ") else {
            return false;
        };
        let mount_point = pre.split(' ').nth(4).unwrap_or("");
        let mut post = post.split(' ');
        let fstype = post.next().unwrap_or("");
        let super_opts = post.nth(1).unwrap_or("");
        fstype == "cgroup"
            && Path::new(mount_point) == dir
            && super_opts.split(',').any(|o| o == controller)
    })
}

/// Controllers we need on v2.
const V2_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

#[derive(Debug, Clone)]
enum Layout {
    V2 {
        /// Where the unified hierarchy is mounted (the directory holding cgroup.controllers).
        hierarchy: PathBuf,
    },
    V1 {
        /// (controller, hierarchy mount) for each controller present. Co-mounted controllers
        /// (cpu,cpuacct) share a mount; directories are deduplicated when used.
        hierarchies: Vec<(V1Controller, PathBuf)>,
    },
    None,
}

/// Creates, inspects and removes per-execution cgroups under one parent.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    root: PathBuf,
    parent_name: String,
    layout: Layout,
    /// The parent directory in each hierarchy, co-mounted hierarchies once: resolved at
    /// detection, as every create and remove needs them (resolving costs a readlink per path
    /// component and hierarchy).
    parents: Vec<(Option<V1Controller>, PathBuf)>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_u64(path: &Path) -> Option<u64> {
    read_trimmed(path)?.parse().ok()
}

/// The whole content of a small cgroupfs file through an fd opened earlier (cgroupfs generates
/// it afresh for a read at offset 0).
fn read_at_start(f: &fs::File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 1024];
    let n = f.read_at(&mut buf, 0).ok()?;
    String::from_utf8(buf[..n].to_vec()).ok()
}

/// Value of `key` in a flat-keyed file (`key value` per line).
fn keyed(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok())?
    })
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    // cgroupfs ignores O_TRUNC and O_CREAT on existing files; on the test fake they give a
    // file holding exactly the last value written.
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_err(path, "open for write", e))?;
    write_opened(f, path, value)
}

fn write_opened(mut f: fs::File, path: &Path, value: &str) -> Result<(), CgroupError> {
    f.write_all(value.as_bytes())
        .map_err(|e| io_err(path, "write", e))
}

/// Writes an optional file: a missing file (feature not compiled in / accounting off) is fine.
/// Opened without `O_CREAT`, so "missing" is the open's own answer and costs no extra stat.
fn write_optional(path: &Path, value: &str) -> Result<bool, CgroupError> {
    match fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => write_opened(f, path, value).map(|()| true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path, "open for write", e)),
    }
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    let bad = |reason| {
        Err(CgroupError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 200 {
        return bad("longer than 200 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return bad("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

/// Nomad's v1 cpu.shares → v2 cpu.weight conversion (the mapping runc and systemd use):
/// shares 2..262144 map linearly onto weight 1..10000.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

impl CgroupManager {
    /// Detects the cgroup mode under `root` (normally `/sys/fs/cgroup`) and manages
    /// executions under `<hierarchy>/<parent_name>`.
    ///
    /// V2 when the unified hierarchy (at `root`, or `root/unified` on hybrid systems) offers the
    /// memory, cpu and pids controllers; else V1 when legacy controller hierarchies are mounted
    /// under `root`; else None.
    pub fn detect_at(root: &Path, parent_name: &str) -> Self {
        let layout = Self::detect_layout(root);
        let parents = Self::resolve_parent_dirs(&layout, parent_name);
        CgroupManager {
            root: root.to_path_buf(),
            parent_name: parent_name.to_string(),
            layout,
            parents,
        }
    }

    /// The parent of the execution cgroups as `/proc/<pid>/cgroup` shows it (`/elide`); None
    /// without cgroups.
    pub fn parent_path(&self) -> Option<String> {
        (self.mode() != CgroupMode::None)
            .then(|| format!("/{}", self.parent_name.trim_matches('/')))
    }

    /// [`detect_at`](Self::detect_at) on `/sys/fs/cgroup`.
    pub fn detect(parent_name: &str) -> Self {
        Self::detect_at(Path::new("/sys/fs/cgroup"), parent_name)
    }

    fn detect_layout(root: &Path) -> Layout {
        for hierarchy in [root.to_path_buf(), root.join("unified")] {
            if let Some(c) = read_trimmed(&hierarchy.join("cgroup.controllers")) {
                let have: Vec<&str> = c.split_whitespace().collect();
                if V2_CONTROLLERS.iter().all(|n| have.contains(n)) {
                    return Layout::V2 { hierarchy };
                }
            }
        }
        let hierarchies: Vec<(V1Controller, PathBuf)> = V1Controller::ALL
            .into_iter()
            .filter_map(|c| {
                let dir = root.join(c.name());
                (dir.join(c.marker()).exists() || v1_mounted_at(&dir, c.name())).then_some((c, dir))
            })
            .collect();
        if hierarchies.is_empty() {
            Layout::None
        } else {
            Layout::V1 { hierarchies }
        }
    }

    /// The detected mode.
    pub fn mode(&self) -> CgroupMode {
        match self.layout {
            Layout::V2 { .. } => CgroupMode::V2,
            Layout::V1 { .. } => CgroupMode::V1,
            Layout::None => CgroupMode::None,
        }
    }

    /// The cgroup root this manager was detected at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Controllers in use ("memory", "cpu", "pids", "cpuacct"), for DaemonInfo.
    pub fn controllers(&self) -> Vec<String> {
        match &self.layout {
            Layout::V2 { hierarchy } => {
                let have = read_trimmed(&hierarchy.join("cgroup.controllers")).unwrap_or_default();
                have.split_whitespace()
                    .filter(|c| V2_CONTROLLERS.contains(c))
                    .map(str::to_string)
                    .collect()
            }
            Layout::V1 { hierarchies } => hierarchies
                .iter()
                .map(|(c, _)| c.name().to_string())
                .collect(),
            Layout::None => Vec::new(),
        }
    }

    /// Whether this process may create cgroups in every hierarchy in use (write access to the
    /// parent, or to the hierarchy root when the parent does not exist yet).
    pub fn writable(&self) -> bool {
        let dirs = self.parent_dirs();
        !dirs.is_empty()
            && dirs.iter().all(|(_, parent)| {
                let target = if parent.exists() {
                    parent.as_path()
                } else {
                    parent.parent().unwrap_or(parent)
                };
                nix::unistd::access(target, nix::unistd::AccessFlags::W_OK).is_ok()
            })
    }

    /// Human-readable description: mode, where, controllers.
    pub fn describe(&self) -> String {
        match &self.layout {
            Layout::V2 { hierarchy } => format!(
                "cgroup v2 at {} (controllers: {})",
                hierarchy.display(),
                self.controllers().join(" ")
            ),
            Layout::V1 { .. } => format!(
                "cgroup v1 under {} (controllers: {})",
                self.root.display(),
                self.controllers().join(" ")
            ),
            Layout::None => "no usable cgroup controllers".to_string(),
        }
    }

    /// The parent directories (one per hierarchy; deduplicated).
    fn parent_dirs(&self) -> &[(Option<V1Controller>, PathBuf)] {
        &self.parents
    }

    fn resolve_parent_dirs(
        layout: &Layout,
        parent_name: &str,
    ) -> Vec<(Option<V1Controller>, PathBuf)> {
        match layout {
            Layout::V2 { hierarchy } => vec![(None, hierarchy.join(parent_name))],
            Layout::V1 { hierarchies } => {
                let mut seen: Vec<PathBuf> = Vec::new();
                let mut out = Vec::new();
                for (c, h) in hierarchies {
                    let canon = h.canonicalize().unwrap_or_else(|_| h.clone());
                    if seen.contains(&canon) {
                        continue;
                    }
                    seen.push(canon);
                    out.push((Some(*c), h.join(parent_name)));
                }
                out
            }
            Layout::None => Vec::new(),
        }
    }

    /// Makes an execution's directory in one hierarchy. Its parent exists but for the first
    /// execution (or after someone removed it), so the execution's own mkdir comes first: no
    /// EEXIST mkdir of the parent per hierarchy and start.
    fn make_execution_dir(dir: &Path) -> Result<(), CgroupError> {
        let made = match (fs::create_dir(dir), dir.parent()) {
            (Err(e), Some(parent)) if e.kind() == ErrorKind::NotFound => {
                Self::ensure_dir(parent)?;
                fs::create_dir(dir)
            }
            (made, _) => made,
        };
        made.map_err(|e| {
            let op = if e.kind() == ErrorKind::AlreadyExists {
                "mkdir (an execution cgroup with this name already exists)"
            } else {
                "mkdir"
            };
            io_err(dir, op, e)
        })
    }

    fn ensure_dir(path: &Path) -> Result<(), CgroupError> {
        match fs::create_dir(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io_err(path, "mkdir", e)),
        }
    }

    /// Enables our controllers for the children of `dir` (v2 `cgroup.subtree_control`).
    fn enable_subtree(dir: &Path) -> Result<(), CgroupError> {
        // A child's available controllers are by definition what its parent enabled; fall back
        // to that when cgroup.controllers is absent (the test fake does not synthesise it).
        let available = read_trimmed(&dir.join("cgroup.controllers"))
            .or_else(|| {
                dir.parent()
                    .and_then(|p| read_trimmed(&p.join("cgroup.subtree_control")))
            })
            .unwrap_or_default();
        let enabled = read_trimmed(&dir.join("cgroup.subtree_control")).unwrap_or_default();
        let missing: Vec<String> = V2_CONTROLLERS
            .iter()
            .filter(|c| {
                available
                    .split_whitespace()
                    .any(|a| a.trim_start_matches('+') == **c)
            })
            .filter(|c| {
                !enabled
                    .split_whitespace()
                    .any(|e| e.trim_start_matches('+') == **c)
            })
            .map(|c| format!("+{c}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let file = dir.join("cgroup.subtree_control");
        write_file(&file, &missing.join(" ")).map_err(|e| match e {
            CgroupError::Io { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                CgroupError::Io {
                    path: file.clone(),
                    op: "enable controllers (EBUSY: this cgroup has processes of its own; cgroup \
                         v2 only delegates from cgroups without processes, so run the daemon in \
                         a leaf cgroup and point cgroup_root at a delegated subtree)",
                    source,
                }
            }
            other => other,
        })
    }

    /// Creates the cgroup of one execution and applies `limits` (file I/O on cgroupfs:
    /// call from a blocking context).
    pub fn create(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<ExecutionCgroup, CgroupError> {
        validate_name(name)?;
        limits.validate()?;
        let dirs = match &self.layout {
            Layout::None => return Err(CgroupError::Unavailable),
            Layout::V2 { hierarchy } => {
                Self::enable_subtree(hierarchy)?;
                let parent = hierarchy.join(&self.parent_name);
                Self::ensure_dir(&parent)?;
                Self::enable_subtree(&parent)?;
                vec![(None, parent.join(name))]
            }
            Layout::V1 { .. } => self
                .parent_dirs()
                .iter()
                .map(|(c, p)| (*c, p.join(name)))
                .collect(),
        };
        let mut cg = self.execution_cgroup(name, dirs);
        let mut created: Vec<&Path> = Vec::new();
        let undo = |created: &[&Path]| {
            for d in created {
                let _ = remove_tree(d);
            }
        };
        for (_, dir) in &cg.dirs {
            if let Err(e) = Self::make_execution_dir(dir) {
                undo(&created);
                return Err(e);
            }
            created.push(dir);
        }
        if let Err(e) = cg.apply_limits(limits) {
            let _ = cg.remove_dirs();
            return Err(e);
        }
        cg.oom_events = cg
            .oom_events_path()
            .and_then(|p| fs::File::open(p).ok())
            .map(std::sync::Arc::new);
        Ok(cg)
    }

    /// The handle of execution cgroup `name` at `dirs` (nothing opened yet).
    fn execution_cgroup(
        &self,
        name: &str,
        dirs: Vec<(Option<V1Controller>, PathBuf)>,
    ) -> ExecutionCgroup {
        ExecutionCgroup {
            mode: self.mode(),
            dirs,
            rel: format!("/{}/{}", self.parent_name, name),
            oom_events: None,
        }
    }

    /// Removes the (empty) parent directories, e.g. at daemon shutdown after every execution
    /// cgroup was removed. A parent that still has children is left alone.
    pub fn remove_parent(&self) -> Result<(), CgroupError> {
        for (_, parent) in self.parent_dirs() {
            match fs::remove_dir(parent) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENOTEMPTY)) => {
                }
                Err(e) => return Err(io_err(parent, "rmdir", e)),
            }
        }
        Ok(())
    }

    /// Kills and removes every execution cgroup left under the parent by a previous daemon.
    /// Call at startup, before any execution is created. Returns how many were removed.
    /// Blocking (polls while processes die).
    pub fn reap_stale(&self) -> Result<usize, CgroupError> {
        let mut names: Vec<String> = Vec::new();
        for (_, parent) in self.parent_dirs() {
            let entries = match fs::read_dir(parent) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(parent, "read_dir", e)),
            };
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let n = entry.file_name().to_string_lossy().into_owned();
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
        }
        let mut removed = 0;
        for name in names {
            let dirs: Vec<(Option<V1Controller>, PathBuf)> = self
                .parent_dirs()
                .iter()
                .map(|(c, p)| (*c, p.join(&name)))
                .filter(|(_, d)| d.is_dir())
                .collect();
            self.execution_cgroup(&name, dirs).remove()?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// The cgroup (one directory per hierarchy) of one execution.
#[derive(Debug, Clone)]
pub struct ExecutionCgroup {
    mode: CgroupMode,
    dirs: Vec<(Option<V1Controller>, PathBuf)>,
    /// Path relative to the hierarchy root (`/<parent>/<name>`), as `/proc/<pid>/cgroup` shows it.
    rel: String,
    /// The file that counts OOM kills, opened with the cgroup: the exit path reads it with one
    /// `pread` instead of a path lookup in cgroupfs (0.1 ms there).
    oom_events: Option<std::sync::Arc<fs::File>>,
}

impl ExecutionCgroup {
    /// The execution's directories (one on v2, one per hierarchy on v1).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    /// The `cgroup.procs` files the child must join (all of them).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// The files a freshly forked, single-threaded child writes `0` to in order to move itself
    /// into the execution: v1 `tasks`, v2 `cgroup.procs`.
    ///
    /// On v1 a thread moving itself through `tasks` skips the global thread-group lock that
    /// `cgroup.procs` (or any pid other than 0) takes; that lock's write side waits out an RCU
    /// grace period whenever cgroups were idle for a few tens of milliseconds (~7 ms per start
    /// on the machines we measured). With a single thread, the thread is the whole process.
    pub fn self_join_files(&self) -> Vec<PathBuf> {
        let file = match self.mode {
            CgroupMode::V1 => "tasks",
            _ => "cgroup.procs",
        };
        self.dirs.iter().map(|(_, d)| d.join(file)).collect()
    }

    fn v1_dir(&self, c: V1Controller) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(k, _)| *k == Some(c))
            .map(|(_, d)| d.as_path())
    }

    /// The directory holding `file` for this execution: the v2 dir, or the v1 hierarchy dir
    /// whose controller owns the file prefix (co-mounted cpu/cpuacct resolve to one dir).
    fn file(&self, c: V1Controller, file: &str) -> Option<PathBuf> {
        match self.mode {
            CgroupMode::V2 => self.dirs.first().map(|(_, d)| d.join(file)),
            CgroupMode::V1 => {
                if let Some(d) = self.v1_dir(c) {
                    return Some(d.join(file));
                }
                // Co-mounted hierarchy deduplicated under another controller's name.
                self.dirs
                    .iter()
                    .map(|(_, d)| d.join(file))
                    .find(|p| p.exists())
            }
            CgroupMode::None => None,
        }
    }

    fn require(&self, c: V1Controller, what: &'static str) -> Result<&Path, CgroupError> {
        self.v1_dir(c)
            .ok_or_else(|| missing_controller(c.name(), what))
    }

    /// Sets `limits` on an existing cgroup: a warm worker placed in its cgroup ahead of time
    /// gets the execution's limits when it is handed the execution.
    pub fn set_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        limits.validate()?;
        self.apply_limits(limits)
    }

    fn apply_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        match self.mode {
            CgroupMode::V2 => {
                let Some((_, dir)) = self.dirs.first() else {
                    return Ok(());
                };
                if let Some(m) = limits.memory_bytes {
                    write_file(&dir.join("memory.max"), &m.to_string())?;
                    // Swap would let a hog outlive its limit; absent when swap accounting is off.
                    let _ = write_file(&dir.join("memory.swap.max"), "0");
                }
                // Kill the whole execution on OOM, not just the largest process.
                write_file(&dir.join("memory.oom.group"), "1")?;
                if let Some(s) = limits.cpu_shares {
                    write_file(&dir.join("cpu.weight"), &shares_to_weight(s).to_string())?;
                }
                if let Some(p) = limits.pids {
                    write_file(&dir.join("pids.max"), &p.to_string())?;
                }
            }
            CgroupMode::V1 => {
                if let Some(m) = limits.memory_bytes {
                    let dir = self.require(V1Controller::Memory, "memory limit")?;
                    write_file(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                    // memsw must be >= limit_in_bytes, so it comes second.
                    write_optional(&dir.join("memory.memsw.limit_in_bytes"), &m.to_string())?;
                    let _ = write_optional(&dir.join("memory.swappiness"), "0");
                }
                if let Some(s) = limits.cpu_shares {
                    let written = match self.file(V1Controller::Cpu, "cpu.shares") {
                        Some(f) => write_optional(&f, &s.max(2).to_string())?,
                        None => false,
                    };
                    if !written {
                        return Err(missing_controller("cpu", "cpu shares"));
                    }
                }
                if let Some(p) = limits.pids {
                    let dir = self.require(V1Controller::Pids, "pids limit")?;
                    write_file(&dir.join("pids.max"), &p.to_string())?;
                }
            }
            CgroupMode::None => {}
        }
        Ok(())
    }

    /// Whether the kernel OOM-killed a process of this execution.
    ///
    /// v2: `memory.events` `oom_kill` > 0. v1: `memory.oom_control` `oom_kill` > 0 (kernel ≥
    /// 4.13); on older kernels, `memory.failcnt` > 0 with peak usage at the limit.
    pub fn oom_killed(&self) -> bool {
        // Opened with the cgroup (see `create`); a file that was not there then is looked up.
        let counted = match &self.oom_events {
            Some(f) => read_at_start(f),
            None => self
                .oom_events_path()
                .and_then(|p| fs::read_to_string(p).ok()),
        };
        if let Some(n) = counted.as_deref().and_then(|c| keyed(c, "oom_kill")) {
            return n > 0;
        }
        match self.mode {
            CgroupMode::V2 => false,
            CgroupMode::V1 => {
                // A kernel older than 4.13 does not count kills: judge by the memory counters.
                let Some(dir) = self.v1_dir(V1Controller::Memory) else {
                    return false;
                };
                let failcnt = read_u64(&dir.join("memory.failcnt")).unwrap_or(0);
                let max = read_u64(&dir.join("memory.max_usage_in_bytes")).unwrap_or(0);
                let limit = read_u64(&dir.join("memory.limit_in_bytes")).unwrap_or(u64::MAX);
                failcnt > 0 && max.saturating_add(1 << 20) >= limit
            }
            CgroupMode::None => false,
        }
    }

    /// The file whose `oom_kill` line counts the cgroup's OOM kills.
    fn oom_events_path(&self) -> Option<PathBuf> {
        match self.mode {
            CgroupMode::V2 => self.file(V1Controller::Memory, "memory.events"),
            CgroupMode::V1 => self
                .v1_dir(V1Controller::Memory)
                .map(|d| d.join("memory.oom_control")),
            CgroupMode::None => None,
        }
    }

    /// Current usage counters; fields the kernel does not expose are `None`.
    pub fn stats(&self) -> CgroupStats {
        let mut s = CgroupStats::default();
        match self.mode {
            CgroupMode::V2 => {
                let Some((_, dir)) = self.dirs.first() else {
                    return s;
                };
                if let Ok(c) = fs::read_to_string(dir.join("cpu.stat")) {
                    s.cpu_total_ns = keyed(&c, "usage_usec").map(|u| u * 1000);
                    s.cpu_user_ns = keyed(&c, "user_usec").map(|u| u * 1000);
                    s.cpu_system_ns = keyed(&c, "system_usec").map(|u| u * 1000);
                    s.cpu_throttled_periods = keyed(&c, "nr_throttled");
                    s.cpu_throttled_ns = keyed(&c, "throttled_usec").map(|u| u * 1000);
                }
                s.memory_usage_bytes = read_u64(&dir.join("memory.current"));
                s.memory_max_usage_bytes = read_u64(&dir.join("memory.peak"));
                s.memory_rss_bytes = fs::read_to_string(dir.join("memory.stat"))
                    .ok()
                    .and_then(|c| keyed(&c, "anon"));
            }
            CgroupMode::V1 => {
                if let Some(f) = self.file(V1Controller::Cpuacct, "cpuacct.usage_user")
                    && f.exists()
                {
                    s.cpu_user_ns = read_u64(&f);
                    s.cpu_system_ns = self
                        .file(V1Controller::Cpuacct, "cpuacct.usage_sys")
                        .and_then(|f| read_u64(&f));
                } else if let Some(c) = self
                    .file(V1Controller::Cpuacct, "cpuacct.stat")
                    .and_then(|f| fs::read_to_string(f).ok())
                {
                    let tick_ns = ticks_to_ns();
                    s.cpu_user_ns = keyed(&c, "user").map(|t| t * tick_ns);
                    s.cpu_system_ns = keyed(&c, "system").map(|t| t * tick_ns);
                }
                s.cpu_total_ns = self
                    .file(V1Controller::Cpuacct, "cpuacct.usage")
                    .and_then(|f| read_u64(&f));
                if let Some(c) = self
                    .file(V1Controller::Cpu, "cpu.stat")
                    .and_then(|f| fs::read_to_string(f).ok())
                {
                    s.cpu_throttled_periods = keyed(&c, "nr_throttled");
                    s.cpu_throttled_ns = keyed(&c, "throttled_time");
                }
                if let Some(dir) = self.v1_dir(V1Controller::Memory) {
                    s.memory_usage_bytes = read_u64(&dir.join("memory.usage_in_bytes"));
                    s.memory_max_usage_bytes = read_u64(&dir.join("memory.max_usage_in_bytes"));
                    s.memory_rss_bytes = fs::read_to_string(dir.join("memory.stat"))
                        .ok()
                        .and_then(|c| keyed(&c, "total_rss").or_else(|| keyed(&c, "rss")));
                }
            }
            CgroupMode::None => {}
        }
        s
    }

    /// Pids currently in the execution (union over hierarchies).
    pub fn pids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for (_, dir) in &self.dirs {
            collect_procs(dir, &mut out);
        }
        out
    }

    /// Kills every process of the execution and waits (bounded) until none is left.
    ///
    /// v2 uses `cgroup.kill` when the kernel has it (≥ 5.14); otherwise every pid listed is
    /// sent SIGKILL, repeatedly, so processes forked meanwhile are caught too. Blocking (polls
    /// for up to 10 s): call from a blocking context.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if self.mode == CgroupMode::V2
            && let Some((_, dir)) = self.dirs.first()
        {
            let _ = write_optional(&dir.join("cgroup.kill"), "1")?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            for p in &pids {
                kill_member(*p, &self.rel);
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy {
                    path: self
                        .dirs
                        .first()
                        .map(|(_, d)| d.clone())
                        .unwrap_or_default(),
                    pids,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn remove_dirs(&self) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            remove_tree(dir)?;
        }
        Ok(())
    }

    /// Kills what is left in the execution and removes its directories. Blocking (see
    /// [`kill_all`](Self::kill_all)).
    pub fn remove(self) -> Result<(), CgroupError> {
        if self.remove_if_empty() {
            return Ok(());
        }
        self.kill_all()?;
        self.remove_dirs()
    }

    /// The usual end: the execution's processes are gone and it made no cgroups of its own,
    /// so one `rmdir` per hierarchy removes it (the kernel refuses a cgroup that still has
    /// members or children). Whether every directory went; what is left takes the full path.
    fn remove_if_empty(&self) -> bool {
        self.dirs.iter().all(|(_, dir)| match fs::remove_dir(dir) {
            Ok(()) => true,
            Err(e) => e.kind() == ErrorKind::NotFound,
        })
    }
}

/// Pids in `dir` and in every cgroup below it (a root snippet may create sub-cgroups; their
/// members are not listed in the parent's cgroup.procs).
fn collect_procs(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(c) = fs::read_to_string(dir.join("cgroup.procs")) {
        for p in c.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_procs(&e.path(), out);
            }
        }
    }
}

/// Removes a cgroup directory and any cgroups below it, deepest first.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut cleared_files = false;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            // Exiting tasks leave the cgroup asynchronously.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            // cgroupfs removes its control files itself; only the test fake holds regular
            // files that must go first.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && !cleared_files => {
                cleared_files = true;
                if let Ok(entries) = fs::read_dir(dir) {
                    for e in entries.flatten() {
                        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                            let _ = fs::remove_file(e.path());
                        }
                    }
                }
            }
            Err(e) => return Err(io_err(dir, "rmdir", e)),
        }
    }
}

/// The cgroup paths of `pid`, one per hierarchy, as `/proc/<pid>/cgroup` shows them (relative
/// to each hierarchy's root); empty once it is gone.
pub fn paths_of(pid: u32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|c| {
            c.lines()
                .filter_map(|l| Some(l.splitn(3, ':').nth(2)?.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `/proc/<pid>/cgroup` places `pid` in the cgroup at `rel` (or below it) in any
/// hierarchy.
fn in_cgroup(pid: u32, rel: &str) -> bool {
    paths_of(pid)
        .iter()
        .any(|path| path.ends_with(rel) || path.contains(&format!("{rel}/")))
}

/// SIGKILLs `pid` only if it is still a member of our cgroup, without a pid-reuse race: the
/// pidfd pins the process identity before membership is checked.
fn kill_member(pid: u32, rel: &str) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let pidfd = match super::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            if e.raw_os_error() == Some(libc::ENOSYS) && in_cgroup(pid, rel) {
                // Kernel < 5.3: best effort.
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
            return;
        }
    };
    if in_cgroup(pid, rel) {
        let _ = super::pidfd_send_signal(&pidfd, libc::SIGKILL);
    }
}

fn missing_controller(controller: &str, what: &'static str) -> CgroupError {
    CgroupError::Io {
        path: PathBuf::from(controller),
        op: what,
        source: std::io::Error::new(
            ErrorKind::Unsupported,
            format!("the cgroup v1 {controller} controller is not mounted"),
        ),
    }
}

fn ticks_to_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        1_000_000_000 / hz as u64
    } else {
        10_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap_or_else(|e| panic!("{p:?}: {e}"))
    }

    /// A temp dir laid out like a cgroup2 mount with memory, cpu and pids available.
    fn fake_v2() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        fs::write(
            d.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids\n",
        )
        .expect("write");
        fs::write(d.path().join("cgroup.subtree_control"), "").expect("write");
        d
    }

    #[test]
    fn detects_v2_v1_and_none() {
        let v2 = fake_v2();
        let m = CgroupManager::detect_at(v2.path(), "elide");
        assert_eq!(m.mode(), CgroupMode::V2);
        assert_eq!(m.controllers(), ["cpu", "memory", "pids"]);

        // v2 without the needed controllers and no v1 mounts: None.
        let empty = tempfile::tempdir().expect("tempdir");
        fs::write(empty.path().join("cgroup.controllers"), "cpuset io\n").expect("write");
        assert_eq!(
            CgroupManager::detect_at(empty.path(), "elide").mode(),
            CgroupMode::None
        );

        // Hybrid: unified with no controllers plus v1 hierarchies: V1.
        let hybrid = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(hybrid.path().join("unified")).expect("mkdir");
        fs::write(hybrid.path().join("unified/cgroup.controllers"), "").expect("write");
        for (c, marker) in [
            ("memory", "memory.usage_in_bytes"),
            ("pids", "pids.current"),
        ] {
            fs::create_dir_all(hybrid.path().join(c)).expect("mkdir");
            fs::write(hybrid.path().join(c).join(marker), "0").expect("write");
        }
        let m = CgroupManager::detect_at(hybrid.path(), "elide");
        assert_eq!(m.mode(), CgroupMode::V1);
        assert_eq!(m.controllers(), ["memory", "pids"]);

        // Hybrid whose unified mount has the controllers: V2 there.
        fs::write(
            hybrid.path().join("unified/cgroup.controllers"),
            "memory cpu pids",
        )
        .expect("write");
        let m = CgroupManager::detect_at(hybrid.path(), "elide");
        assert_eq!(m.mode(), CgroupMode::V2);
        assert!(m.describe().contains("unified"), "{}", m.describe());
    }

    #[test]
    fn v2_create_writes_limits_and_enables_controllers() {
        let root = fake_v2();
        let m = CgroupManager::detect_at(root.path(), "elide");
        let limits = CgroupLimits {
            memory_bytes: Some(64 << 20),
            cpu_shares: Some(500),
            pids: Some(32),
        };
        let cg = m.create("exec-1", &limits).expect("create");
        let dir = root.path().join("elide/exec-1");
        assert_eq!(cg.dirs(), vec![dir.clone()]);
        assert_eq!(cg.procs_files(), vec![dir.join("cgroup.procs")]);
        assert_eq!(cg.self_join_files(), vec![dir.join("cgroup.procs")]);
        assert_eq!(read(&dir.join("memory.max")), (64u64 << 20).to_string());
        assert_eq!(read(&dir.join("memory.swap.max")), "0");
        assert_eq!(read(&dir.join("memory.oom.group")), "1");
        assert_eq!(
            read(&dir.join("cpu.weight")),
            shares_to_weight(500).to_string()
        );
        assert_eq!(read(&dir.join("pids.max")), "32");
        // Root and parent both delegate our three controllers to their children.
        for d in [root.path().to_path_buf(), root.path().join("elide")] {
            let sc = read(&d.join("cgroup.subtree_control"));
            let mut got: Vec<&str> = sc.split_whitespace().collect();
            got.sort_unstable();
            assert_eq!(got, ["+cpu", "+memory", "+pids"], "{d:?}");
        }
        // A second execution does not rewrite already-enabled controllers or collide.
        let cg2 = m
            .create("exec-2", &CgroupLimits::default())
            .expect("create 2");
        assert!(!root.path().join("elide/exec-2/memory.max").exists());
        assert!(
            m.create("exec-1", &limits).is_err(),
            "duplicate name must fail"
        );
        cg2.remove().expect("remove");
        cg.remove().expect("remove");
        assert!(!dir.exists());
    }

    #[test]
    fn cpu_weight_follows_the_shares_mapping() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(0), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }

    #[test]
    fn v2_oom_kill_and_cpu_stat_parsing() {
        let root = fake_v2();
        let m = CgroupManager::detect_at(root.path(), "elide");
        let cg = m.create("e", &CgroupLimits::default()).expect("create");
        let dir = root.path().join("elide/e");
        assert!(!cg.oom_killed(), "no memory.events yet");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 1\noom_kill 0\noom_group_kill 0\n",
        )
        .expect("write");
        assert!(!cg.oom_killed(), "oom without a kill is not an OOM kill");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 40\noom 2\noom_kill 1\noom_group_kill 1\n",
        )
        .expect("write");
        assert!(cg.oom_killed());

        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\nnr_throttled 3\nthrottled_usec 70\n",
        )
        .expect("write");
        fs::write(dir.join("memory.current"), "4096\n").expect("write");
        fs::write(dir.join("memory.peak"), "8192\n").expect("write");
        fs::write(dir.join("memory.stat"), "anon 2048\nfile 100\n").expect("write");
        let s = cg.stats();
        assert_eq!(s.cpu_total_ns, Some(1_500_000));
        assert_eq!(s.cpu_user_ns, Some(1_000_000));
        assert_eq!(s.cpu_system_ns, Some(500_000));
        assert_eq!(s.cpu_throttled_periods, Some(3));
        assert_eq!(s.cpu_throttled_ns, Some(70_000));
        assert_eq!(s.memory_usage_bytes, Some(4096));
        assert_eq!(s.memory_max_usage_bytes, Some(8192));
        assert_eq!(s.memory_rss_bytes, Some(2048));
        assert_eq!(s.measured().len(), 8);
    }

    #[test]
    fn v2_kill_all_writes_cgroup_kill_and_reap_removes_leftovers() {
        let root = fake_v2();
        let m = CgroupManager::detect_at(root.path(), "elide");
        let cg = m.create("e1", &CgroupLimits::default()).expect("create");
        let dir = root.path().join("elide/e1");
        fs::write(dir.join("cgroup.kill"), "").expect("write");
        fs::write(dir.join("cgroup.procs"), "").expect("write");
        cg.kill_all().expect("kill_all");
        assert_eq!(read(&dir.join("cgroup.kill")), "1");
        m.create("e2", &CgroupLimits::default()).expect("create");
        m.create("e3", &CgroupLimits::default()).expect("create");
        assert_eq!(m.reap_stale().expect("reap"), 3);
        let dirs_left = fs::read_dir(root.path().join("elide"))
            .expect("ls")
            .flatten()
            .filter(|e| e.path().is_dir())
            .count();
        assert_eq!(dirs_left, 0);
        assert_eq!(m.reap_stale().expect("reap again"), 0);
    }

    #[test]
    fn rejects_bad_names_and_no_cgroups() {
        let root = fake_v2();
        let m = CgroupManager::detect_at(root.path(), "elide");
        for bad in ["", ".", "..", "a/b", "../x", "a b", "x\0"] {
            let err = m.create(bad, &CgroupLimits::default()).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let none = tempfile::tempdir().expect("tempdir");
        let m = CgroupManager::detect_at(none.path(), "elide");
        assert_eq!(m.mode(), CgroupMode::None);
        assert!(matches!(
            m.create("x", &CgroupLimits::default()),
            Err(CgroupError::Unavailable)
        ));
        assert_eq!(m.reap_stale().expect("nothing to reap"), 0);
    }

    #[test]
    fn v1_fake_writes_limits_and_reads_oom_control() {
        let root = tempfile::tempdir().expect("tempdir");
        for (c, marker) in [
            ("memory", "memory.usage_in_bytes"),
            ("cpu", "cpu.shares"),
            ("cpuacct", "cpuacct.usage"),
            ("pids", "pids.current"),
        ] {
            fs::create_dir_all(root.path().join(c)).expect("mkdir");
            fs::write(root.path().join(c).join(marker), "0").expect("write");
        }
        let m = CgroupManager::detect_at(root.path(), "elide");
        assert_eq!(m.mode(), CgroupMode::V1);
        let limits = CgroupLimits {
            memory_bytes: Some(1 << 26),
            cpu_shares: Some(1),
            pids: Some(10),
        };
        // Files a real v1 hierarchy would create on mkdir.
        let mem = root.path().join("memory/elide/x");
        let cpu = root.path().join("cpu/elide/x");
        let cg = {
            // The fake cannot synthesise cpu.shares in a new dir: precreate the tree.
            fs::create_dir_all(root.path().join("cpu/elide")).expect("mkdir");
            let r = m.create("x", &limits);
            // cpu.shares does not exist in the fake's new dir: the error names it.
            match r {
                Err(e) => {
                    assert!(e.to_string().contains("cpu"), "{e}");
                    None
                }
                Ok(cg) => Some(cg),
            }
        };
        assert!(cg.is_none());
        assert!(!mem.exists(), "failed create cleans up");
        // Without cpu limits it succeeds and writes v1 files.
        let limits = CgroupLimits {
            cpu_shares: None,
            ..limits
        };
        let cg = m.create("x", &limits).expect("create");
        assert_eq!(
            read(&mem.join("memory.limit_in_bytes")),
            (1u64 << 26).to_string()
        );
        assert_eq!(read(&root.path().join("pids/elide/x/pids.max")), "10");
        assert!(cpu.is_dir());
        assert_eq!(cg.procs_files().len(), 4);
        // A new process joins through `tasks` on v1 (no global thread-group lock).
        let joins = cg.self_join_files();
        assert_eq!(joins.len(), 4);
        assert!(joins.iter().all(|f| f.ends_with("tasks")), "{joins:?}");
        assert!(joins.contains(&mem.join("tasks")), "{joins:?}");
        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        )
        .expect("write");
        assert!(!cg.oom_killed());
        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .expect("write");
        assert!(cg.oom_killed());
        fs::write(
            root.path().join("cpuacct/elide/x/cpuacct.stat"),
            "user 3\nsystem 1\n",
        )
        .expect("write");
        fs::write(
            mem.join("memory.stat"),
            "cache 0\nrss 4096\ntotal_rss 8192\n",
        )
        .expect("write");
        let s = cg.stats();
        assert_eq!(s.cpu_user_ns, Some(3 * ticks_to_ns()));
        assert_eq!(s.cpu_system_ns, Some(ticks_to_ns()));
        assert_eq!(s.memory_rss_bytes, Some(8192));
        cg.remove().expect("remove");
    }

    #[test]
    fn impossible_limits_are_rejected_naming_the_field() {
        let root = fake_v2();
        let m = CgroupManager::detect_at(root.path(), "elide");
        for (limits, field) in [
            (
                CgroupLimits {
                    memory_bytes: Some(0),
                    ..Default::default()
                },
                "memory_bytes",
            ),
            (
                CgroupLimits {
                    memory_bytes: Some(1 << 20),
                    ..Default::default()
                },
                "memory_bytes",
            ),
            (
                CgroupLimits {
                    pids: Some(0),
                    ..Default::default()
                },
                "pids",
            ),
            (
                CgroupLimits {
                    cpu_shares: Some(0),
                    ..Default::default()
                },
                "cpu_shares",
            ),
        ] {
            let err = m.create("x", &limits).expect_err(field);
            assert!(err.to_string().contains(field), "{err}");
            assert!(!root.path().join("elide/x").exists());
        }
    }

    #[test]
    fn v1_co_mounted_cpu_and_cpuacct_share_one_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let both = root.path().join("cpu,cpuacct");
        fs::create_dir_all(&both).expect("mkdir");
        fs::write(both.join("cpu.shares"), "1024").expect("write");
        fs::write(both.join("cpuacct.usage"), "0").expect("write");
        std::os::unix::fs::symlink(&both, root.path().join("cpu")).expect("symlink");
        std::os::unix::fs::symlink(&both, root.path().join("cpuacct")).expect("symlink");
        let m = CgroupManager::detect_at(root.path(), "elide");
        assert_eq!(m.controllers(), ["cpu", "cpuacct"]);
        let cg = m.create("x", &CgroupLimits::default()).expect("create");
        assert_eq!(
            cg.dirs().len(),
            1,
            "one hierarchy, one directory: {:?}",
            cg.dirs()
        );
        let dir = &cg.dirs()[0];
        fs::write(dir.join("cpuacct.usage_user"), "7").expect("write");
        fs::write(dir.join("cpuacct.usage_sys"), "3").expect("write");
        fs::write(dir.join("cpuacct.usage"), "10").expect("write");
        let s = cg.stats();
        assert_eq!(
            (s.cpu_user_ns, s.cpu_system_ns, s.cpu_total_ns),
            (Some(7), Some(3), Some(10))
        );
        cg.remove().expect("remove");
    }

    #[test]
    fn v1_partial_create_is_undone_and_foreign_dirs_are_kept() {
        let root = tempfile::tempdir().expect("tempdir");
        for (c, marker) in [
            ("memory", "memory.usage_in_bytes"),
            ("pids", "pids.current"),
        ] {
            fs::create_dir_all(root.path().join(c)).expect("mkdir");
            fs::write(root.path().join(c).join(marker), "0").expect("write");
        }
        // Someone else's cgroup with the same name in the second hierarchy.
        fs::create_dir_all(root.path().join("pids/elide/x")).expect("mkdir");
        let m = CgroupManager::detect_at(root.path(), "elide");
        let err = m
            .create("x", &CgroupLimits::default())
            .expect_err("collision");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert!(
            !root.path().join("memory/elide/x").exists(),
            "our half must be undone"
        );
        assert!(
            root.path().join("pids/elide/x").exists(),
            "the foreign dir must be kept"
        );
    }

    #[test]
    fn v1_oom_falls_back_to_failcnt_when_the_kernel_has_no_oom_kill_counter() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(root.path().join("memory")).expect("mkdir");
        fs::write(root.path().join("memory/memory.usage_in_bytes"), "0").expect("write");
        let m = CgroupManager::detect_at(root.path(), "elide");
        let cg = m
            .create(
                "old",
                &CgroupLimits {
                    memory_bytes: Some(64 << 20),
                    ..Default::default()
                },
            )
            .expect("create");
        let dir = root.path().join("memory/elide/old");
        // Pre-4.13 oom_control: no oom_kill line.
        fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\n",
        )
        .expect("write");
        fs::write(dir.join("memory.failcnt"), "0").expect("write");
        fs::write(
            dir.join("memory.max_usage_in_bytes"),
            (10u64 << 20).to_string(),
        )
        .expect("write");
        assert!(!cg.oom_killed());
        fs::write(dir.join("memory.failcnt"), "57").expect("write");
        assert!(
            !cg.oom_killed(),
            "reclaim failures far below the limit are not an OOM kill"
        );
        fs::write(
            dir.join("memory.max_usage_in_bytes"),
            (64u64 << 20).to_string(),
        )
        .expect("write");
        assert!(cg.oom_killed());
        cg.remove().expect("remove");
    }
}
