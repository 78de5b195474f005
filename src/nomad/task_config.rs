//! The schema of a job's task `config {}` block for `driver = "elide"`. Nomad validates jobs
//! against it before StartTask, so the driver never sees unknown keys or wrong types.

use super::hclspec::{attr, block, object};
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
