# Three languages in one group: each task is a separate execution in the node daemon.
job "polyglot" {
  datacenters = ["dc1"]
  type        = "batch"

  group "langs" {
    task "py" {
      driver = "elide"
      config {
        language = "python"
        code     = "print('python says hi')"
      }
      resources {
        memory = 32
      }
    }

    task "js" {
      driver = "elide"
      config {
        language = "javascript"
        code     = "console.log('javascript says hi')"
      }
      resources {
        memory = 32
      }
    }

    task "ts" {
      driver = "elide"
      config {
        language = "typescript"
        code     = "const n: number = 42; console.log(`typescript says ${n}`)"
        elide_opts {
          timeout = "30s"
        }
      }
      resources {
        memory = 32
      }
    }
  }
}
