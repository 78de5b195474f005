//! TypeScript → JavaScript by erasing types (swc's fast strip, the engine behind Node's own
//! `--experimental-strip-types`). Types become whitespace, so every line and column of the
//! user's TypeScript keeps its position and stack traces point at the right place.
//!
//! Syntax that needs code generation (enums, namespaces, parameter properties) is refused with
//! the compiler's diagnostic instead of silently transformed, matching Node's strip-only mode.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use swc_common::errors::Handler;
use swc_common::sync::Lrc;
use swc_common::{GLOBALS, Globals, SourceMap};
use swc_ts_fast_strip::{Mode, Options, operate};

/// A TypeScript snippet the stripper refused.
#[derive(Debug, thiserror::Error)]
#[error("typescript {kind}: {detail}")]
pub struct StripError {
    /// "syntax error", "unsupported syntax (enum, namespace, parameter property...)", ...
    pub kind: String,
    /// The compiler's diagnostics, with positions.
    pub detail: String,
}

/// Collects swc diagnostics written by its emitter.
#[derive(Clone, Default)]
struct DiagnosticBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for DiagnosticBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Strips the types of `source`; `filename` only labels diagnostics.
pub fn strip(source: &str, filename: &str) -> Result<String, StripError> {
    let cm: Lrc<SourceMap> = Default::default();
    let buffer = DiagnosticBuffer::default();
    let handler = Handler::with_emitter_writer(Box::new(buffer.clone()), Some(cm.clone()));
    let options = Options {
        filename: Some(filename.to_string()),
        mode: Mode::StripOnly,
        ..Default::default()
    };
    let result = GLOBALS.set(&Globals::new(), || {
        operate(&cm, &handler, source.to_string(), options)
    });
    match result {
        Ok(out) => Ok(out.code),
        Err(err) => {
            let detail = buffer
                .0
                .lock()
                .map(|v| String::from_utf8_lossy(&v).trim().to_string())
                .unwrap_or_default();
            let kind = match err.code {
                swc_ts_fast_strip::ErrorCode::UnsupportedSyntax => {
                    "unsupported syntax (enums, namespaces and parameter properties need code \
                     generation, which strip-only mode refuses; use plain objects/functions)"
                        .to_string()
                }
                swc_ts_fast_strip::ErrorCode::InvalidSyntax => "syntax error".to_string(),
                _ => "error".to_string(),
            };
            let detail = if detail.is_empty() {
                err.message
            } else {
                detail
            };
            Err(StripError { kind, detail })
        }
    }
}

/// Caches stripped output by the SHA-256 of the source, so the same snippet started many times
/// is compiled once. Bounded: when full, it is simply emptied (snippets are cheap to strip).
pub struct StripCache {
    entries: Mutex<HashMap<[u8; 32], Arc<str>>>,
    capacity: usize,
}

impl StripCache {
    /// A cache holding at most `capacity` stripped sources.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Returns the stripped JavaScript for `source`, from the cache when possible.
    pub fn strip(&self, source: &str, filename: &str) -> Result<Arc<str>, StripError> {
        let key: [u8; 32] = Sha256::digest(source.as_bytes()).into();
        if let Ok(map) = self.entries.lock()
            && let Some(hit) = map.get(&key)
        {
            return Ok(hit.clone());
        }
        let js: Arc<str> = strip(source, filename)?.into();
        if let Ok(mut map) = self.entries.lock() {
            if map.len() >= self.capacity {
                map.clear();
            }
            map.insert(key, js.clone());
        }
        Ok(js)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_keeps_positions() {
        let src = "const x: number = 1;\nfunction f(a: string): void { console.log(a, x) }\n";
        let js = strip(src, "t.ts").unwrap();
        assert_eq!(js.len(), src.len());
        assert_eq!(js.lines().count(), src.lines().count());
        assert!(js.contains("const x"));
        assert!(!js.contains("number"));
        let col = src.find("console").unwrap();
        assert_eq!(js.find("console").unwrap(), col);
    }

    #[test]
    fn strip_rejects_enum_with_clear_error() {
        let err = strip("enum Color { Red, Green }\n", "t.ts").unwrap_err();
        assert!(err.kind.contains("unsupported"), "{err}");
        assert!(err.to_string().contains("enum"), "{err}");
    }

    #[test]
    fn strip_reports_syntax_error() {
        let err = strip("let = ;\n", "t.ts").unwrap_err();
        assert!(err.kind.contains("syntax"), "{err}");
    }

    #[test]
    fn cache_returns_same_result() {
        let cache = StripCache::new(2);
        let a = cache.strip("let a: number = 1", "a.ts").unwrap();
        let b = cache.strip("let a: number = 1", "a.ts").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        for i in 0..5 {
            cache
                .strip(&format!("let v{i}: number = {i}"), "x.ts")
                .unwrap();
        }
    }
}
