"""`lasad-serve`: the engine behind HTTP (docs/serving.md).

- `app.py`: the ASGI app (FastAPI): `POST /v1/images/generations` in the OpenAI Images schema plus
  lasad's fields, server-sent events per finished image row, `GET /v1/models`, `/health`,
  `/metrics`; admission control (429 + Retry-After), cancellation on disconnect, drain on
  shutdown. It validates and translates; the engine's slot scheduler does the work.
- `metrics.py`: the Prometheus metrics (prometheus-client).
- `cli.py`: the `lasad-serve` command (uvicorn).
- `ray_app.py`: the same app as a Ray Serve deployment, one engine per replica (one per GPU).

Everything here imports the engine, never the other way round, and needs the `[serve]` extra
(`[ray]` for Ray Serve).
"""
