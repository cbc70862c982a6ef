"""The OpenAI-compatible HTTP gateway in front of the prefill and decode workers.

Entry points: `server.create_app(GatewayConfig) -> FastAPI` and `server.serve(GatewayConfig)`.
"""
