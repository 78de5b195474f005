# A batch job in TypeScript: the daemon strips the types, node runs the result.
job "hello-ts" {
  datacenters = ["dc1"]
  type        = "batch"

  group "hello" {
    task "hello" {
      driver = "elide"

      config {
        language = "typescript"
        code     = <<-TS
          interface Greeting { who: string; times: number }
          const g: Greeting = { who: process.env.NOMAD_TASK_NAME ?? "world", times: 2 };
          for (let i: number = 0; i < g.times; i++) console.log(`hello ${g.who} (${i + 1})`);
        TS
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
