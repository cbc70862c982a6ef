"""LoRA adapters across services: the workers' admin calls, the gateway's catalog."""
