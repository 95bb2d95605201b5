"""The `insession` command line: serve, demo, load, query, and the commands of the other parts."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from insession.datasets.cli import generate, import_
from insession.evaluate.cli import evaluate
from insession.evaluate.prequential import prequential
from insession.train.cli import train, training_data

app = typer.Typer(help="insession: real-time in-session personalisation.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.command("generate")(generate)
app.command("import")(import_)
app.command("train")(train)
app.command("training-data")(training_data)
app.command("evaluate")(evaluate)
app.command("prequential")(prequential)


@app.command()
def serve(
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="Where the log, features and history live."),
    host: str | None = typer.Option(None, "--host", help="Address to bind (default: [server] host, 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="TCP port (default: [server] port, 8000)."),
    config: Path | None = typer.Option(
        None, "--config", help="Server config (TOML/JSON), see docs/configuration.md: API keys, limits, ranking."
    ),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Serve a non-loopback address without API keys (refused otherwise)."
    ),
    log: str | None = typer.Option(
        None, "--log", help="NATS JetStream servers for a replicated log, nats://h1:4222,nats://h2:4222,... "
        "(default: [log] url; none: the embedded log), see docs/cluster.md."
    ),
) -> None:
    """Run the HTTP server on the embedded default (one process). A bad config stops it with the key at fault."""
    import msgspec
    import uvicorn

    from insession.embedded import DataDirError
    from insession.serve.app import create_app, open_handle
    from insession.serve.config import exposure_warning, load_config

    try:
        cfg = load_config(config)
        server = msgspec.structs.replace(
            cfg.server,
            host=cfg.server.host if host is None else host,
            port=cfg.server.port if port is None else port,
            insecure_no_auth=cfg.server.insecure_no_auth or insecure_no_auth,
        )
        cfg = msgspec.structs.replace(cfg, server=server,
                                      log=cfg.log if log is None else msgspec.structs.replace(cfg.log, url=log))
        exposure_warning(cfg)  # a refused exposure stops before the data directory is touched
    except ValueError as e:  # a ConfigError, or a check of the whole config refusing an option's override
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:  # opened here, not in the app's startup: a refused data directory is one line, not a traceback
        handle = open_handle(data_dir, cfg)
    except DataDirError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
    sys.setswitchinterval(server.gil_switch_ms / 1000)
    # The app's shutdown closes the handle (final snapshot and export): uvicorn re-raises SIGTERM after it.
    uvicorn.run(create_app(handle=handle, config=cfg, close_handle=True), host=server.host, port=server.port,
                loop="uvloop", http="httptools", access_log=False, log_level="warning")


@app.command("nats-cluster")
def nats_cluster(
    directory: Path = typer.Option(Path("nats-cluster"), "--dir", help="Configs, stores and logs of the nodes."),
    ports: str = typer.Option("4222,4223,4224", "--ports", help="Client ports, one per node (routes: + 2000, "
                              "monitoring: + 4000)."),
) -> None:
    """Run three NATS JetStream servers on loopback (fsync before every ack) until Ctrl-C; prints the URLs for
    `insession serve --log`. Their data stays in --dir: a second run resumes the same stream."""
    import signal
    import threading

    from insession.log.cluster import ClusterError, LocalCluster

    try:
        port_list = [int(p) for p in ports.split(",")]
    except ValueError:
        typer.echo(f"error: --ports takes comma-separated port numbers (4222,4223,4224), not {ports!r}", err=True)
        raise typer.Exit(2) from None
    try:
        cluster = LocalCluster(directory, port_list)
    except ClusterError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    try:
        cluster.start()
    except ClusterError as e:
        cluster.stop()
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    urls = ",".join(cluster.urls)
    typer.echo(f"JetStream cluster up (meta leader {cluster.wait_ready()}), fsync before every ack: {urls}")
    typer.echo(f"monitoring: {' '.join(cluster.monitor_urls)}")
    typer.echo(f"serve on it: insession serve --log {urls}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            for i, proc in enumerate(cluster.procs):
                if proc is not None and proc.poll() is not None:
                    typer.echo(f"node n{i} exited with {proc.returncode}; see {directory}/n{i}/server.log", err=True)
                    cluster.procs[i] = None
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        typer.echo("stopped")


@app.command()
def load(
    dataset_dir: Path = typer.Argument(..., help="A dataset dir from `insession generate` or `insession import`."),
    url: str | None = typer.Option(None, "--url", help="A running server; default: the embedded --data-dir."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="INSESSION_API_KEY"),
    data_dir: Path = typer.Option(Path("data"), "--data-dir"),
) -> None:
    """Insert a dataset directory (catalogue, then events in time order) into a server or the embedded store."""
    from contextlib import closing

    from tqdm import tqdm

    import insession
    from insession.datasets import load_dir

    items, batches = load_dir(dataset_dir)
    target = insession.Client(url, api_key=api_key) if url else insession.open(data_dir, maintenance_interval_s=None)
    with closing(target):
        for start in range(0, len(items), 5_000):
            target.insert("items", items[start:start + 5_000])
        stored = dups = 0
        with tqdm(desc="events", unit=" ev", unit_scale=True) as bar:
            for batch in batches:
                result = target.insert("events", batch)
                stored, dups = stored + result.stored, dups + result.duplicates
                bar.update(len(batch))
    typer.echo(f"{len(items):,} items, {stored:,} events stored ({dups:,} already there)")


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL-friendly query; prefix with EXPLAIN to see the lane and plan."),
    param: list[str] = typer.Option([], "--param", "-p", help="Named parameter NAME=VALUE (repeatable)."),
    url: str | None = typer.Option(None, "--url", help="A running server; default: the embedded --data-dir."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="INSESSION_API_KEY"),
    data_dir: Path = typer.Option(Path("data"), "--data-dir"),
) -> None:
    """Run a query against a server (--url) or the embedded store (--data-dir) and print the rows."""
    import insession
    from insession.client import RemoteError
    from insession.query import QueryError
    from insession.schema import BatchRejected

    params = dict(p.split("=", 1) for p in param)
    try:
        if url:
            with insession.Client(url, api_key=api_key) as client:
                result = client.select(sql, **params)
        else:
            with insession.open(data_dir, maintenance_interval_s=None) as db:
                result = db.select(sql, **params)
                for name in db.feature_manager.pending():  # embedded: finish the backfills before closing
                    typer.echo(f"-- backfilling feature {name} (the server would serve meanwhile) ...", err=True)
                    db.feature_manager.wait(name, timeout=24 * 3600)
    except (QueryError, BatchRejected, RemoteError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"-- lane: {result.lane}" + (f", feature: {result.feature}" if result.feature else ""))
    typer.echo("\t".join(result.columns))
    for row in result.rows:
        typer.echo("\t".join("" if v is None else str(v) for v in row))


@app.command()
def demo(
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Default: a fresh temporary directory."),
    users: int = typer.Option(300, "--users"),
    items: int = typer.Option(1500, "--items"),
    days: int = typer.Option(10, "--days"),
    seed: int = typer.Option(7, "--seed"),
    epochs: int = typer.Option(3, "--epochs", help="Training epochs for the demo's small model."),
    exit_at_end: bool = typer.Option(False, "--exit", help="Stop the server at the end even on a terminal "
                                     "(without a terminal it always stops)."),
) -> None:
    """The whole story: generate a shop, serve it, ingest through the API, train, replay a session with ranks;
    on a terminal the server then stays up with its console until Ctrl-C."""
    import sys

    from insession.demo import run_demo

    run_demo(data_dir, users=users, items=items, days=days, seed=seed, epochs=epochs,
             keep_open=sys.stdin.isatty() and not exit_at_end)


if __name__ == "__main__":
    app()
