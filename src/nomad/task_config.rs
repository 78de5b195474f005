//! The schema of a job's task `config {}` block for `driver = "elide"`, and its decoding and
//! validation at StartTask. Nomad checks types against the schema first; what it cannot check
//! (script XOR code, the script staying inside the task dir, the language being enabled on
//! this node, durations) is checked here, with errors naming the field.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::config::Language;
use super::cty::{self, CtyError, CtyNumber, CtyValue};
use super::hclspec::{attr, block, implied_type, object};
use crate::proto::hashicorp::nomad::plugins::shared::hclspec::Spec;

/// TaskConfigSchema's spec (never nil: a nil spec breaks every task of the driver).
pub fn schema() -> Spec {
    object([
        // Path of a script file inside the task dir (exclusive with `code`).
        ("script", attr("script", "string", false)),
        // Inline source (exclusive with `script`).
        ("code", attr("code", "string", false)),
        // python/javascript/typescript or an alias; inferred from the script's extension if unset.
        ("language", attr("language", "string", false)),
        ("args", attr("args", "list(string)", false)),
        ("env", attr("env", "map(string)", false)),
        (
            "elide_opts",
            block(
                "elide_opts",
                false,
                object([
                    // Wall-clock limit, e.g. "30s".
                    ("timeout", attr("timeout", "string", false)),
                    // Tighter memory limit than the task's resources, in MiB.
                    ("memory_limit_mb", attr("memory_limit_mb", "number", false)),
                ]),
            ),
        ),
    ])
}

/// Where the snippet's source comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Inline code (`code`).
    Code(String),
    /// A script file, resolved to its real path inside the task dir (`script`).
    Script(PathBuf),
}

/// A validated task `config {}` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// Source of the snippet.
    pub source: Source,
    /// The language (given, or inferred from the script's extension).
    pub language: Language,
    /// Arguments after the script.
    pub args: Vec<String>,
    /// Variables set over Nomad's task environment.
    pub env: BTreeMap<String, String>,
    /// `elide_opts.timeout`: wall-clock limit.
    pub timeout: Option<Duration>,
    /// `elide_opts.memory_limit_mb`: a tighter memory limit than the task's resources.
    pub memory_limit_mb: Option<u64>,
}

/// A task config Nomad delivered that we cannot run; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid task config: {field}: {message}")]
pub struct TaskConfigError {
    /// The field (`script`, `elide_opts.timeout`, ...).
    pub field: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> TaskConfigError {
    TaskConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

impl TaskSpec {
    /// Decodes `msgpack_driver_config` against [`schema`] and validates it: exactly one of
    /// `script` and `code`; the script inside `task_dir`; the language among `enabled`.
    pub fn decode(
        msgpack: &[u8],
        task_dir: &Path,
        enabled: &[Language],
    ) -> Result<TaskSpec, TaskConfigError> {
        if msgpack.is_empty() {
            return Err(bad(
                "config",
                "is empty; give `code` or `script` (and `language`)",
            ));
        }
        let ty = implied_type(&schema()).map_err(|e| bad("config", e.to_string()))?;
        let value = cty::decode(msgpack, &ty).map_err(|e| match &e {
            CtyError::Type { path, .. }
            | CtyError::BadNumber { path, .. }
            | CtyError::UnknownKey { path, .. }
            | CtyError::Unknown { path }
            | CtyError::UnsupportedExt { path, .. }
            | CtyError::BadDynamicType { path, .. }
            | CtyError::TooDeep { path } => TaskConfigError {
                field: if path.is_empty() {
                    "config".into()
                } else {
                    path.clone()
                },
                message: strip_path(&e.to_string(), path),
            },
            other => bad("config", other.to_string()),
        })?;
        let CtyValue::Map(root) = &value else {
            return Err(bad(
                "config",
                format!("expected an object, got {}", value.kind()),
            ));
        };
        let script = opt_string(root, "script")?;
        let code = opt_string(root, "code")?;
        let language = opt_string(root, "language")?;
        let source = match (script, code) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "script",
                    "both `script` and `code` are set; give exactly one",
                ));
            }
            (None, None) => {
                return Err(bad(
                    "code",
                    "neither `script` nor `code` is set; give exactly one",
                ));
            }
            (None, Some(code)) => {
                if code.trim().is_empty() {
                    return Err(bad("code", "is empty"));
                }
                Source::Code(code)
            }
            (Some(script), None) => Source::Script(resolve_script(&script, task_dir)?),
        };
        let language = match (language, &source) {
            (Some(l), _) => Language::parse(&l).ok_or_else(|| {
                bad(
                    "language",
                    format!(
                        "unknown language {l:?}; expected python (py), javascript (js) or typescript (ts)"
                    ),
                )
            })?,
            (None, Source::Script(p)) => infer_language(p).ok_or_else(|| {
                bad(
                    "language",
                    format!(
                        "not set and cannot be inferred from {:?}; set language = \"python\", \"javascript\" or \"typescript\"",
                        p.file_name().unwrap_or_default()
                    ),
                )
            })?,
            (None, Source::Code(_)) => {
                return Err(bad(
                    "language",
                    "is required with `code`: python (py), javascript (js) or typescript (ts)",
                ));
            }
        };
        if !enabled.contains(&language) {
            let names: Vec<&str> = enabled.iter().map(|l| l.as_str()).collect();
            return Err(bad(
                "language",
                format!(
                    "{} is not enabled on this node (session_config.enabled_languages = [{}])",
                    language.as_str(),
                    names.join(", ")
                ),
            ));
        }
        let args = match root.get("args") {
            None | Some(CtyValue::Null) => Vec::new(),
            Some(CtyValue::List(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    CtyValue::String(s) if s.contains('\0') => {
                        Err(bad(&format!("args[{i}]"), "contains a NUL byte"))
                    }
                    CtyValue::String(s) => Ok(s.clone()),
                    other => Err(bad(
                        &format!("args[{i}]"),
                        format!("expected string, got {}", other.kind()),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(bad(
                    "args",
                    format!("expected list(string), got {}", other.kind()),
                ));
            }
        };
        let env = match root.get("env") {
            None | Some(CtyValue::Null) => BTreeMap::new(),
            Some(CtyValue::Map(m)) => {
                let mut env = BTreeMap::new();
                for (k, v) in m {
                    let field = format!("env.{k}");
                    if k.is_empty() || k.contains('=') || k.contains('\0') {
                        return Err(bad(
                            &field,
                            format!(
                                "{k:?} is not a valid variable name (no '=' or NUL, not empty)"
                            ),
                        ));
                    }
                    match v {
                        CtyValue::String(s) if s.contains('\0') => {
                            return Err(bad(&field, "value contains a NUL byte"));
                        }
                        CtyValue::String(s) => {
                            env.insert(k.clone(), s.clone());
                        }
                        other => {
                            return Err(bad(
                                &field,
                                format!("expected string, got {}", other.kind()),
                            ));
                        }
                    }
                }
                env
            }
            Some(other) => {
                return Err(bad(
                    "env",
                    format!("expected map(string), got {}", other.kind()),
                ));
            }
        };
        let (timeout, memory_limit_mb) = elide_opts(root.get("elide_opts"))?;
        Ok(TaskSpec {
            source,
            language,
            args,
            env,
            timeout,
            memory_limit_mb,
        })
    }
}

fn strip_path(text: &str, path: &str) -> String {
    text.strip_prefix(&format!("{path}: "))
        .unwrap_or(text)
        .to_string()
}

fn opt_string(
    root: &BTreeMap<String, CtyValue>,
    key: &str,
) -> Result<Option<String>, TaskConfigError> {
    match root.get(key) {
        None | Some(CtyValue::Null) => Ok(None),
        Some(CtyValue::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(key, format!("expected string, got {}", other.kind()))),
    }
}

fn elide_opts(v: Option<&CtyValue>) -> Result<(Option<Duration>, Option<u64>), TaskConfigError> {
    let map = match v {
        None | Some(CtyValue::Null) => return Ok((None, None)),
        Some(CtyValue::Map(m)) => m,
        // Tolerate a block delivered as a list of one object.
        Some(CtyValue::List(items)) if items.len() == 1 => match &items[0] {
            CtyValue::Map(m) => m,
            other => {
                return Err(bad(
                    "elide_opts",
                    format!("expected a block, got {}", other.kind()),
                ));
            }
        },
        Some(other) => {
            return Err(bad(
                "elide_opts",
                format!("expected a block, got {}", other.kind()),
            ));
        }
    };
    let timeout = match map.get("timeout") {
        None | Some(CtyValue::Null) => None,
        Some(CtyValue::String(s)) => {
            let d = humantime::parse_duration(s.trim()).map_err(|e| {
                bad(
                    "elide_opts.timeout",
                    format!("{s:?} is not a duration ({e}); write e.g. \"30s\" or \"5m\""),
                )
            })?;
            if d.is_zero() {
                return Err(bad(
                    "elide_opts.timeout",
                    format!("{s:?} must be longer than zero"),
                ));
            }
            Some(d)
        }
        Some(other) => {
            return Err(bad(
                "elide_opts.timeout",
                format!("expected string, got {}", other.kind()),
            ));
        }
    };
    let memory = match map.get("memory_limit_mb") {
        None | Some(CtyValue::Null) => None,
        Some(CtyValue::Number(CtyNumber::Int(n))) if *n > 0 => {
            Some(u64::try_from(*n).map_err(|_| bad("elide_opts.memory_limit_mb", "too large"))?)
        }
        Some(CtyValue::Number(n)) => {
            return Err(bad(
                "elide_opts.memory_limit_mb",
                format!("must be a whole number of MiB greater than 0, got {n}"),
            ));
        }
        Some(other) => {
            return Err(bad(
                "elide_opts.memory_limit_mb",
                format!("expected number, got {}", other.kind()),
            ));
        }
    };
    Ok((timeout, memory))
}

/// The language a script's extension implies.
pub fn infer_language(p: &Path) -> Option<Language> {
    match p.extension()?.to_str()? {
        "py" => Some(Language::Python),
        "js" | "mjs" | "cjs" => Some(Language::JavaScript),
        "ts" | "mts" | "cts" => Some(Language::TypeScript),
        _ => None,
    }
}

/// Resolves `script` inside `task_dir`: relative paths are taken from the task dir, absolute
/// ones must already point into it; `..` components are refused outright, and the real path
/// (symlinks resolved) must still be inside the task dir and be a regular file.
pub fn resolve_script(script: &str, task_dir: &Path) -> Result<PathBuf, TaskConfigError> {
    let field = "script";
    if script.trim().is_empty() {
        return Err(bad(field, "is empty"));
    }
    if script.contains('\0') {
        return Err(bad(field, "contains a NUL byte"));
    }
    let given = Path::new(script);
    if given
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(bad(
            field,
            format!(
                "{script:?} contains `..`; give a path inside the task dir such as \"local/main.py\""
            ),
        ));
    }
    let root = std::fs::canonicalize(task_dir).map_err(|e| {
        bad(
            field,
            format!("task dir {} is not accessible: {e}", task_dir.display()),
        )
    })?;
    let candidate = if given.is_absolute() {
        if !given.starts_with(task_dir) && !given.starts_with(&root) {
            return Err(bad(
                field,
                format!(
                    "{script:?} is outside the task dir {}; give a path inside it such as \"local/main.py\"",
                    task_dir.display()
                ),
            ));
        }
        given.to_path_buf()
    } else {
        task_dir.join(given)
    };
    let real = match std::fs::canonicalize(&candidate) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(
                field,
                format!(
                    "{script:?} not found in the task dir {} (render it with a template or artifact into local/)",
                    task_dir.display()
                ),
            ));
        }
        Err(e) => return Err(bad(field, format!("{script:?}: {e}"))),
    };
    if !real.starts_with(&root) {
        return Err(bad(
            field,
            format!(
                "{script:?} resolves through a symlink to {}, outside the task dir {}",
                real.display(),
                task_dir.display()
            ),
        ));
    }
    match std::fs::metadata(&real) {
        Ok(m) if m.is_file() => Ok(real),
        Ok(_) => Err(bad(field, format!("{script:?} is not a regular file"))),
        Err(e) => Err(bad(field, format!("{script:?}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value as V;

    fn enc(entries: Vec<(&str, V)>) -> Vec<u8> {
        let mut all: BTreeMap<&str, V> = [
            ("args", V::Nil),
            ("code", V::Nil),
            ("elide_opts", V::Nil),
            ("env", V::Nil),
            ("language", V::Nil),
            ("script", V::Nil),
        ]
        .into_iter()
        .collect();
        for (k, v) in entries {
            all.insert(k, v);
        }
        let v = V::Map(all.into_iter().map(|(k, v)| (V::from(k), v)).collect());
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).unwrap();
        out
    }

    fn decode(entries: Vec<(&str, V)>, dir: &Path) -> Result<TaskSpec, TaskConfigError> {
        TaskSpec::decode(&enc(entries), dir, &Language::ALL)
    }

    #[test]
    fn code_with_everything() {
        let dir = tempfile::tempdir().unwrap();
        let s = decode(
            vec![
                ("code", V::from("print(1)")),
                ("language", V::from("py")),
                ("args", V::Array(vec![V::from("a"), V::from("b")])),
                ("env", V::Map(vec![(V::from("K"), V::from("v"))])),
                (
                    "elide_opts",
                    V::Map(vec![
                        (V::from("memory_limit_mb"), V::from(64)),
                        (V::from("timeout"), V::from("2s")),
                    ]),
                ),
            ],
            dir.path(),
        )
        .unwrap();
        assert_eq!(s.source, Source::Code("print(1)".into()));
        assert_eq!(s.language, Language::Python);
        assert_eq!(s.args, ["a", "b"]);
        assert_eq!(s.env["K"], "v");
        assert_eq!(s.timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.memory_limit_mb, Some(64));
    }

    #[test]
    fn script_and_code_are_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let e = decode(
            vec![("code", V::from("x")), ("script", V::from("a.py"))],
            dir.path(),
        )
        .unwrap_err();
        assert_eq!(e.field, "script");
        let e = decode(vec![("language", V::from("py"))], dir.path()).unwrap_err();
        assert_eq!(e.field, "code");
        assert!(e.message.contains("neither"), "{e}");
    }

    #[test]
    fn script_escapes_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let task = base.path().join("task");
        std::fs::create_dir_all(task.join("local")).unwrap();
        std::fs::write(base.path().join("outside.py"), "print(1)").unwrap();
        std::fs::write(task.join("local/in.py"), "print(1)").unwrap();
        std::os::unix::fs::symlink(base.path().join("outside.py"), task.join("local/link.py"))
            .unwrap();
        let e = resolve_script("../outside.py", &task).unwrap_err();
        assert!(e.message.contains("`..`"), "{e}");
        let e =
            resolve_script(base.path().join("outside.py").to_str().unwrap(), &task).unwrap_err();
        assert!(e.message.contains("outside the task dir"), "{e}");
        let e = resolve_script("local/link.py", &task).unwrap_err();
        assert!(e.message.contains("symlink"), "{e}");
        let e = resolve_script("local/missing.py", &task).unwrap_err();
        assert!(e.message.contains("not found"), "{e}");
        assert!(resolve_script("local/in.py", &task).is_ok());
        let abs = task.join("local/in.py");
        assert!(resolve_script(abs.to_str().unwrap(), &task).is_ok());
        let s = TaskSpec::decode(
            &enc(vec![("script", V::from("local/in.py"))]),
            &task,
            &Language::ALL,
        )
        .unwrap();
        assert_eq!(s.language, Language::Python);
    }

    #[test]
    fn languages_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let e = decode(
            vec![("code", V::from("x")), ("language", V::from("cobol"))],
            dir.path(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("language: unknown language \"cobol\""),
            "{e}"
        );
        let e = TaskSpec::decode(
            &enc(vec![("code", V::from("x")), ("language", V::from("ts"))]),
            dir.path(),
            &[Language::Python],
        )
        .unwrap_err();
        assert!(e.to_string().contains("typescript is not enabled"), "{e}");
        let e = decode(vec![("code", V::from("x"))], dir.path()).unwrap_err();
        assert_eq!(e.field, "language");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = vec![
            (vec![("code", V::from(5))], "code"),
            (
                vec![("code", V::from("x")), ("language", V::from(true))],
                "language",
            ),
            (
                vec![
                    ("code", V::from("x")),
                    ("language", V::from("py")),
                    ("args", V::from("a")),
                ],
                "args",
            ),
            (
                vec![
                    ("code", V::from("x")),
                    ("language", V::from("py")),
                    ("env", V::from(1)),
                ],
                "env",
            ),
            (
                vec![
                    ("code", V::from("x")),
                    ("language", V::from("py")),
                    (
                        "elide_opts",
                        V::Map(vec![(V::from("memory_limit_mb"), V::from(-1))]),
                    ),
                ],
                "elide_opts.memory_limit_mb",
            ),
            (
                vec![
                    ("code", V::from("x")),
                    ("language", V::from("py")),
                    (
                        "elide_opts",
                        V::Map(vec![(V::from("timeout"), V::from("soon"))]),
                    ),
                ],
                "elide_opts.timeout",
            ),
        ];
        for (entries, field) in cases {
            let e = decode(entries, dir.path()).unwrap_err();
            assert!(e.field.starts_with(field), "want {field}, got {e}");
        }
        let e = TaskSpec::decode(&[0xc1], dir.path(), &Language::ALL).unwrap_err();
        assert_eq!(e.field, "config");
    }
}
