"""Remote inference: the inference stage on a Ray Serve application, shared by capture nodes.

- ``monitord serve -c CONFIG``, or Ray's own tooling with the application builder ``monitord.serve:app``
  (``serve run monitord.serve:app config=/etc/monitord/serve.yaml``, a ``serve deploy`` file, a
  KubeRay RayService).
- A capture node's ``inference:`` section sends some of its models there (``client.RemoteModel``);
  the wire format is in ``wire``.

Only ``deployment`` imports Ray; a capture node needs nothing beyond the base install.
"""

from __future__ import annotations

from typing import Any


def app(args: dict[str, Any]):
    """Ray Serve application builder. ``args``: ``config`` (path to a monitord config, required), and
    optionally ``replicas``, ``gpus_per_replica``, ``cpus_per_replica`` over its ``serve:`` section."""
    from pydantic import BaseModel, ConfigDict, Field

    from monitord.serve.deployment import build_app

    class AppArgs(BaseModel):
        model_config = ConfigDict(extra="forbid")
        config: str
        replicas: int | None = Field(None, ge=1)
        gpus_per_replica: float | None = Field(None, ge=0)
        cpus_per_replica: float | None = Field(None, ge=0)

    parsed = AppArgs.model_validate(dict(args))
    return build_app(parsed.config, parsed.replicas, parsed.gpus_per_replica, parsed.cpus_per_replica)


__all__ = ["app"]
