"""``ldmgraph serve``: ComfyUI's HTTP and websocket protocol on a persistent SQLite queue.

Modules: ``store`` (SQLite), ``worker`` (the job runner and its supervisor), ``hub`` (websocket
clients), ``protocol`` (ComfyUI's shapes), ``api`` and ``frontend`` (routes), ``security``
(token, origin, body size), ``workflows`` (saved workflows), ``app`` (the ASGI application),
``cli`` (the subcommand). Needs the ``server`` extra (FastAPI, uvicorn); the editor needs ``ui``.
"""
