"""The apps a Flower deployment loads: ``fortify.federated.apps:server_app`` and ``:client_app``.

Both read the run from Flower's run config (the ``[tool.flwr.app.config]`` table of the Flower
app's ``pyproject.toml``, written by ``fortify.federated.deployment.write_flower_app``).
"""

from __future__ import annotations

from fortify.federated.client import make_client_app
from fortify.federated.server import make_server_app

client_app = make_client_app()
server_app = make_server_app()
