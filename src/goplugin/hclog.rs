//! hclog-compatible JSON logs on stderr, as a `tracing-subscriber` layer.
//!
//! go-plugin hosts parse each stderr line as JSON and type-assert `@message`, `@level` and
//! `@timestamp` as strings (anything else crashes the host), accept only the level names
//! `trace|debug|info|warn|error`, and demote a line whose timestamp lacks exactly six fractional
//! digits to Debug. Every other key becomes a key/value pair on the host's log line.

use std::io::{self, Write};
use std::time::SystemTime;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};

/// hclog's name for a tracing level (never `warning`).
pub fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// RFC 3339 UTC with exactly six fractional digits (Go layout `2006-01-02T15:04:05.000000Z07:00`).
pub fn timestamp(now: SystemTime) -> String {
    humantime::format_rfc3339_micros(now).to_string()
}

/// Collects an event's fields into JSON values; `message` becomes `@message`.
#[derive(Default)]
struct JsonVisitor {
    message: Option<String>,
    fields: Map<String, Value>,
}

impl JsonVisitor {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if name == "message" {
            let text = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
            self.message = Some(text);
        } else if name.starts_with('@') {
            // Never let a field shadow (and possibly mistype) a reserved hclog key.
            self.fields.insert(format!("field{name}"), value);
        } else {
            self.fields.insert(name.to_string(), value);
        }
    }
}

impl Visit for JsonVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.to_string()));
        self.put(field, v);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.put(field, Value::String(text));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

/// Formats one event as a single hclog JSON line (with the trailing newline).
pub fn format_event(event: &Event<'_>, now: SystemTime) -> String {
    let mut visitor = JsonVisitor::default();
    event.record(&mut visitor);
    let meta = event.metadata();
    let mut obj = visitor.fields;
    obj.insert(
        "@level".into(),
        Value::String(level_name(meta.level()).into()),
    );
    obj.insert(
        "@message".into(),
        Value::String(visitor.message.unwrap_or_default()),
    );
    obj.insert("@timestamp".into(), Value::String(timestamp(now)));
    obj.insert(
        "@module".into(),
        Value::String(meta.target().replace("::", ".")),
    );
    // serde_json escapes control characters, so the line never contains a raw newline.
    let mut line = Value::Object(obj).to_string();
    line.push('\n');
    line
}

/// A layer writing hclog JSON lines to `W`.
pub struct HclogLayer<W> {
    make_writer: W,
}

impl<W> HclogLayer<W> {
    /// A layer writing to `make_writer`.
    pub fn new(make_writer: W) -> Self {
        Self { make_writer }
    }
}

impl<S, W> Layer<S> for HclogLayer<W>
where
    S: Subscriber,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let line = format_event(event, SystemTime::now());
        let mut writer = self.make_writer.make_writer_for(event.metadata());
        // Write failures are swallowed by design: a logger must never take the plugin down.
        let _ = writer.write_all(line.as_bytes());
    }
}

/// A file descriptor (fd 2 by default) written with raw `write(2)`: retries partial writes and
/// EINTR, and silently drops the rest on any other error (EPIPE once the host is gone), never
/// panicking like `eprintln!`.
#[derive(Debug, Clone, Copy)]
pub struct SafeStderr {
    fd: std::os::fd::RawFd,
}

impl Default for SafeStderr {
    fn default() -> Self {
        Self { fd: 2 }
    }
}

impl SafeStderr {
    /// The same writer on another descriptor (tests).
    pub fn on_fd(fd: std::os::fd::RawFd) -> Self {
        Self { fd }
    }
}

impl Write for SafeStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            // SAFETY: writing an initialised byte slice to fd 2.
            let n = unsafe { libc::write(self.fd, rest.as_ptr().cast(), rest.len()) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if n == 0 {
                break;
            }
            rest = &rest[n.unsigned_abs()..];
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for SafeStderr {
    type Writer = SafeStderr;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Installs the global subscriber: hclog JSON on stderr, filtered by the `env_var` directives
/// (EnvFilter syntax) or `default_directives`. A second call is a no-op.
pub fn init(env_var: &str, default_directives: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env(env_var)
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default_directives))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(HclogLayer::new(SafeStderr::default()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    fn capture(f: impl FnOnce()) -> Vec<Value> {
        let buf = Buf::default();
        let sub = tracing_subscriber::registry().with(HclogLayer::new(buf.clone()));
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Checks the Go layout `2006-01-02T15:04:05.000000Z07:00` by hand.
    fn is_go_micro_timestamp(s: &str) -> bool {
        let b = s.as_bytes();
        let digits =
            |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
        b.len() == 27
            && digits(0..4)
            && b[4] == b'-'
            && digits(5..7)
            && b[7] == b'-'
            && digits(8..10)
            && b[10] == b'T'
            && digits(11..13)
            && b[13] == b':'
            && digits(14..16)
            && b[16] == b':'
            && digits(17..19)
            && b[19] == b'.'
            && digits(20..26)
            && b[26] == b'Z'
    }

    #[test]
    fn every_level_maps_to_an_hclog_name() {
        let lines = capture(|| {
            tracing::trace!("t");
            tracing::debug!("d");
            tracing::info!("i");
            tracing::warn!("w");
            tracing::error!("e");
        });
        let levels: Vec<_> = lines
            .iter()
            .map(|l| l["@level"].as_str().unwrap())
            .collect();
        assert_eq!(levels, ["trace", "debug", "info", "warn", "error"]);
    }

    #[test]
    fn reserved_keys_are_strings_and_fields_are_flattened() {
        let lines = capture(|| {
            tracing::info!(
                task_id = "a/b/c",
                count = 3u64,
                ok = true,
                ratio = 0.5,
                "starting {}",
                "task"
            );
        });
        let l = &lines[0];
        assert_eq!(l["@message"], "starting task");
        assert_eq!(l["@module"], "elide_task_driver.goplugin.hclog.tests");
        assert_eq!(l["task_id"], "a/b/c");
        assert_eq!(l["count"], 3);
        assert_eq!(l["ok"], true);
        assert_eq!(l["ratio"], 0.5);
        assert!(l["@timestamp"].is_string());
    }

    #[test]
    fn event_without_message_still_has_string_message() {
        let lines = capture(|| tracing::warn!(x = 1));
        assert_eq!(lines[0]["@message"], "");
    }

    #[test]
    fn field_named_like_reserved_key_cannot_override_it() {
        let lines = capture(|| tracing::info!(message = 5, "{}", "x"));
        assert!(lines[0]["@message"].is_string());
    }

    #[test]
    fn timestamps_have_exactly_six_fractional_digits() {
        for secs in [0u64, 1, 1_700_000_000, 1_800_000_000] {
            for nanos in [0u32, 1, 999, 1_000, 123_456_789, 999_999_999] {
                let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
                let s = timestamp(t);
                assert!(is_go_micro_timestamp(&s), "{s}");
            }
        }
        let lines = capture(|| tracing::info!("now"));
        assert!(is_go_micro_timestamp(
            lines[0]["@timestamp"].as_str().unwrap()
        ));
    }

    #[test]
    fn multiline_messages_stay_on_one_line() {
        let buf = Buf::default();
        let sub = tracing_subscriber::registry().with(HclogLayer::new(buf.clone()));
        tracing::subscriber::with_default(sub, || tracing::error!("a\nb\r\nc"));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches('\n').count(), 1);
        let v: Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["@message"], "a\nb\r\nc");
    }

    #[test]
    fn safe_stderr_swallows_epipe() {
        use std::os::fd::AsRawFd;
        // A pipe whose read end is closed: write(2) fails with EPIPE (Rust ignores SIGPIPE).
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let res = SafeStderr::on_fd(w.as_raw_fd()).write(b"lost line\n");
        assert_eq!(res.unwrap(), 10);
        // And the layer on top of it keeps going.
        let sub =
            tracing_subscriber::registry().with(HclogLayer::new(SafeStderr::on_fd(w.as_raw_fd())));
        tracing::subscriber::with_default(sub, || tracing::error!("into the void"));
    }
}
