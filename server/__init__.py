"""The HTTP API (``clipdex serve``): ``settings`` (what it serves and accepts), ``state`` (the models and
collections it holds, reopened when they change), ``api`` (the FastAPI application: search, images, ask, index
jobs, the guard in front of it) and ``clip_compat`` (clip-retrieval's back-end protocol)."""
