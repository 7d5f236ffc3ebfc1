"""`fcclass serve`: a trained run as an HTTP service (Starlette on uvicorn) with dynamic batching, and a page to drop
images on. ``model``: the served model and its life; ``batching``: the inference thread; ``uploads``: what a request
holds and its 4xx errors; ``app``: the routes; ``server``: sockets, uvicorn and signals."""
