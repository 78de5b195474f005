//! Language runtimes: which interpreters this node has, their real paths and versions, and how a
//! snippet file becomes an argv for each backend.
//!
//! Interpreters are asked for their own executable path (`sys.executable`, `process.execPath`)
//! because the `python3` on PATH is often a version-manager shim (pyenv) that re-resolves on
//! every start, costs a fork, and reads the caller's environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::config::{RuntimeConfig, RuntimesConfig};

/// A language the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// CPython 3.
    Python,
    /// Node.js.
    JavaScript,
    /// TypeScript, types stripped in the daemon, then run as JavaScript.
    TypeScript,
}

impl Language {
    /// Every language, in report order.
    pub const ALL: [Language; 3] = [Language::Python, Language::JavaScript, Language::TypeScript];

    /// Canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::TypeScript => "typescript",
        }
    }

    /// Accepted short names.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Language::Python => &["py", "python3"],
            Language::JavaScript => &["js", "node"],
            Language::TypeScript => &["ts"],
        }
    }

    /// Parses a canonical name or alias (case-insensitive).
    pub fn parse(text: &str) -> Option<Language> {
        let t = text.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|l| l.name() == t || l.aliases().contains(&t.as_str()))
    }

    /// Guesses the language from a file extension.
    pub fn from_extension(path: &Path) -> Option<Language> {
        match path.extension()?.to_str()? {
            "py" => Some(Language::Python),
            "js" | "mjs" | "cjs" => Some(Language::JavaScript),
            "ts" | "mts" | "cts" => Some(Language::TypeScript),
            _ => None,
        }
    }

    /// File extension for a snippet written to disk (TypeScript is run as stripped JavaScript).
    pub fn file_extension(self) -> &'static str {
        match self {
            Language::Python => "py",
            Language::JavaScript | Language::TypeScript => "js",
        }
    }
}

/// How a language is run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Backend {
    /// The language's own interpreter (python3 / node).
    Native,
    /// `elide run FILE ARGS...`.
    Elide,
}

/// One discovered runtime.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The language.
    pub language: Language,
    /// Resolved interpreter (or elide binary) path.
    pub command: PathBuf,
    /// Version reported by the interpreter.
    pub version: String,
    /// Backend.
    pub backend: Backend,
    /// Whether executions may use it.
    pub available: bool,
    /// Why not, when unavailable.
    pub detail: String,
    /// Directories holding the runtime's own files (readable without the `io` intrinsic).
    pub read_paths: Vec<PathBuf>,
}

impl Runtime {
    /// argv (program first) that runs `script` with `args`.
    pub fn argv(&self, script: &Path, args: &[String]) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![self.command.clone().into_os_string()];
        if self.backend == Backend::Elide {
            v.push("run".into());
        }
        v.push(script.as_os_str().to_os_string());
        v.extend(args.iter().map(Into::into));
        v
    }
}

/// The runtimes of this node, discovered once at start.
#[derive(Debug, Clone)]
pub struct RuntimeRegistry {
    runtimes: Vec<Runtime>,
}

/// Directories every dynamically linked interpreter needs.
const SYSTEM_READ_PATHS: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/usr/share/zoneinfo",
    "/etc/localtime",
];

fn run_probe(cmd: &Path, args: &[&str]) -> Result<Vec<String>, String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cmd.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {:?} failed ({}): {}",
            cmd.display(),
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn unavailable(language: Language, backend: Backend, detail: String) -> Runtime {
    Runtime {
        language,
        command: PathBuf::new(),
        version: String::new(),
        backend,
        available: false,
        detail,
        read_paths: Vec::new(),
    }
}

fn discover_python(cfg: &RuntimeConfig) -> Runtime {
    let Some(cmd) = cfg.command.clone().or_else(|| which("python3")) else {
        return unavailable(
            Language::Python,
            Backend::Native,
            "python3 not found on PATH; set runtimes.python.command".into(),
        );
    };
    let probe = "import sys,platform\nprint(sys.executable)\nprint(platform.python_version())\n\
                 print(sys.prefix)\nprint(sys.base_prefix)";
    match run_probe(&cmd, &["-c", probe]) {
        Ok(lines) if lines.len() >= 4 && !lines[0].is_empty() => {
            let exe = std::fs::canonicalize(&lines[0]).unwrap_or_else(|_| PathBuf::from(&lines[0]));
            let mut read_paths = vec![
                exe.clone(),
                PathBuf::from(&lines[2]),
                PathBuf::from(&lines[3]),
            ];
            if let Some(dir) = exe.parent() {
                read_paths.push(dir.to_path_buf());
            }
            Runtime {
                language: Language::Python,
                command: exe,
                version: lines[1].clone(),
                backend: Backend::Native,
                available: true,
                detail: String::new(),
                read_paths,
            }
        }
        Ok(lines) => unavailable(
            Language::Python,
            Backend::Native,
            format!("unexpected answer from {}: {lines:?}", cmd.display()),
        ),
        Err(e) => unavailable(Language::Python, Backend::Native, e),
    }
}

fn discover_node(language: Language, cfg: &RuntimeConfig) -> Runtime {
    let Some(cmd) = cfg.command.clone().or_else(|| which("node")) else {
        return unavailable(
            language,
            Backend::Native,
            "node not found on PATH; set runtimes.<language>.command".into(),
        );
    };
    match run_probe(
        &cmd,
        &[
            "-e",
            "console.log(process.execPath);console.log(process.version)",
        ],
    ) {
        Ok(lines) if lines.len() >= 2 && !lines[0].is_empty() => {
            let exe = std::fs::canonicalize(&lines[0]).unwrap_or_else(|_| PathBuf::from(&lines[0]));
            // Node reads OpenSSL's config at start and refuses to run when it cannot.
            let mut read_paths = vec![exe.clone(), PathBuf::from("/etc/ssl/openssl.cnf")];
            if let Some(prefix) = exe.parent().and_then(Path::parent) {
                read_paths.push(prefix.join("lib/node_modules"));
            }
            Runtime {
                language,
                command: exe,
                version: lines[1].clone(),
                backend: Backend::Native,
                available: true,
                detail: String::new(),
                read_paths,
            }
        }
        Ok(lines) => unavailable(
            language,
            Backend::Native,
            format!("unexpected answer from {}: {lines:?}", cmd.display()),
        ),
        Err(e) => unavailable(language, Backend::Native, e),
    }
}

fn discover_elide(language: Language, cfg: &RuntimeConfig) -> Runtime {
    let Some(cmd) = cfg.elide.clone().or_else(|| which("elide")) else {
        return unavailable(
            language,
            Backend::Elide,
            "backend \"elide\" configured but no elide binary found (set runtimes.<language>.elide)"
                .into(),
        );
    };
    match run_probe(&cmd, &["--version"]) {
        Ok(lines) => {
            let exe = std::fs::canonicalize(&cmd).unwrap_or(cmd);
            Runtime {
                language,
                read_paths: vec![exe.clone()],
                command: exe,
                version: lines.first().cloned().unwrap_or_default(),
                backend: Backend::Elide,
                available: true,
                detail: String::new(),
            }
        }
        Err(e) => unavailable(language, Backend::Elide, e),
    }
}

impl RuntimeRegistry {
    /// Probes the interpreters (runs each once); blocking, call at start.
    pub fn discover(cfg: &RuntimesConfig) -> Self {
        let mut runtimes = Vec::new();
        for language in Language::ALL {
            let rc = match language {
                Language::Python => &cfg.python,
                Language::JavaScript => &cfg.javascript,
                Language::TypeScript => &cfg.typescript,
            };
            let mut rt = if rc.enabled == Some(false) {
                unavailable(
                    language,
                    Backend::Native,
                    "disabled in the daemon config".into(),
                )
            } else if rc.backend.as_deref() == Some("elide") {
                discover_elide(language, rc)
            } else if language == Language::Python {
                discover_python(rc)
            } else {
                discover_node(language, rc)
            };
            if let Some(b) = rc.backend.as_deref()
                && b != "elide"
                && b != "native"
            {
                rt = unavailable(
                    language,
                    Backend::Native,
                    format!(
                        "runtimes.{}.backend = {b:?}: expected \"native\" or \"elide\"",
                        language.name()
                    ),
                );
            }
            rt.read_paths
                .extend(SYSTEM_READ_PATHS.iter().map(PathBuf::from));
            // Landlock refuses rules for paths that do not exist; distributions differ.
            rt.read_paths.retain(|p| p.exists());
            rt.read_paths.dedup();
            runtimes.push(rt);
        }
        Self { runtimes }
    }

    /// Every runtime, available or not.
    pub fn all(&self) -> &[Runtime] {
        &self.runtimes
    }

    /// The runtime of `language`.
    pub fn get(&self, language: Language) -> Option<&Runtime> {
        self.runtimes.iter().find(|r| r.language == language)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_parse() {
        assert_eq!(Language::parse("py"), Some(Language::Python));
        assert_eq!(Language::parse("JS"), Some(Language::JavaScript));
        assert_eq!(Language::parse("typescript"), Some(Language::TypeScript));
        assert_eq!(Language::parse("ruby"), None);
        assert_eq!(
            Language::from_extension(Path::new("/a/b.ts")),
            Some(Language::TypeScript)
        );
    }

    #[test]
    fn discovery_resolves_real_interpreters() {
        let reg = RuntimeRegistry::discover(&RuntimesConfig::default());
        // The project's tests need python3 and node on PATH (README): both are found.
        let py = reg.get(Language::Python).unwrap();
        assert!(py.available, "{py:?}");
        assert!(py.command.is_absolute());
        assert!(
            !py.command.to_string_lossy().contains("shims"),
            "{:?}",
            py.command
        );
        assert!(py.version.starts_with('3'), "{}", py.version);
        let js = reg.get(Language::JavaScript).unwrap();
        assert!(js.available, "{js:?}");
        assert!(js.command.is_absolute());
        assert!(js.version.starts_with('v'), "{}", js.version);
    }

    #[test]
    fn disabled_and_bad_backend_are_unavailable() {
        let cfg = RuntimesConfig {
            python: RuntimeConfig {
                enabled: Some(false),
                ..Default::default()
            },
            javascript: RuntimeConfig {
                backend: Some("jvm".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let reg = RuntimeRegistry::discover(&cfg);
        assert!(!reg.get(Language::Python).unwrap().available);
        let js = reg.get(Language::JavaScript).unwrap();
        assert!(!js.available && js.detail.contains("jvm"));
    }
}
