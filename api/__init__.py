"""HTTP: one module per resource (`speakers`, `jobs`, `model_exports`, `openai_compat` with its
schemas, and /generate's, in `generation_models`, `health`, the `page`), what the routers share (`deps`), the ASGI
middleware (`middleware`) and the server that runs the app under `python main.py` (`server`).

Endpoints validate through models.py, call one function of the layers below and answer a schema.
Nothing below imports this package; main.py includes its routers.
"""
