# A batch job that prints a greeting from JavaScript (node).
job "hello-js" {
  datacenters = ["dc1"]
  type        = "batch"

  group "hello" {
    task "hello" {
      driver = "elide"

      config {
        language = "javascript"
        code     = "console.log(`hello from node ${process.version} in ${process.env.NOMAD_TASK_NAME}`)"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
