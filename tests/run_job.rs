//! Runs a `.nomad` job file's `elide` tasks the way a Nomad client would, without Nomad:
//! launches the real plugin binary (go-plugin handshake, cty msgpack config), lets it
//! auto-start a real `elide-daemon`, lays out a Nomad-shaped alloc dir with logmon-like FIFO
//! readers, renders `template` blocks, StartTask → streams the task logs → WaitTask.
//!
//! `make dev` (or `cargo test --test run_job -- examples/http-server.nomad`). Service jobs run
//! until Ctrl-C, then get StopTask with the task's `kill_signal` / `kill_timeout`.
//!
//! Constraints on the driver's own node attributes (`${attr.driver.elide}` and
//! `${attr.driver.elide.*}`; operators `=`, `!=`, `is_set`, `is_not_set`) are checked against
//! the plugin's fingerprint first: a job this node fails is reported as not placed, as Nomad
//! would leave it pending, and not run. Other constraints are named and not checked.
//!
//! With no argument it runs every batch job in `examples/` (service jobs only when named), and
//! checks hello-python's greeting: `make test` exercises each example end to end. An example
//! counts as passing when its tasks exit 0, or when its constraints rule this node out on an
//! attribute the plugin reports (a misspelt one fails).

mod lifecycle_support;
mod support;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use std::collections::HashMap;

use elide_task_driver::proto::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use elide_task_driver::proto::hashicorp::nomad::plugins::shared::structs::{
    Attribute, attribute::Value as AttrValue,
};
use lifecycle_support::{Alloc, AutoDaemon, Plugin, plugin_config};
use serde_json::{Map, Value};

/// One `task` block of the job that uses our driver.
struct JobTask {
    name: String,
    config: Value,
    templates: Vec<(String, String)>,
    env: Map<String, Value>,
    memory_mb: Option<i64>,
    kill_signal: String,
    kill_timeout: Duration,
}

/// How a job that could be read ended.
enum Outcome {
    /// Its tasks ran (and all exited 0).
    Ran,
    /// Its constraints rule this node out.
    NotPlaced(Unmet),
}

/// A constraint this node fails.
struct Unmet {
    why: String,
    /// The attribute is one the plugin reports (else the job may have misspelt it).
    reported: bool,
}

fn main() -> ExitCode {
    // `cargo test` passes its own flags (e.g. `--nocapture`); the first plain argument is the job.
    let job = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("run_job: cannot start a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(job) = job else {
        return runtime.block_on(run_examples());
    };
    let hello_python = job.ends_with("examples/hello-python.nomad");
    match runtime.block_on(run(Path::new(&job), hello_python)) {
        Ok(Outcome::Ran) => ExitCode::SUCCESS,
        Ok(Outcome::NotPlaced(Unmet { why, .. })) => {
            eprintln!("run_job: not placed on this node, Nomad would leave the job pending: {why}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("run_job: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Every batch job in `examples/`, one after the other.
async fn run_examples() -> ExitCode {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut jobs: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("nomad"))
            .collect(),
        Err(e) => {
            eprintln!("run_job: reading {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    jobs.sort();
    let mut summary = Vec::new();
    let mut ok = true;
    for path in &jobs {
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let outcome = match read_job(path) {
            Ok(job) if job_type(&job) == "service" => {
                summary.push(format!("{name}: skipped (a service job; run it by name)"));
                continue;
            }
            Ok(_) => run(path, name == "hello-python.nomad").await,
            Err(e) => Err(e),
        };
        summary.push(match outcome {
            Ok(Outcome::Ran) => format!("{name}: ok"),
            Ok(Outcome::NotPlaced(Unmet {
                why,
                reported: true,
            })) => format!("{name}: not placed on this node ({why})"),
            Ok(Outcome::NotPlaced(Unmet {
                why,
                reported: false,
            })) => {
                ok = false;
                format!("{name}: FAILED: a constraint names an attribute the plugin never reports: {why}")
            }
            Err(e) => {
                ok = false;
                format!("{name}: FAILED: {e}")
            }
        });
    }
    println!("\nexamples:");
    for line in &summary {
        println!("  {line}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn read_job(job_path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(job_path)
        .map_err(|e| format!("reading {}: {e}", job_path.display()))?;
    hcl::from_str(&text).map_err(|e| format!("parsing {}: {e}", job_path.display()))
}

async fn run(job_path: &Path, check_greeting: bool) -> Result<Outcome, String> {
    let job = read_job(job_path)?;
    let (job_name, tasks) = elide_tasks(&job)?;
    if tasks.is_empty() {
        return Err(format!(
            "{} has no task with driver = \"elide\"",
            job_path.display()
        ));
    }
    println!(
        "job {job_name:?}: {} elide task(s) from {}",
        tasks.len(),
        job_path.display()
    );

    let root = support::short_tempdir();
    let auto = AutoDaemon::new(root.path());
    let plugin = Plugin::launch(&plugin_config(&auto.socket, Some(&auto))).await;
    let mut fingerprints = plugin.client.fingerprint().await;
    let node = support::fingerprint_until(&mut fingerprints, support::DEADLINE, |m| {
        m.health == HealthState::Healthy as i32
    })
    .await;
    // Nomad's own mark of a detected, healthy driver.
    let mut attributes = node.attributes.clone();
    attributes.insert(
        "driver.elide".into(),
        Attribute {
            value: Some(AttrValue::StringVal("1".into())),
            ..Default::default()
        },
    );
    if let Some(unmet) = unmet_constraint(&job, &attributes) {
        auto.kill().await;
        return Ok(Outcome::NotPlaced(unmet));
    }
    let data = root.path().join("data");
    let alloc = Alloc::new(&data);

    let mut running = Vec::new();
    for jt in &tasks {
        let mut task = alloc.task(&jt.name);
        if let Some(mb) = jt.memory_mb {
            task.memory_mb = mb;
        }
        for (k, v) in &jt.env {
            task.extra_env.insert(
                k.clone(),
                v.as_str().map_or_else(|| v.to_string(), str::to_string),
            );
        }
        let env = task.env();
        for (dest, data) in &jt.templates {
            let path = task.task_dir.join(dest);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("template {dest}: {e}"))?;
            }
            std::fs::write(&path, interpolate_str(data, &env))
                .map_err(|e| format!("template {dest}: {e}"))?;
        }
        let config = interpolate(&jt.config, &env);
        plugin
            .start_json(&task, config)
            .await
            .map_err(|s| format!("StartTask {}: {}", jt.name, s.message()))?;
        println!("task {:?} started ({})", jt.name, task.id);
        running.push((jt, task));
    }

    let service = job_type(&job) == "service";
    if service {
        println!("service job: Ctrl-C stops it");
    }
    let mut failed = false;
    for (jt, task) in &running {
        let wait = plugin.wait_within(&task.id, Duration::from_secs(24 * 3600));
        let result = if service {
            tokio::select! {
                r = wait => r,
                _ = tokio::signal::ctrl_c() => {
                    println!("stopping {:?} with {} (timeout {:?})", jt.name, jt.kill_signal, jt.kill_timeout);
                    plugin.stop(&task.id, &jt.kill_signal, jt.kill_timeout).await
                        .map_err(|s| format!("StopTask {}: {}", jt.name, s.message()))?;
                    plugin.wait(&task.id).await
                }
            }
        } else {
            wait.await
        };
        let stdout = task.stdout.wait_eof().await;
        let stderr = task.stderr.wait_eof().await;
        print_prefixed(&jt.name, "stdout", &stdout);
        print_prefixed(&jt.name, "stderr", &stderr);
        let r = result.result.unwrap_or_default();
        println!(
            "task {:?} exited: code {} signal {} oom {}{}",
            jt.name,
            r.exit_code,
            r.signal,
            r.oom_killed,
            if result.err.is_empty() {
                String::new()
            } else {
                format!(" ({})", result.err)
            }
        );
        failed |= r.exit_code != 0 || !result.err.is_empty();
        let _ = plugin.destroy(&task.id, true).await;
        if check_greeting && !stdout.contains("hello from python") {
            return Err(format!(
                "expected the hello-python greeting in stdout, got {stdout:?}"
            ));
        }
    }
    auto.kill().await;
    if failed {
        Err("a task failed".into())
    } else {
        Ok(Outcome::Ran)
    }
}

/// The first `constraint` anywhere in the job that this node's driver attributes fail, as Nomad
/// would judge it; constraints on attributes the driver does not report are named and skipped.
fn unmet_constraint(job: &Value, attributes: &HashMap<String, Attribute>) -> Option<Unmet> {
    let mut found = Vec::new();
    collect_constraints(job, &mut found);
    for c in found {
        let attribute = c.get("attribute").and_then(Value::as_str).unwrap_or("");
        let operator = c.get("operator").and_then(Value::as_str).unwrap_or("=");
        let want = c.get("value").map(scalar_text).unwrap_or_default();
        let key = attribute
            .strip_prefix("${attr.")
            .and_then(|k| k.strip_suffix('}'))
            .filter(|k| *k == "driver.elide" || k.starts_with("driver.elide."));
        let (Some(key), "=" | "==" | "is" | "!=" | "not" | "is_set" | "is_not_set") =
            (key, operator)
        else {
            println!("constraint {attribute} {operator} {want:?}: not checked here");
            continue;
        };
        let have = attributes.get(key).and_then(attribute_text);
        let holds = match operator {
            "!=" | "not" => have.as_deref() != Some(want.as_str()),
            "is_set" => have.is_some(),
            "is_not_set" => have.is_none(),
            _ => have.as_deref() == Some(want.as_str()),
        };
        if !holds {
            let shown = have
                .as_ref()
                .map_or_else(|| "not set".to_string(), |h| format!("{h:?}"));
            return Some(Unmet {
                why: format!(
                    "constraint {attribute} {operator} {want:?} fails: this node's {key} is {shown}"
                ),
                reported: have.is_some(),
            });
        }
    }
    None
}

fn collect_constraints<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "constraint" {
                    out.extend(one_or_many(Some(x)));
                } else {
                    collect_constraints(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_constraints(x, out)),
        _ => {}
    }
}

fn scalar_text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn attribute_text(a: &Attribute) -> Option<String> {
    Some(match a.value.as_ref()? {
        AttrValue::StringVal(s) => s.clone(),
        AttrValue::BoolVal(b) => b.to_string(),
        AttrValue::IntVal(i) => i.to_string(),
        AttrValue::FloatVal(f) => f.to_string(),
    })
}

fn print_prefixed(task: &str, stream: &str, text: &str) {
    for line in text.lines() {
        println!("[{task} {stream}] {line}");
    }
}

fn job_type(job: &Value) -> String {
    job.get("job")
        .and_then(Value::as_object)
        .and_then(|jobs| jobs.values().next())
        .and_then(|j| j.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("service")
        .to_string()
}

/// The job's name and its `driver = "elide"` tasks. hcl-rs maps labelled blocks to objects
/// keyed by label: `{"job": {"<name>": {"group": {"<g>": {"task": {"<t>": {...}}}}}}}`.
fn elide_tasks(job: &Value) -> Result<(String, Vec<JobTask>), String> {
    let jobs = job
        .get("job")
        .and_then(Value::as_object)
        .ok_or("no `job \"<name>\" { ... }` block")?;
    let (name, body) = jobs.iter().next().ok_or("empty job block")?;
    let mut out = Vec::new();
    let groups = body.get("group").and_then(Value::as_object);
    for group in groups.into_iter().flat_map(|g| g.values()) {
        let tasks = group.get("task").and_then(Value::as_object);
        for (tname, t) in tasks.into_iter().flatten() {
            if t.get("driver").and_then(Value::as_str) != Some("elide") {
                continue;
            }
            let mut config = t.get("config").cloned().unwrap_or(Value::Null);
            // Nomad hands blocks to the driver as a list of one object.
            if let Some(opts) = config.get_mut("elide_opts")
                && opts.is_object()
            {
                *opts = Value::Array(vec![opts.take()]);
            }
            let templates = one_or_many(t.get("template"))
                .filter_map(|tp| {
                    Some((
                        tp.get("destination")?.as_str()?.to_string(),
                        tp.get("data")?.as_str()?.to_string(),
                    ))
                })
                .collect();
            let kill_timeout = t
                .get("kill_timeout")
                .and_then(Value::as_str)
                .map(|s| humantime::parse_duration(s).map_err(|e| format!("kill_timeout: {e}")))
                .transpose()?
                .unwrap_or(Duration::from_secs(5));
            out.push(JobTask {
                name: tname.clone(),
                config,
                templates,
                env: t
                    .get("env")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
                memory_mb: t.pointer("/resources/memory").and_then(Value::as_i64),
                kill_signal: t
                    .get("kill_signal")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                kill_timeout,
            });
        }
    }
    Ok((name.clone(), out))
}

fn one_or_many(v: Option<&Value>) -> Box<dyn Iterator<Item = &Value> + '_> {
    match v {
        Some(Value::Array(items)) => Box::new(items.iter()),
        Some(other) => Box::new(std::iter::once(other)),
        None => Box::new(std::iter::empty()),
    }
}

/// Replaces `${NAME}` and `${env.NAME}` with the task environment, as Nomad interpolates job
/// config before the driver sees it.
fn interpolate(v: &Value, env: &std::collections::HashMap<String, String>) -> Value {
    match v {
        Value::String(s) => Value::String(interpolate_str(s, env)),
        Value::Array(a) => Value::Array(a.iter().map(|x| interpolate(x, env)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), interpolate(x, env)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn interpolate_str(s: &str, env: &std::collections::HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let key = after[..end].trim();
                let key = key.strip_prefix("env.").unwrap_or(key);
                match env.get(key) {
                    Some(val) => out.push_str(val),
                    None if key == "NOMAD_ALLOC_INDEX" => out.push('0'),
                    None => out.push_str(&rest[start..start + 2 + end + 1]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}
