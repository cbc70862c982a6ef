# Rendered by `python -m deploy.render` from deploy/services.toml: edit that, not this.
# Needs: Nomad >= 1.5 with the docker driver, host volumes "kvrelay-cache" and
# "kvrelay-models" on every client, the NVIDIA device plugin, and the secrets variable with every key
# (api_key: may be empty; a task fails to start while a key is missing):
#   nomad var put nomad/jobs/kvrelay api_key=... internal_token=...
# Run:   nomad job run -var image=REGISTRY/kvrelay:cpu -var cuda_image=REGISTRY/kvrelay:cuda kvrelay-gpu.nomad.hcl

variable "image" {
  type        = string
  default     = "kvrelay:cpu"
  description = "image of the kvrelay services (built from deploy/docker/Dockerfile.cpu)"
}

variable "cuda_image" {
  type        = string
  default     = "kvrelay:cuda"
  description = "image of the GPU workers (built from deploy/docker/Dockerfile.cuda)"
}

variable "model_path" {
  type        = string
  default     = "/opt/kvrelay/models/SmolLM2-135M-Instruct.gguf"
  description = "model inside the containers: the default ships in the image; mount others under /models"
}

variable "cache_dir" {
  type        = string
  default     = "/var/cache/kvrelay"
  description = "converted models and the HF cache, a volume shared by the services of a host"
}

variable "kv_cache_mb" {
  type        = string
  default     = "2048"
  description = "KV pool of each worker, in MiB"
}

variable "torch_threads" {
  type        = string
  default     = "4"
  description = "torch threads per worker"
}

variable "log_level" {
  type        = string
  default     = "info"
  description = "debug, info, warning or error"
}

variable "kv_transport" {
  type        = string
  default     = "zmq"
  description = "how KV goes from prefill to decode: zmq or nixl (the same on every worker)"
}

variable "tool_call_parser" {
  type        = string
  default     = ""
  description = "hermes, qwen25 or llama3 (empty: read off the chat template)"
}

variable "reasoning_parser" {
  type        = string
  default     = ""
  description = "deepseek-r1 or qwen3: <think> blocks as reasoning_content (empty: none)"
}

variable "prefill_count" {
  type        = number
  default     = 2
  description = "number of prefill instances"
}

variable "decode_count" {
  type        = number
  default     = 2
  description = "number of decode instances"
}

variable "gateway_count" {
  type        = number
  default     = 1
  description = "number of gateway instances"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

job "kvrelay" {
  datacenters = var.datacenters
  type        = "service"

  update {
    # One instance at a time; a new version must pass its checks or it is undone.
    max_parallel      = 1
    health_check      = "checks"
    min_healthy_time  = "30s"
    healthy_deadline  = "900s"
    progress_deadline = "1200s"
    auto_revert       = true
  }

  group "redis" {
    count = 1

    network {
      port "redis" {}
    }

    restart {
      attempts = 3
      interval = "10m"
      delay    = "15s"
      mode     = "delay"
    }

    reschedule {
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "10m"
      unlimited      = true
    }

    service {
      name     = "kvrelay-redis"
      provider = "nomad"
      port     = "redis"
      tags     = ["redis"]

      check {
        type     = "tcp"
        port     = "redis"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit           = 3
          grace           = "10s"
          ignore_warnings = false
        }
      }
    }

    task "redis" {
      driver       = "docker"
      kill_timeout = "20s"

      config {
        image        = "redis:7.2-alpine"
        network_mode = "host"
        command      = "redis-server"
        args         = ["--port", "${NOMAD_PORT_redis}", "--save", "", "--appendonly", "no", "--protected-mode", "no"]
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "prefill" {
    count = var.prefill_count

    network {
      port "grpc" {}
      port "metrics" {}
    }

    restart {
      attempts = 3
      interval = "10m"
      delay    = "15s"
      mode     = "delay"
    }

    reschedule {
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "10m"
      unlimited      = true
    }

    volume "cache" {
      type      = "host"
      source    = "kvrelay-cache"
      read_only = false
    }

    volume "models" {
      type      = "host"
      source    = "kvrelay-models"
      read_only = true
    }

    service {
      name     = "kvrelay-prefill"
      provider = "nomad"
      port     = "grpc"
      tags     = ["prefill"]

      check {
        type     = "tcp"
        port     = "grpc"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit           = 3
          grace           = "600s"
          ignore_warnings = false
        }
      }
    }

    service {
      name     = "kvrelay-prefill-metrics"
      provider = "nomad"
      port     = "metrics"
      tags     = ["prefill", "prometheus"]
    }

    task "prefill" {
      driver       = "docker"
      kill_timeout = "20s"

      config {
        image        = var.cuda_image
        network_mode = "host"
        args         = ["prefill"]
      }

      env {
        KVRELAY_HOST           = "0.0.0.0"
        KVRELAY_MODEL_PATH     = var.model_path
        KVRELAY_LOG_LEVEL      = var.log_level
        KVRELAY_CACHE_DIR      = var.cache_dir
        HF_HOME                = "${var.cache_dir}/hf"
        KVRELAY_PORT           = "${NOMAD_PORT_grpc}"
        KVRELAY_ADVERTISE_HOST = "${NOMAD_IP_grpc}"
        KVRELAY_WORKER_ID      = "${NOMAD_GROUP_NAME}-${NOMAD_ALLOC_INDEX}"
        KVRELAY_METRICS_PORT   = "${NOMAD_PORT_metrics}"
        KVRELAY_KV_CACHE_MB    = var.kv_cache_mb
        KVRELAY_NUM_THREADS    = var.torch_threads
        KVRELAY_KV_TRANSPORT   = var.kv_transport
        KVRELAY_DTYPE          = "bfloat16"
      }

      template {
        # Addresses from Nomad's registry and secrets: a change restarts the task.
        data                 = <<-EOT
          KVRELAY_REDIS_URL=redis://{{ range $i, $s := nomadService "kvrelay-redis" }}{{ if $i }},{{ end }}{{ $s.Address }}:{{ $s.Port }}{{ end }}/0
          KVRELAY_INTERNAL_TOKEN={{ with nomadVar "nomad/jobs/kvrelay" }}{{ .internal_token }}{{ end }}
        EOT
        destination          = "secrets/discovered.env"
        env                  = true
        change_mode          = "restart"
        error_on_missing_key = true
      }

      volume_mount {
        volume      = "cache"
        destination = var.cache_dir
      }

      volume_mount {
        volume      = "models"
        destination = "/models"
        read_only   = true
      }

      resources {
        cpu    = 4000
        memory = 8192

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }

  group "decode" {
    count = var.decode_count

    network {
      port "grpc" {}
      port "kv" {}
      port "metrics" {}
    }

    restart {
      attempts = 3
      interval = "10m"
      delay    = "15s"
      mode     = "delay"
    }

    reschedule {
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "10m"
      unlimited      = true
    }

    volume "cache" {
      type      = "host"
      source    = "kvrelay-cache"
      read_only = false
    }

    volume "models" {
      type      = "host"
      source    = "kvrelay-models"
      read_only = true
    }

    service {
      name     = "kvrelay-decode"
      provider = "nomad"
      port     = "grpc"
      tags     = ["decode"]

      check {
        type     = "tcp"
        port     = "grpc"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit           = 3
          grace           = "600s"
          ignore_warnings = false
        }
      }
    }

    service {
      name     = "kvrelay-decode-metrics"
      provider = "nomad"
      port     = "metrics"
      tags     = ["decode", "prometheus"]
    }

    task "decode" {
      driver       = "docker"
      kill_timeout = "20s"

      config {
        image        = var.cuda_image
        network_mode = "host"
        args         = ["decode"]
      }

      env {
        KVRELAY_HOST           = "0.0.0.0"
        KVRELAY_MODEL_PATH     = var.model_path
        KVRELAY_LOG_LEVEL      = var.log_level
        KVRELAY_CACHE_DIR      = var.cache_dir
        HF_HOME                = "${var.cache_dir}/hf"
        KVRELAY_PORT           = "${NOMAD_PORT_grpc}"
        KVRELAY_KV_PORT        = "${NOMAD_PORT_kv}"
        KVRELAY_ADVERTISE_HOST = "${NOMAD_IP_grpc}"
        KVRELAY_WORKER_ID      = "${NOMAD_GROUP_NAME}-${NOMAD_ALLOC_INDEX}"
        KVRELAY_METRICS_PORT   = "${NOMAD_PORT_metrics}"
        KVRELAY_KV_CACHE_MB    = var.kv_cache_mb
        KVRELAY_NUM_THREADS    = var.torch_threads
        KVRELAY_KV_TRANSPORT   = var.kv_transport
        KVRELAY_DTYPE          = "bfloat16"
      }

      template {
        # Addresses from Nomad's registry and secrets: a change restarts the task.
        data                 = <<-EOT
          KVRELAY_REDIS_URL=redis://{{ range $i, $s := nomadService "kvrelay-redis" }}{{ if $i }},{{ end }}{{ $s.Address }}:{{ $s.Port }}{{ end }}/0
          KVRELAY_INTERNAL_TOKEN={{ with nomadVar "nomad/jobs/kvrelay" }}{{ .internal_token }}{{ end }}
        EOT
        destination          = "secrets/discovered.env"
        env                  = true
        change_mode          = "restart"
        error_on_missing_key = true
      }

      volume_mount {
        volume      = "cache"
        destination = var.cache_dir
      }

      volume_mount {
        volume      = "models"
        destination = "/models"
        read_only   = true
      }

      resources {
        cpu    = 4000
        memory = 8192

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }

  group "gateway" {
    count = var.gateway_count
    # Published ports are static: one instance per client.

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      port "http" {
        static = 30000
      }
    }

    restart {
      attempts = 3
      interval = "10m"
      delay    = "15s"
      mode     = "delay"
    }

    reschedule {
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "10m"
      unlimited      = true
    }

    volume "cache" {
      type      = "host"
      source    = "kvrelay-cache"
      read_only = false
    }

    volume "models" {
      type      = "host"
      source    = "kvrelay-models"
      read_only = true
    }

    service {
      name     = "kvrelay-gateway"
      provider = "nomad"
      port     = "http"
      tags     = ["gateway", "prometheus"]

      check {
        type     = "http"
        path     = "/health"
        port     = "http"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit           = 3
          grace           = "120s"
          ignore_warnings = false
        }
      }
    }

    task "gateway" {
      driver       = "docker"
      kill_timeout = "20s"

      config {
        image        = var.image
        network_mode = "host"
        args         = ["gateway"]
      }

      env {
        KVRELAY_HOST             = "0.0.0.0"
        KVRELAY_MODEL_PATH       = var.model_path
        KVRELAY_LOG_LEVEL        = var.log_level
        KVRELAY_CACHE_DIR        = var.cache_dir
        HF_HOME                  = "${var.cache_dir}/hf"
        KVRELAY_PORT             = "${NOMAD_PORT_http}"
        KVRELAY_TOOL_CALL_PARSER = var.tool_call_parser
        KVRELAY_REASONING_PARSER = var.reasoning_parser
      }

      template {
        # Addresses from Nomad's registry and secrets: a change restarts the task.
        data                 = <<-EOT
          KVRELAY_REDIS_URL=redis://{{ range $i, $s := nomadService "kvrelay-redis" }}{{ if $i }},{{ end }}{{ $s.Address }}:{{ $s.Port }}{{ end }}/0
          KVRELAY_INTERNAL_TOKEN={{ with nomadVar "nomad/jobs/kvrelay" }}{{ .internal_token }}{{ end }}
          KVRELAY_PREFILL_ADDRS={{ range $i, $s := nomadService "kvrelay-prefill" }}{{ if $i }},{{ end }}{{ $s.Address }}:{{ $s.Port }}{{ end }}
          KVRELAY_DECODE_ADDRS={{ range $i, $s := nomadService "kvrelay-decode" }}{{ if $i }},{{ end }}{{ $s.Address }}:{{ $s.Port }}{{ end }}
          KVRELAY_API_KEY={{ with nomadVar "nomad/jobs/kvrelay" }}{{ .api_key }}{{ end }}
        EOT
        destination          = "secrets/discovered.env"
        env                  = true
        change_mode          = "restart"
        error_on_missing_key = true
      }

      volume_mount {
        volume      = "cache"
        destination = var.cache_dir
      }

      volume_mount {
        volume      = "models"
        destination = "/models"
        read_only   = true
      }

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }
}
