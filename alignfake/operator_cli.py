"""``alignfake operator``: run the Experiment operator (``alignfake/operator.py``) in this process.

Thin, like the rest of the CLI: check the options, build an ``OperatorConfig``, hand over to kopf. kopf (and the
operator's handlers) are imported inside the command, so ``import alignfake.cli`` and ``alignfake --help`` never
load them.
"""

from __future__ import annotations

import click

from .cliutil import handle_errors
from .errors import MissingExtraError
from .k8s.commands import context_option, kubeconfig_option


@click.command("operator")
@click.option("-n", "--namespace", "namespaces", multiple=True, metavar="NAME",
              help="Serve the Experiments of this namespace only (repeatable; default: every namespace).")
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.1), default=30.0, show_default=True, metavar="SECONDS",
              help="Seconds between two looks at an unfinished experiment's Jobs and store (a finished Job is "
                   "noticed at once).")
@click.option("--liveness", metavar="URL", default=None,
              help="Serve kopf's liveness probe at URL, e.g. http://0.0.0.0:8080/healthz.")
@click.option("-v", "--verbose", is_flag=True, help="Log every handler call.")
@context_option
@kubeconfig_option
@handle_errors
def operator(namespaces: tuple[str, ...], poll_s: float, liveness: str | None, verbose: bool,
             kube_context: str | None, kubeconfig: str | None) -> None:
    """Run the operator: every Experiment custom resource (kubectl apply -f FILE) runs stage after stage.

    Validates each Experiment, applies the Jobs of its first unfinished stage, applies the next stage when the
    store shows the previous one committed, and writes the progress to the Experiment's status. Deleting an
    Experiment deletes its Jobs and keeps the store. Runs until interrupted (SIGINT, SIGTERM)."""
    try:
        import kopf
    except ImportError:
        raise MissingExtraError("kopf", "operator") from None
    from .executors.kubernetes import connect
    from .operator import OperatorConfig  # importing it registers the handlers with kopf

    config = OperatorConfig(poll_s=poll_s, namespaces=tuple(namespaces), kubeconfig=kubeconfig,
                            context=kube_context, liveness=liveness)
    connect(context=config.context, kubeconfig=config.kubeconfig)  # a configuration error ends here, in one line
    kopf.configure(verbose=verbose)
    kopf.run(clusterwide=not config.namespaces, namespaces=config.namespaces, liveness_endpoint=config.liveness,
             standalone=True, memo=kopf.Memo(config=config))
