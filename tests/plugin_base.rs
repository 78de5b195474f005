//! BasePlugin over the real binary: identity, config schema, SetConfig and every bad input.

mod support;

use elide_task_driver::proto::hashicorp::nomad::plugins::shared::hclspec::{Spec, spec::Block};
use rmpv::Value as V;
use serde_json::json;
use support::fake_daemon::FakeDaemon;
use support::{NomadClient, cty, short_tempdir};

fn map(entries: Vec<(&str, V)>) -> V {
    V::Map(entries.into_iter().map(|(k, v)| (V::from(k), v)).collect())
}

async fn assert_invalid(c: &NomadClient, bytes: Vec<u8>, agent: bool, needle: &str) {
    let err = c
        .set_config_raw(bytes, agent)
        .await
        .expect_err("config must be rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(needle),
        "want {needle:?} in {:?}",
        err.message()
    );
    // And the plugin keeps serving.
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn plugin_info_identifies_the_elide_driver() {
    let c = NomadClient::launch().await;
    let info = c.plugin_info().await;
    assert_eq!(info.r#type, 2, "DRIVER");
    assert_eq!(info.name, "elide");
    assert_eq!(info.plugin_api_versions, vec!["v0.1.0".to_string()]);
    assert_eq!(info.plugin_version, env!("CARGO_PKG_VERSION"));
}

fn attrs(spec: &Spec) -> &std::collections::HashMap<String, Spec> {
    match spec.block.as_ref().unwrap() {
        Block::Object(o) => &o.attributes,
        other => panic!("expected object, got {other:?}"),
    }
}

/// Unwraps Default(primary, Literal) and returns (primary, literal text).
fn defaulted(spec: &Spec) -> (&Spec, &str) {
    match spec.block.as_ref().unwrap() {
        Block::Default(d) => match d.default.as_ref().unwrap().block.as_ref().unwrap() {
            Block::Literal(l) => (d.primary.as_ref().unwrap(), l.value.as_str()),
            other => panic!("default must be a literal: {other:?}"),
        },
        other => panic!("expected default, got {other:?}"),
    }
}

#[tokio::test]
async fn config_schema_has_seed_names_blocks_and_valid_literals() {
    let c = NomadClient::launch().await;
    let spec = c.config_schema().await;
    let top = attrs(&spec);
    let mut keys: Vec<_> = top.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "daemon",
            "daemon_socket",
            "dangling_executions",
            "dynamic_workload_users",
            "fingerprint_period",
            "session_config"
        ]
    );
    // Nested groups are blocks (HCL1 agent config), with literal defaults.
    for name in ["session_config", "daemon", "dangling_executions"] {
        let (primary, lit) = defaulted(&top[name]);
        match primary.block.as_ref().unwrap() {
            Block::BlockValue(b) => assert_eq!(b.name, name),
            other => panic!("{name} must be a Block spec, got {other:?}"),
        }
        support::hcl::parse(lit).unwrap_or_else(|e| panic!("{name} literal {lit:?}: {e}"));
    }
    let (sock, lit) = defaulted(&top["daemon_socket"]);
    match sock.block.as_ref().unwrap() {
        Block::Attr(a) => assert_eq!(
            (a.name.as_str(), a.r#type.as_str()),
            ("daemon_socket", "string")
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(lit, "\"/run/elide/daemon.sock\"");
    // Every Attr under a Default carries its name (Nomad fails "Missing name" otherwise), and
    // every literal parses as HCL: walk the whole tree.
    fn walk(s: &Spec, under_default: bool) {
        match s.block.as_ref().unwrap() {
            Block::Object(o) => o.attributes.values().for_each(|v| walk(v, false)),
            Block::Attr(a) => {
                assert!(
                    !under_default || !a.name.is_empty(),
                    "unnamed attr under Default"
                );
                assert!(!a.r#type.is_empty());
            }
            Block::BlockValue(b) => walk(b.nested.as_ref().unwrap(), false),
            Block::Default(d) => {
                walk(d.primary.as_ref().unwrap(), true);
                walk(d.default.as_ref().unwrap(), true);
            }
            Block::Literal(l) => {
                support::hcl::parse(&l.value)
                    .unwrap_or_else(|e| panic!("literal {:?}: {e}", l.value));
            }
            other => panic!("unexpected spec kind {other:?}"),
        }
    }
    walk(&spec, false);
    // The defaults Nomad would compute for an empty block.
    let defaults = cty::eval(&spec, Some(&json!({}))).unwrap();
    assert_eq!(defaults["daemon_socket"], "/run/elide/daemon.sock");
    assert_eq!(defaults["fingerprint_period"], "30s");
    assert_eq!(defaults["session_config"]["context_pool_size"], 2);
    assert_eq!(
        defaults["session_config"]["enabled_languages"],
        json!(["python", "javascript", "typescript"])
    );
    assert_eq!(
        defaults["session_config"]["enabled_intrinsics"],
        json!(["env", "io", "net"])
    );
    assert_eq!(defaults["daemon"]["auto_start"], true);
    assert_eq!(defaults["daemon"]["start_timeout"], "10s");
}

#[tokio::test]
async fn set_config_accepts_defaults_and_a_full_hcl1_style_config() {
    let c = NomadClient::launch().await;
    c.set_config(json!({}), false)
        .await
        .expect("empty config block");
    c.set_config(
        json!({
            "daemon_socket": "/tmp/elide-test.sock",
            "fingerprint_period": "5s",
            // HCL1 delivers blocks as a list of one object.
            "session_config": [{ "context_pool_size": 4, "enabled_languages": ["py", "ts"], "memory_limit_mb": 0.5e3, "enable_ai": true }],
            "daemon": [{ "auto_start": false, "args": ["--verbose"], "start_timeout": "1m" }],
        }),
        false,
    )
    .await
    .expect("full config");
    // Numbers the way cty may send them: uint8, decimal string.
    let bytes = cty::encode(&map(vec![(
        "session_config",
        map(vec![
            ("context_pool_size", V::from(200u8)),
            ("memory_limit_mb", V::from("64")),
        ]),
    )]));
    c.set_config_raw(bytes, false)
        .await
        .expect("uint8 and decimal string numbers");
}

#[tokio::test]
async fn truncated_or_garbage_msgpack_is_rejected() {
    let c = NomadClient::launch().await;
    let spec = c.config_schema().await;
    let good = cty::encode_config(&spec, &json!({})).unwrap();
    assert_invalid(&c, good[..good.len() / 2].to_vec(), false, "truncated").await;
    assert_invalid(&c, b"\x93\xff\xcf".to_vec(), false, "not valid msgpack").await;
    assert_invalid(&c, b"hello world".to_vec(), true, "trailing bytes").await;
    assert_invalid(&c, vec![0xd4, 0x00, 0x00], false, "unknown").await;
    assert_invalid(
        &c,
        cty::encode(&V::from("just a string")),
        false,
        "expected object",
    )
    .await;
}

#[tokio::test]
async fn wrong_types_for_every_config_field_are_named() {
    let c = NomadClient::launch().await;
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
                map(vec![("context_pool_size", V::from("two"))]),
            )]),
            "session_config.context_pool_size: expected a number, got string \"two\"",
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
                map(vec![("enabled_languages", V::Array(vec![V::from(1)]))]),
            )]),
            "session_config.enabled_languages[0]: expected string",
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
            map(vec![("daemon", map(vec![("auto_start", V::from(1))]))]),
            "daemon.auto_start: expected bool",
        ),
        (
            map(vec![("dynamic_workload_users", V::from("yes"))]),
            "dynamic_workload_users: expected bool",
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
        (
            map(vec![("dangling_executions", V::from(1))]),
            "dangling_executions: expected object",
        ),
        (
            map(vec![(
                "dangling_executions",
                map(vec![("enabled", V::from("yes"))]),
            )]),
            "dangling_executions.enabled: expected bool",
        ),
        (
            map(vec![(
                "dangling_executions",
                map(vec![("period", V::from(300))]),
            )]),
            "dangling_executions.period: expected string",
        ),
        (
            map(vec![(
                "dangling_executions",
                map(vec![("creation_grace", V::Array(vec![]))]),
            )]),
            "dangling_executions.creation_grace: expected string",
        ),
        (
            map(vec![("no_such_field", V::from(1))]),
            "unknown attribute \"no_such_field\"",
        ),
    ];
    for (v, needle) in cases {
        assert_invalid(&c, cty::encode(&v), false, needle).await;
    }
}

#[tokio::test]
async fn unknown_language_is_rejected_by_name() {
    let c = NomadClient::launch().await;
    let err = c
        .set_config(
            json!({"session_config": {"enabled_languages": ["python", "rust"]}}),
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("session_config.enabled_languages: unknown language \"rust\""),
        "{}",
        err.message()
    );
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn negative_pool_size_is_rejected() {
    let c = NomadClient::launch().await;
    for bad in [json!(-1), json!(-300)] {
        let err = c
            .set_config(json!({"session_config": {"context_pool_size": bad}}), false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message()
                .contains("session_config.context_pool_size: must be 0 (no warm workers) or more"),
            "{}",
            err.message()
        );
    }
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn relative_daemon_socket_is_rejected() {
    let c = NomadClient::launch().await;
    let err = c
        .set_config(json!({"daemon_socket": "run/elide.sock"}), true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("daemon_socket: must be an absolute path, got \"run/elide.sock\""),
        "{}",
        err.message()
    );
    assert_eq!(c.plugin_info().await.name, "elide");
}

#[tokio::test]
async fn rejected_config_is_logged_at_error_level() {
    let c = NomadClient::launch().await;
    let _ = c
        .set_config(json!({"daemon_socket": "relative"}), false)
        .await;
    let e = c
        .process
        .wait_log("rejected plugin config", support::DEADLINE)
        .expect("log line");
    assert_eq!(e["@level"], "error");
    assert!(e["error"].as_str().unwrap().contains("daemon_socket"));
}

#[tokio::test]
async fn validation_launch_creates_no_session_but_agent_launch_does() {
    let dir = short_tempdir();
    let socket = dir.path().join("d.sock");
    let daemon = FakeDaemon::start(&socket).await;
    let c = NomadClient::launch().await;
    let cfg = json!({"daemon_socket": socket.display().to_string(), "session_config": {"context_pool_size": 3, "enabled_languages": ["js"]}, "daemon": {"auto_start": false}});
    c.set_config(cfg.clone(), false)
        .await
        .expect("validation SetConfig");
    assert!(
        daemon.create_session_calls().is_empty(),
        "validation launch must do nothing irreversible"
    );
    c.set_config(cfg, true).await.expect("agent SetConfig");
    let calls = daemon.create_session_calls();
    assert_eq!(calls.len(), 1);
    let req = &calls[0];
    assert!(
        req.session_id.starts_with("nomad-") && req.session_id.len() > 20,
        "{}",
        req.session_id
    );
    assert_eq!(
        req.owner,
        format!("nomad-plugin pid {}", c.process.child.id())
    );
    let sc = req.config.as_ref().unwrap();
    assert_eq!(sc.context_pool_size, 3);
    assert_eq!(sc.enabled_languages, vec!["javascript".to_string()]);
    assert_eq!(sc.enabled_intrinsics, vec!["env", "io", "net"]);
    daemon.stop().await;
}

#[tokio::test]
async fn agent_set_config_succeeds_without_a_daemon() {
    let dir = short_tempdir();
    let c = NomadClient::launch().await;
    c.set_config(
        json!({"daemon_socket": dir.path().join("absent.sock").display().to_string(), "daemon": {"auto_start": false}}),
        true,
    )
    .await
    .expect("an absent daemon is reported by the fingerprint, not by SetConfig");
    c.process
        .wait_log("not reachable at SetConfig", support::DEADLINE)
        .expect("warning logged");
}

/// The agent config shipped in the repository (`nomad-agent.hcl`, which the README says lists
/// every option) names every option of the schema, nested blocks included, and the plugin
/// accepts it as the Nomad client would send it.
#[tokio::test]
async fn the_shipped_agent_config_lists_every_option_and_is_accepted() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nomad-agent.hcl"))
        .expect("nomad-agent.hcl");
    let agent: serde_json::Value = hcl::from_str(&text).expect("nomad-agent.hcl parses");
    let config = agent["plugin"]["elide"]["config"].clone();
    assert!(
        config.is_object(),
        "no plugin \"elide\" config block: {agent}"
    );
    let c = NomadClient::launch().await;
    let spec = c.config_schema().await;
    // An option without a default may be shown commented out (`# path = ...`).
    let commented = |name: &str| text.contains(&format!("# {name} "));
    for (name, attr) in attrs(&spec) {
        assert!(
            config.get(name).is_some() || commented(name),
            "nomad-agent.hcl lacks {name}"
        );
        let (primary, _) = match attr.block.as_ref().unwrap() {
            Block::Default(_) => defaulted(attr),
            _ => (attr, ""),
        };
        if let Some(Block::BlockValue(b)) = primary.block.as_ref() {
            for inner in attrs(b.nested.as_ref().unwrap()).keys() {
                assert!(
                    config[name].get(inner).is_some() || commented(inner),
                    "nomad-agent.hcl lacks {name}.{inner}"
                );
            }
        }
    }
    c.set_config(config, false)
        .await
        .expect("the plugin accepts nomad-agent.hcl's config");
}
