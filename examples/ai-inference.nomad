# AI inference through Elide's built-in AI intrinsics.
#
# NEEDS THE ELIDE BACKEND: this job only runs on nodes whose plugin config has
# `session_config { enable_ai = true }` and whose daemon is configured with a local
# `elide` binary that provides the AI intrinsic. The stock python3/node backends do not
# provide it, so such a node reports `driver.elide.ai = "false"` and the constraint below
# keeps the job off it (Nomad leaves it pending; `make dev JOB=examples/ai-inference.nomad`
# says "not placed" and why) instead of running a snippet that cannot import `elide.ai`.
job "ai-inference" {
  datacenters = ["dc1"]
  type        = "batch"

  constraint {
    attribute = "${attr.driver.elide.ai}"
    value     = "true"
  }

  group "infer" {
    task "summarise" {
      driver = "elide"

      config {
        language = "python"
        code     = <<-PY
          import elide.ai as ai   # provided by the Elide runtime only
          print(ai.complete("Summarise Nomad in one sentence."))
        PY
      }

      resources {
        cpu    = 1000
        memory = 2048
      }
    }
  }
}
