"""stoker's HTTP gateway: the OpenAI and Ollama APIs and a live status page, as a client of the
supervisor (the `http` extra: Starlette and uvicorn)."""
