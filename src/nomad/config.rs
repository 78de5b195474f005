//! The plugin's agent-side configuration (`plugin "elide" { config { ... } }`): its hclspec,
//! its defaults, and decoding + validation of what SetConfig delivers.
//!
//! Nested groups are `Block` specs wrapped in `Default(.., Literal)`: the agent reads its config
//! file with HCL1, which turns `session_config { }` into a list of one map that only decodes
//! against a block spec (fact sheet §3.4).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cty::{self, CtyNumber, CtyValue};
use super::hclspec::{self, attr, attr_default, block, default, literal, object};
use crate::proto::hashicorp::nomad::plugins::shared::hclspec::Spec;

/// Default daemon socket.
pub const DEFAULT_DAEMON_SOCKET: &str = "/run/elide/daemon.sock";
/// Default warm workers per language.
pub const DEFAULT_POOL_SIZE: u32 = 2;
/// Largest accepted pool size: the daemon's bound, checked here so SetConfig names it.
pub const MAX_POOL_SIZE: u32 = crate::daemon::session::MAX_CONTEXT_POOL_SIZE;
/// Default fingerprint period (Nomad's raw_exec uses the same).
pub const DEFAULT_FINGERPRINT_PERIOD: Duration = Duration::from_secs(30);
/// Shortest accepted fingerprint period.
pub const MIN_FINGERPRINT_PERIOD: Duration = Duration::from_secs(1);
/// Default time to wait for an auto-started daemon.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `dangling_executions.period` (the docker driver's reconciler uses the same).
pub const DEFAULT_DANGLING_PERIOD: Duration = Duration::from_secs(5 * 60);
/// Default of `dangling_executions.creation_grace`.
pub const DEFAULT_DANGLING_GRACE: Duration = Duration::from_secs(5 * 60);
/// Shortest accepted `dangling_executions.period`.
pub const MIN_DANGLING_PERIOD: Duration = Duration::from_secs(1);

/// A snippet language, with the aliases operators may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Language {
    /// `python` / `py`
    Python,
    /// `javascript` / `js`
    JavaScript,
    /// `typescript` / `ts`
    TypeScript,
}

impl Language {
    /// Every language, in canonical order.
    pub const ALL: [Language; 3] = [Language::Python, Language::JavaScript, Language::TypeScript];

    /// Canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::TypeScript => "typescript",
        }
    }

    /// Parses a canonical name or alias (case-insensitive).
    pub fn parse(s: &str) -> Option<Language> {
        match s.trim().to_ascii_lowercase().as_str() {
            "python" | "py" => Some(Language::Python),
            "javascript" | "js" => Some(Language::JavaScript),
            "typescript" | "ts" => Some(Language::TypeScript),
            _ => None,
        }
    }
}

/// A capability a snippet may be granted; what is not enabled is denied by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Intrinsic {
    /// The task environment is visible.
    Env,
    /// Filesystem access beyond the task dir.
    Io,
    /// Network access.
    Net,
}

impl Intrinsic {
    /// Every intrinsic, in canonical order.
    pub const ALL: [Intrinsic; 3] = [Intrinsic::Env, Intrinsic::Io, Intrinsic::Net];

    /// Canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Intrinsic::Env => "env",
            Intrinsic::Io => "io",
            Intrinsic::Net => "net",
        }
    }

    /// Parses a name (case-insensitive).
    pub fn parse(s: &str) -> Option<Intrinsic> {
        match s.trim().to_ascii_lowercase().as_str() {
            "env" => Some(Intrinsic::Env),
            "io" => Some(Intrinsic::Io),
            "net" => Some(Intrinsic::Net),
            _ => None,
        }
    }
}

/// `session_config { ... }`: how the daemon session of this plugin is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSettings {
    /// Warm workers per language; 0 disables warming (every task starts a cold interpreter).
    pub context_pool_size: u32,
    /// Canonical, de-duplicated, in the order given.
    pub enabled_languages: Vec<Language>,
    /// De-duplicated, in the order given.
    pub enabled_intrinsics: Vec<Intrinsic>,
    /// Session-wide memory cap per execution; 0 = none.
    pub memory_limit_mb: u64,
    /// Whether AI intrinsics are offered (Elide backend only).
    pub enable_ai: bool,
    /// Whether the session's memory is offered to the kernel's same-page merging (KSM).
    pub merge_identical_pages: bool,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            context_pool_size: DEFAULT_POOL_SIZE,
            enabled_languages: Language::ALL.to_vec(),
            enabled_intrinsics: Intrinsic::ALL.to_vec(),
            memory_limit_mb: 0,
            enable_ai: false,
            merge_identical_pages: false,
        }
    }
}

/// `daemon { ... }`: how to find or start `elide-daemon`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Start the daemon when nothing answers on the socket.
    pub auto_start: bool,
    /// Daemon binary; `None` = `elide-daemon` resolved at start time.
    pub path: Option<String>,
    /// Extra arguments for the daemon.
    pub args: Vec<String>,
    /// Where an auto-started daemon logs; `None` = chosen at start time.
    pub log_file: Option<PathBuf>,
    /// How long to wait for an auto-started daemon.
    pub start_timeout: Duration,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            auto_start: true,
            path: None,
            args: Vec::new(),
            log_file: None,
            start_timeout: DEFAULT_START_TIMEOUT,
        }
    }
}

/// `dangling_executions { ... }`: stopping what runs in our session although Nomad no longer
/// tracks it (see [`crate::nomad::dangling`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DanglingSettings {
    /// Look for dangling executions at all.
    pub enabled: bool,
    /// How often to look.
    pub period: Duration,
    /// How old an execution, and how long this plugin process configured, before it counts.
    pub creation_grace: Duration,
}

impl Default for DanglingSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            period: DEFAULT_DANGLING_PERIOD,
            creation_grace: DEFAULT_DANGLING_GRACE,
        }
    }
}

/// The decoded, validated plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// Absolute path of the daemon's Unix socket.
    pub daemon_socket: PathBuf,
    /// Session settings.
    pub session: SessionSettings,
    /// Daemon start settings.
    pub daemon: DaemonSettings,
    /// Stopping executions Nomad no longer tracks.
    pub dangling: DanglingSettings,
    /// How often Fingerprint re-checks the daemon.
    pub fingerprint_period: Duration,
    /// Advertise Nomad's dynamic workload users (1.8+): a task without `user` then runs as a
    /// uid Nomad picks for it (`nomad-<N>`) instead of the daemon's user.
    pub dynamic_workload_users: bool,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            daemon_socket: PathBuf::from(DEFAULT_DAEMON_SOCKET),
            session: SessionSettings::default(),
            daemon: DaemonSettings::default(),
            dangling: DanglingSettings::default(),
            fingerprint_period: DEFAULT_FINGERPRINT_PERIOD,
            dynamic_workload_users: false,
        }
    }
}

/// Why a config was refused; always names the field.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// The msgpack could not be decoded against the schema.
    #[error("invalid plugin config: {0}")]
    Decode(#[from] cty::CtyError),
    /// A value decoded but is not acceptable.
    #[error("invalid plugin config: {field}: {message}")]
    Invalid {
        /// Dotted field path.
        field: String,
        /// What is wrong and what is accepted.
        message: String,
    },
    /// Our own spec is inconsistent (a bug).
    #[error("internal error: plugin config schema: {0}")]
    Schema(#[from] hclspec::SpecError),
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

fn quoted_list(items: &[&str]) -> String {
    let inner: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", inner.join(", "))
}

/// The hclspec of the `config {}` block, with every default.
pub fn schema() -> Spec {
    let languages: Vec<&str> = Language::ALL.iter().map(|l| l.as_str()).collect();
    let intrinsics: Vec<&str> = Intrinsic::ALL.iter().map(|i| i.as_str()).collect();
    let start_timeout = format!(
        "{:?}",
        humantime::format_duration(DEFAULT_START_TIMEOUT).to_string()
    );
    let session = object([
        (
            "context_pool_size",
            attr_default(
                "context_pool_size",
                "number",
                &DEFAULT_POOL_SIZE.to_string(),
            ),
        ),
        (
            "enabled_languages",
            attr_default(
                "enabled_languages",
                "list(string)",
                &quoted_list(&languages),
            ),
        ),
        (
            "enabled_intrinsics",
            attr_default(
                "enabled_intrinsics",
                "list(string)",
                &quoted_list(&intrinsics),
            ),
        ),
        (
            "memory_limit_mb",
            attr_default("memory_limit_mb", "number", "0"),
        ),
        ("enable_ai", attr_default("enable_ai", "bool", "false")),
        (
            "merge_identical_pages",
            attr_default("merge_identical_pages", "bool", "false"),
        ),
    ]);
    let session_literal = format!(
        "{{ context_pool_size = {DEFAULT_POOL_SIZE}, enabled_languages = {}, enabled_intrinsics = {}, memory_limit_mb = 0, enable_ai = false, merge_identical_pages = false }}",
        quoted_list(&languages),
        quoted_list(&intrinsics)
    );
    let daemon = object([
        ("auto_start", attr_default("auto_start", "bool", "true")),
        ("path", attr("path", "string", false)),
        ("args", attr_default("args", "list(string)", "[]")),
        ("log_file", attr("log_file", "string", false)),
        (
            "start_timeout",
            attr_default("start_timeout", "string", &start_timeout),
        ),
    ]);
    let daemon_literal =
        format!("{{ auto_start = true, args = [], start_timeout = {start_timeout} }}");
    let human = |d: Duration| format!("{:?}", humantime::format_duration(d).to_string());
    let dangling = object([
        ("enabled", attr_default("enabled", "bool", "true")),
        (
            "period",
            attr_default("period", "string", &human(DEFAULT_DANGLING_PERIOD)),
        ),
        (
            "creation_grace",
            attr_default("creation_grace", "string", &human(DEFAULT_DANGLING_GRACE)),
        ),
    ]);
    let dangling_literal = format!(
        "{{ enabled = true, period = {}, creation_grace = {} }}",
        human(DEFAULT_DANGLING_PERIOD),
        human(DEFAULT_DANGLING_GRACE)
    );
    object([
        (
            "daemon_socket",
            attr_default(
                "daemon_socket",
                "string",
                &format!("{DEFAULT_DAEMON_SOCKET:?}"),
            ),
        ),
        (
            "fingerprint_period",
            attr_default(
                "fingerprint_period",
                "string",
                &format!(
                    "{:?}",
                    humantime::format_duration(DEFAULT_FINGERPRINT_PERIOD).to_string()
                ),
            ),
        ),
        (
            "dynamic_workload_users",
            attr_default("dynamic_workload_users", "bool", "false"),
        ),
        (
            "session_config",
            default(
                block("session_config", false, session),
                literal(&session_literal),
            ),
        ),
        (
            "daemon",
            default(block("daemon", false, daemon), literal(&daemon_literal)),
        ),
        (
            "dangling_executions",
            default(
                block("dangling_executions", false, dangling),
                literal(&dangling_literal),
            ),
        ),
    ])
}

impl PluginConfig {
    /// Decodes and validates SetConfig's `msgpack_config`. Empty bytes mean "no config block"
    /// and give the defaults.
    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        let ty = hclspec::implied_type(&schema())?;
        let value = cty::decode(bytes, &ty)?;
        Self::from_value(&value)
    }

    /// Validates a decoded config object.
    pub fn from_value(value: &CtyValue) -> Result<Self, ConfigError> {
        let root = Fields::new(value, "")?;
        let mut cfg = PluginConfig::default();
        if let Some(s) = root.string("daemon_socket")? {
            cfg.daemon_socket = absolute_socket_path(&s, "daemon_socket")?;
        }
        if let Some(s) = root.string("fingerprint_period")? {
            let period = duration(&s, "fingerprint_period")?;
            if period < MIN_FINGERPRINT_PERIOD {
                return Err(invalid(
                    "fingerprint_period",
                    format!("{s:?} is shorter than the minimum of 1s"),
                ));
            }
            cfg.fingerprint_period = period;
        }
        if let Some(b) = root.bool("dynamic_workload_users")? {
            cfg.dynamic_workload_users = b;
        }
        if let Some(session) = root.object("session_config")? {
            cfg.session = session_settings(&session)?;
        }
        if let Some(daemon) = root.object("daemon")? {
            cfg.daemon = daemon_settings(&daemon)?;
        }
        if let Some(dangling) = root.object("dangling_executions")? {
            cfg.dangling = dangling_settings(&dangling)?;
        }
        Ok(cfg)
    }
}

fn session_settings(f: &Fields<'_>) -> Result<SessionSettings, ConfigError> {
    let mut s = SessionSettings::default();
    if let Some(n) = f.number("context_pool_size")? {
        let field = f.path("context_pool_size");
        let size = whole(n, &field)?;
        if size < 0 {
            return Err(invalid(
                &field,
                format!("must be 0 (no warm workers) or more, got {size}"),
            ));
        }
        if size > i128::from(MAX_POOL_SIZE) {
            return Err(invalid(
                &field,
                format!("must be at most {MAX_POOL_SIZE}, got {size}"),
            ));
        }
        s.context_pool_size = u32::try_from(size).map_err(|_| invalid(&field, "out of range"))?;
    }
    if let Some(items) = f.string_list("enabled_languages")? {
        let field = f.path("enabled_languages");
        let mut langs = Vec::new();
        for item in &items {
            let lang = Language::parse(item).ok_or_else(|| {
                invalid(
                    &field,
                    format!(
                        "unknown language {item:?}; known: python (py), javascript (js), typescript (ts)"
                    ),
                )
            })?;
            if !langs.contains(&lang) {
                langs.push(lang);
            }
        }
        if langs.is_empty() {
            return Err(invalid(&field, "must list at least one language"));
        }
        s.enabled_languages = langs;
    }
    if let Some(items) = f.string_list("enabled_intrinsics")? {
        let field = f.path("enabled_intrinsics");
        let mut out = Vec::new();
        for item in &items {
            let i = Intrinsic::parse(item).ok_or_else(|| {
                invalid(
                    &field,
                    format!("unknown intrinsic {item:?}; known: env, io, net"),
                )
            })?;
            if !out.contains(&i) {
                out.push(i);
            }
        }
        s.enabled_intrinsics = out;
    }
    if let Some(n) = f.number("memory_limit_mb")? {
        let field = f.path("memory_limit_mb");
        let mb = whole(n, &field)?;
        if mb < 0 {
            return Err(invalid(
                &field,
                format!("must be 0 (no limit) or a positive number of MiB, got {mb}"),
            ));
        }
        let max = crate::daemon::session::MAX_MEMORY_LIMIT_MB;
        if mb > i128::from(max) {
            return Err(invalid(
                &field,
                format!("must be at most {max} (MiB), got {mb}"),
            ));
        }
        s.memory_limit_mb = u64::try_from(mb).map_err(|_| invalid(&field, "out of range"))?;
    }
    if let Some(b) = f.bool("enable_ai")? {
        s.enable_ai = b;
    }
    if let Some(b) = f.bool("merge_identical_pages")? {
        s.merge_identical_pages = b;
    }
    Ok(s)
}

fn daemon_settings(f: &Fields<'_>) -> Result<DaemonSettings, ConfigError> {
    let mut d = DaemonSettings::default();
    if let Some(b) = f.bool("auto_start")? {
        d.auto_start = b;
    }
    if let Some(p) = f.string("path")? {
        if p.trim().is_empty() {
            return Err(invalid(&f.path("path"), "must not be empty"));
        }
        d.path = Some(p);
    }
    if let Some(args) = f.string_list("args")? {
        d.args = args;
    }
    if let Some(p) = f.string("log_file")? {
        if !Path::new(&p).is_absolute() {
            return Err(invalid(
                &f.path("log_file"),
                format!("must be an absolute path, got {p:?}"),
            ));
        }
        d.log_file = Some(PathBuf::from(p));
    }
    if let Some(s) = f.string("start_timeout")? {
        d.start_timeout = duration(&s, &f.path("start_timeout"))?;
    }
    Ok(d)
}

fn dangling_settings(f: &Fields<'_>) -> Result<DanglingSettings, ConfigError> {
    let mut d = DanglingSettings::default();
    if let Some(b) = f.bool("enabled")? {
        d.enabled = b;
    }
    if let Some(s) = f.string("period")? {
        let field = f.path("period");
        d.period = duration(&s, &field)?;
        if d.period < MIN_DANGLING_PERIOD {
            return Err(invalid(
                &field,
                format!("{s:?} is shorter than the minimum of 1s"),
            ));
        }
    }
    if let Some(s) = f.string("creation_grace")? {
        d.creation_grace = duration(&s, &f.path("creation_grace"))?;
    }
    Ok(d)
}

fn absolute_socket_path(s: &str, field: &str) -> Result<PathBuf, ConfigError> {
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(invalid(
            field,
            format!("must be an absolute path, got {s:?}"),
        ));
    }
    if s.len() > crate::goplugin::socket::MAX_SOCKET_PATH {
        return Err(invalid(
            field,
            format!(
                "{s:?} is longer than the {} bytes a unix socket path allows",
                crate::goplugin::socket::MAX_SOCKET_PATH
            ),
        ));
    }
    Ok(p)
}

fn duration(s: &str, field: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        invalid(
            field,
            format!("{s:?} is not a duration ({e}); write e.g. \"30s\" or \"2m\""),
        )
    })?;
    if d.is_zero() {
        return Err(invalid(field, format!("{s:?} must be longer than zero")));
    }
    Ok(d)
}

fn whole(n: CtyNumber, field: &str) -> Result<i128, ConfigError> {
    match n {
        CtyNumber::Int(i) => Ok(i),
        CtyNumber::Float(x) => Err(invalid(field, format!("must be a whole number, got {x}"))),
    }
}

/// Typed access to an object's attributes, with errors naming `path.key`.
struct Fields<'a> {
    map: &'a BTreeMap<String, CtyValue>,
    path: String,
}

impl<'a> Fields<'a> {
    fn new(v: &'a CtyValue, path: &str) -> Result<Self, ConfigError> {
        match v {
            CtyValue::Map(map) => Ok(Self {
                map,
                path: path.to_string(),
            }),
            other => Err(invalid(
                if path.is_empty() { "config" } else { path },
                format!("expected an object, got {}", other.kind()),
            )),
        }
    }

    fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&self, key: &str) -> Option<&'a CtyValue> {
        self.map.get(key).filter(|v| **v != CtyValue::Null)
    }

    fn mismatch(&self, key: &str, want: &str, v: &CtyValue) -> ConfigError {
        invalid(
            &self.path(key),
            format!("expected {want}, got {}", v.kind()),
        )
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(CtyValue::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.mismatch(key, "string", v)),
        }
    }

    fn number(&self, key: &str) -> Result<Option<CtyNumber>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(CtyValue::Number(n)) => Ok(Some(*n)),
            Some(v) => Err(self.mismatch(key, "number", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(CtyValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.mismatch(key, "bool", v)),
        }
    }

    fn string_list(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(CtyValue::List(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    CtyValue::String(s) => Ok(s.clone()),
                    other => Err(invalid(
                        &format!("{}[{i}]", self.path(key)),
                        format!("expected string, got {}", other.kind()),
                    )),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(v) => Err(self.mismatch(key, "list(string)", v)),
        }
    }

    fn object(&self, key: &str) -> Result<Option<Fields<'a>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            // HCL1 may deliver a block as a list holding one object.
            Some(CtyValue::List(items)) if items.len() == 1 => {
                Fields::new(&items[0], &self.path(key)).map(Some)
            }
            Some(v) => Fields::new(v, &self.path(key)).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value as V;

    fn enc(v: &V) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    fn map(entries: Vec<(&str, V)>) -> V {
        V::Map(entries.into_iter().map(|(k, v)| (V::from(k), v)).collect())
    }

    fn session(entries: Vec<(&str, V)>) -> Result<PluginConfig, ConfigError> {
        PluginConfig::from_msgpack(&enc(&map(vec![("session_config", map(entries))])))
    }

    fn err_text(r: Result<PluginConfig, ConfigError>) -> String {
        r.unwrap_err().to_string()
    }

    fn literal_of(spec: &Spec) -> String {
        use crate::proto::hashicorp::nomad::plugins::shared::hclspec::spec::Block;
        match spec.block.as_ref() {
            Some(Block::Default(d)) => match d.default.as_ref().and_then(|x| x.block.as_ref()) {
                Some(Block::Literal(l)) => l.value.clone(),
                other => panic!("not a literal: {other:?}"),
            },
            other => panic!("not a default: {other:?}"),
        }
    }

    #[test]
    fn schema_literals_snapshot() {
        use crate::proto::hashicorp::nomad::plugins::shared::hclspec::spec::Block;
        let spec = schema();
        let Some(Block::Object(top)) = spec.block.as_ref() else {
            panic!("object expected")
        };
        let lit = |k: &str| literal_of(&top.attributes[k]);
        assert_eq!(lit("daemon_socket"), r#""/run/elide/daemon.sock""#);
        assert_eq!(lit("fingerprint_period"), r#""30s""#);
        assert_eq!(
            lit("session_config"),
            r#"{ context_pool_size = 2, enabled_languages = ["python", "javascript", "typescript"], enabled_intrinsics = ["env", "io", "net"], memory_limit_mb = 0, enable_ai = false, merge_identical_pages = false }"#
        );
        assert_eq!(
            lit("daemon"),
            r#"{ auto_start = true, args = [], start_timeout = "10s" }"#
        );
        assert_eq!(
            lit("dangling_executions"),
            r#"{ enabled = true, period = "5m", creation_grace = "5m" }"#
        );
        let ty = hclspec::implied_type(&spec).unwrap();
        let want = "Object({\"daemon\": Object({\"args\": List(String), \"auto_start\": Bool, \"log_file\": String, \"path\": String, \"start_timeout\": String}), \"daemon_socket\": String, \"dangling_executions\": Object({\"creation_grace\": String, \"enabled\": Bool, \"period\": String}), \"dynamic_workload_users\": Bool, \"fingerprint_period\": String, \"session_config\": Object({\"context_pool_size\": Number, \"enable_ai\": Bool, \"enabled_intrinsics\": List(String), \"enabled_languages\": List(String), \"memory_limit_mb\": Number, \"merge_identical_pages\": Bool})})";
        assert_eq!(format!("{ty:?}"), want);
    }

    #[test]
    fn dangling_executions_decode_and_name_bad_fields() {
        let with = |entries: Vec<(&str, V)>| {
            PluginConfig::from_msgpack(&enc(&map(vec![("dangling_executions", map(entries))])))
        };
        let cfg = with(vec![
            ("enabled", V::from(false)),
            ("period", V::from("90s")),
            ("creation_grace", V::from("2m")),
        ])
        .unwrap();
        assert_eq!(
            cfg.dangling,
            DanglingSettings {
                enabled: false,
                period: Duration::from_secs(90),
                creation_grace: Duration::from_secs(120),
            }
        );
        assert_eq!(with(vec![]).unwrap().dangling, DanglingSettings::default());
        let short = err_text(with(vec![("period", V::from("500ms"))]));
        assert!(
            short.contains("dangling_executions.period") && short.contains("minimum of 1s"),
            "{short}"
        );
        let bad = err_text(with(vec![("creation_grace", V::from("soon"))]));
        assert!(
            bad.contains("dangling_executions.creation_grace") && bad.contains("\"soon\""),
            "{bad}"
        );
        let zero = err_text(with(vec![("creation_grace", V::from("0s"))]));
        assert!(
            zero.contains("dangling_executions.creation_grace"),
            "{zero}"
        );
    }

    #[test]
    fn empty_and_all_null_configs_give_defaults() {
        assert_eq!(PluginConfig::from_msgpack(&[]), Ok(PluginConfig::default()));
        let nulls = map(vec![
            ("daemon", V::Nil),
            ("daemon_socket", V::Nil),
            ("fingerprint_period", V::Nil),
            ("session_config", V::Nil),
        ]);
        assert_eq!(
            PluginConfig::from_msgpack(&enc(&nulls)),
            Ok(PluginConfig::default())
        );
    }

    #[test]
    fn full_config_decodes() {
        let cfg = PluginConfig::from_msgpack(&enc(&map(vec![
            (
                "daemon",
                map(vec![
                    ("args", V::Array(vec![V::from("--verbose")])),
                    ("auto_start", V::from(false)),
                    ("log_file", V::from("/var/log/elide.log")),
                    ("path", V::from("/usr/bin/elide-daemon")),
                    ("start_timeout", V::from("1m")),
                ]),
            ),
            ("daemon_socket", V::from("/tmp/e.sock")),
            ("fingerprint_period", V::from("5s")),
            (
                "session_config",
                map(vec![
                    ("context_pool_size", V::from(200u8)),
                    ("enable_ai", V::from(true)),
                    ("enabled_intrinsics", V::Array(vec![V::from("net")])),
                    (
                        "enabled_languages",
                        V::Array(vec![V::from("ts"), V::from("py"), V::from("python")]),
                    ),
                    ("memory_limit_mb", V::from("512")),
                    ("merge_identical_pages", V::from(true)),
                ]),
            ),
        ])))
        .unwrap();
        assert_eq!(cfg.daemon_socket, PathBuf::from("/tmp/e.sock"));
        assert_eq!(cfg.fingerprint_period, Duration::from_secs(5));
        assert_eq!(cfg.session.context_pool_size, 200);
        assert_eq!(
            cfg.session.enabled_languages,
            vec![Language::TypeScript, Language::Python]
        );
        assert_eq!(cfg.session.enabled_intrinsics, vec![Intrinsic::Net]);
        assert_eq!(cfg.session.memory_limit_mb, 512);
        assert!(cfg.session.enable_ai);
        assert!(cfg.session.merge_identical_pages);
        assert!(!cfg.daemon.auto_start);
        assert_eq!(cfg.daemon.path.as_deref(), Some("/usr/bin/elide-daemon"));
        assert_eq!(cfg.daemon.args, vec!["--verbose".to_string()]);
        assert_eq!(cfg.daemon.start_timeout, Duration::from_secs(60));
    }

    #[test]
    fn pool_size_must_be_whole_and_not_negative() {
        for bad in [V::from(-1), V::from("-3")] {
            let e = err_text(session(vec![("context_pool_size", bad)]));
            assert!(
                e.contains(
                    "session_config.context_pool_size: must be 0 (no warm workers) or more, got -"
                ),
                "{e}"
            );
        }
        let cfg = session(vec![("context_pool_size", V::from(0))]).expect("0 disables warming");
        assert_eq!(cfg.session.context_pool_size, 0);
        let e = err_text(session(vec![("context_pool_size", V::F64(1.5))]));
        assert!(
            e.contains("session_config.context_pool_size: must be a whole number"),
            "{e}"
        );
        let e = err_text(session(vec![("context_pool_size", V::from(100_000))]));
        assert!(e.contains("at most"), "{e}");
    }

    /// A limit whose bytes no u64 holds is refused at SetConfig, naming it, rather than
    /// wrapping to a small cap in the daemon.
    #[test]
    fn memory_limit_must_fit_in_bytes() {
        let max = crate::daemon::session::MAX_MEMORY_LIMIT_MB;
        let e = err_text(session(vec![("memory_limit_mb", V::from(max + 1))]));
        assert!(
            e.contains(&format!(
                "session_config.memory_limit_mb: must be at most {max} (MiB), got {}",
                max + 1
            )),
            "{e}"
        );
        let cfg = session(vec![("memory_limit_mb", V::from(max))]).expect("the largest limit");
        assert_eq!(cfg.session.memory_limit_mb, max);
    }

    #[test]
    fn unknown_language_is_named() {
        let e = err_text(session(vec![(
            "enabled_languages",
            V::Array(vec![V::from("python"), V::from("cobol")]),
        )]));
        assert!(
            e.contains("session_config.enabled_languages: unknown language \"cobol\""),
            "{e}"
        );
        let e = err_text(session(vec![("enabled_languages", V::Array(vec![]))]));
        assert!(e.contains("at least one language"), "{e}");
    }

    #[test]
    fn unknown_intrinsic_is_named() {
        let e = err_text(session(vec![(
            "enabled_intrinsics",
            V::Array(vec![V::from("gpu")]),
        )]));
        assert!(
            e.contains("session_config.enabled_intrinsics: unknown intrinsic \"gpu\""),
            "{e}"
        );
    }

    #[test]
    fn negative_memory_limit_is_rejected() {
        let e = err_text(session(vec![("memory_limit_mb", V::from(-5))]));
        assert!(e.contains("session_config.memory_limit_mb"), "{e}");
    }

    #[test]
    fn relative_or_overlong_socket_is_rejected() {
        let e = err_text(PluginConfig::from_msgpack(&enc(&map(vec![(
            "daemon_socket",
            V::from("run/d.sock"),
        )]))));
        assert!(
            e.contains("daemon_socket: must be an absolute path, got \"run/d.sock\""),
            "{e}"
        );
        let long = format!("/{}", "s".repeat(200));
        let e = err_text(PluginConfig::from_msgpack(&enc(&map(vec![(
            "daemon_socket",
            V::from(long.as_str()),
        )]))));
        assert!(e.contains("daemon_socket"), "{e}");
    }

    #[test]
    fn bad_durations_are_named() {
        let e = err_text(PluginConfig::from_msgpack(&enc(&map(vec![(
            "fingerprint_period",
            V::from("soon"),
        )]))));
        assert!(
            e.contains("fingerprint_period: \"soon\" is not a duration"),
            "{e}"
        );
        let e = err_text(PluginConfig::from_msgpack(&enc(&map(vec![(
            "fingerprint_period",
            V::from("10ms"),
        )]))));
        assert!(e.contains("minimum"), "{e}");
        let e = err_text(PluginConfig::from_msgpack(&enc(&map(vec![(
            "daemon",
            map(vec![("start_timeout", V::from("0s"))]),
        )]))));
        assert!(e.contains("daemon.start_timeout"), "{e}");
    }

    #[test]
    fn wrong_type_for_every_field_names_it() {
        let cases: Vec<(V, &str)> = vec![
            (
                map(vec![("daemon_socket", V::from(5))]),
                "daemon_socket: expected string",
            ),
            (
                map(vec![("fingerprint_period", V::from(true))]),
                "fingerprint_period: expected string",
            ),
            (
                map(vec![("session_config", V::from("x"))]),
                "session_config: expected object",
            ),
            (map(vec![("daemon", V::from(1))]), "daemon: expected object"),
            (
                map(vec![(
                    "session_config",
                    map(vec![("context_pool_size", V::from(true))]),
                )]),
                "session_config.context_pool_size: expected number",
            ),
            (
                map(vec![(
                    "session_config",
                    map(vec![("enabled_languages", V::from("python"))]),
                )]),
                "session_config.enabled_languages: expected list(string)",
            ),
            (
                map(vec![(
                    "session_config",
                    map(vec![("enabled_intrinsics", V::from(1))]),
                )]),
                "session_config.enabled_intrinsics: expected list(string)",
            ),
            (
                map(vec![(
                    "session_config",
                    map(vec![("memory_limit_mb", V::from(false))]),
                )]),
                "session_config.memory_limit_mb: expected number",
            ),
            (
                map(vec![(
                    "session_config",
                    map(vec![("enable_ai", V::from("yes"))]),
                )]),
                "session_config.enable_ai: expected bool",
            ),
            (
                map(vec![(
                    "session_config",
                    map(vec![("merge_identical_pages", V::from(1))]),
                )]),
                "session_config.merge_identical_pages: expected bool",
            ),
            (
                map(vec![("daemon", map(vec![("auto_start", V::from(1))]))]),
                "daemon.auto_start: expected bool",
            ),
            (
                map(vec![("daemon", map(vec![("path", V::from(1))]))]),
                "daemon.path: expected string",
            ),
            (
                map(vec![("daemon", map(vec![("args", V::from("a"))]))]),
                "daemon.args: expected list(string)",
            ),
            (
                map(vec![("daemon", map(vec![("log_file", V::Array(vec![]))]))]),
                "daemon.log_file: expected string",
            ),
            (
                map(vec![("daemon", map(vec![("start_timeout", V::from(10))]))]),
                "daemon.start_timeout: expected string",
            ),
        ];
        for (v, want) in cases {
            let e = err_text(PluginConfig::from_msgpack(&enc(&v)));
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let e = err_text(PluginConfig::from_msgpack(&enc(&map(vec![(
            "daemon_sock",
            V::from("/x"),
        )]))));
        assert!(e.contains("unknown attribute \"daemon_sock\""), "{e}");
    }
}
