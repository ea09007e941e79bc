"""Kubernetes manifests of an experiment (``render``) and the CLI commands that use them.

Importing this package loads neither the kubernetes client nor torch; the cluster code lives in
``alignfake.executors.kubernetes`` and is imported by the commands that talk to a cluster.
"""

from __future__ import annotations

from .naming import dns_name, job_name
from .render import Manifests, StageJob, dump_yaml, render_experiment, write_files

__all__ = ["Manifests", "StageJob", "dns_name", "dump_yaml", "job_name", "render_experiment", "write_files"]
