"""The HTTP server in front of the batching ``Engine``: one module per protocol over one shared engine call.

- ``chat_completions.py``: OpenAI's chat completions (request checks, whole answers and streamed chunks, usage);
- ``tool_calls.py``: chat completions' tools, tool choice, earlier calls and results, and the answer's calls;
- ``responses.py``: OpenAI's Responses API; ``messages.py``: Anthropic's Messages API; ``completions.py``:
  OpenAI's completions of a plain prompt;
- ``fields.py``: reading a body's fields alike for every protocol (checks, sampling settings, unknown fields);
- ``metrics.py``: the Prometheus metrics of ``/metrics``;
- ``serving.py``: what every protocol shares: the served model and its settings, a request submitted to the
  engine, and the events of its ``Stream`` as the client waits for them;
- ``errors.py``: errors with their HTTP status;
- ``app.py``: the FastAPI application (key check, bounded bodies, routes);
- ``lifecycle.py``: the process: loading, warm-up, uvicorn, Ctrl-C, several processes.

Needs FastAPI, uvicorn and prometheus-client (``pip install 'mlx-eve[server]'``); the command is
``mlx_eve.commands.server``.
"""
