"""The `insession` command line: serve, demo, load, and the commands of the other parts."""

from __future__ import annotations

from pathlib import Path

import typer

from insession.datasets.cli import generate, import_

app = typer.Typer(help="insession: real-time in-session personalisation.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.command("generate")(generate)
app.command("import")(import_)


@app.command()
def serve(
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="Where the log, features and history live."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
) -> None:
    """Run the HTTP server on the embedded default (one process)."""
    import uvicorn

    from insession.serve.app import create_app

    uvicorn.run(create_app(data_dir), host=host, port=port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")


@app.command()
def demo(
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Default: a fresh temporary directory."),
    users: int = typer.Option(300, "--users"),
    items: int = typer.Option(1500, "--items"),
    days: int = typer.Option(10, "--days"),
    seed: int = typer.Option(7, "--seed"),
) -> None:
    """The whole story on the embedded default: generate a shop, serve it, ingest through the API, read back."""
    from insession.demo import run_demo

    run_demo(data_dir, users=users, items=items, days=days, seed=seed)


if __name__ == "__main__":
    app()
