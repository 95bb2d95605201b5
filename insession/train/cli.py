"""`insession train`: train the Dual Sequence ReRanker on an event history into a versioned artefact (with
`--follow`: keep fine-tuning the serving one, `insession.train.follow`);
`insession training-data`: the point-in-time training examples alone, as Parquet, from either offline engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from insession.offline import ENGINES, OfflineEngine, open_engine
from insession.train.build import BuildConfig
from insession.train.pretrain import PretrainConfig
from insession.train.trainer import TrainConfig

EngineOption = Annotated[
    str, typer.Option("--engine", help=f"The offline feature engine: {' or '.join(ENGINES)} (DuckDB: this process).")
]
MasterOption = Annotated[
    str | None,
    typer.Option("--master", help="Spark's master URL (default local[*]; e.g. spark://host:7077, yarn, k8s://...)."),
]


def _engine(name: str, master: str | None) -> OfflineEngine:
    if name not in ENGINES:
        raise typer.BadParameter(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}", param_hint="--engine")
    engine = open_engine(name, master=master)
    typer.echo(f"offline engine: {engine.describe()}")  # Spark's UI address, to watch the build's jobs
    return engine


def train(
    data_dir: Annotated[
        Path,
        typer.Argument(
            help="A data dir holding history/day=*/ Parquet, or an events Parquet file with insession's event schema."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Artefacts go to OUT/<version>/.")] = Path("models"),
    epochs: Annotated[int, typer.Option(help="At most this many epochs (early stopping may end sooner).")] = 8,
    batch_size: Annotated[int, typer.Option(help="Example groups per batch.")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-3,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation NDCG@10 before stopping.")] = 2,
    dim: Annotated[int, typer.Option(help="Item embedding / model width.")] = 128,
    layers: Annotated[int, typer.Option(help="Transformer layers per encoder.")] = 1,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 2,
    item2vec_epochs: Annotated[int, typer.Option(help="Item2vec pre-training epochs (0: random init).")] = 2,
    pretrain_epochs: Annotated[
        int,
        typer.Option(
            help="Masked-item pre-training epochs of the item table and both encoders on every training-period "
            "interaction, before fitting (0: off; docs/evaluation.md measures it)."
        ),
    ] = 0,
    val_fraction: Annotated[float, typer.Option(help="Share of the latest add-to-carts that validate.")] = 0.15,
    threads: Annotated[int, typer.Option(help="torch intra-op threads (0: every core).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    served_negatives: Annotated[
        bool,
        typer.Option(help="Negatives from the ranking service's candidate stage, replayed at each add-to-cart."),
    ] = True,
    engine: EngineOption = "duckdb",
    master: MasterOption = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="Continuous updates (docs/continuous.md): every --every, fine-tune the serving model in OUT on the "
            "add-to-carts since its last update, promote it only if it validates no worse on the newest window.",
        ),
    ] = False,
    every: Annotated[str, typer.Option(help="With --follow: the period between updates (90s, 10m, 1h).")] = "10m",
    server: Annotated[
        str | None,
        typer.Option(
            help="With --follow / --rollback: the server to hot-reload (POST /v1/admin/reload; API key from "
            "$INSESSION_API_KEY). Without it the server takes a promoted model at its next reload."
        ),
    ] = None,
    updates: Annotated[int, typer.Option(help="With --follow: stop after this many updates (0: never).")] = 0,
    update_epochs: Annotated[int, typer.Option(help="With --follow: fine-tuning epochs per update.")] = 2,
    update_lr: Annotated[float, typer.Option(help="With --follow: the fine-tuning learning rate.")] = 5e-4,
    min_new: Annotated[int, typer.Option(help="With --follow: fewer new add-to-carts than this skip an update.")] = 20,
    rollback: Annotated[
        bool,
        typer.Option("--rollback", help="Retire the newest version in OUT (to OUT/_retired/), serve the one before."),
    ] = False,
) -> None:
    """Train the Dual Sequence ReRanker on point-in-time training data from the feature engine."""
    from insession.train.build import load_events
    from insession.train.pipeline import train_on_events
    from insession.train.replay import stage_proposer

    if follow or rollback:
        from insession.train import follow as following

        try:
            if rollback:
                typer.echo(f"serving {following.rollback(out, server)}")
                return
            period = following.parse_every(every)
            following.serving_version(out, server)  # a model to start from, before any work
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--every") from None
        except FileNotFoundError as e:
            typer.echo(f"{e}: train a first model into {out} with `insession train`", err=True)
            raise typer.Exit(1) from None
        cfg = following.FollowConfig(epochs=update_epochs, lr=update_lr, min_new=min_new, seed=seed, threads=threads)
        cfg.batch_size, cfg.served_negatives = batch_size, served_negatives
        offline = _engine(engine, master)
        try:
            following.follow(
                data_dir, out, period, cfg, server=server, updates=updates or None, engine=offline, echo=typer.echo
            )
        except KeyboardInterrupt:
            typer.echo("stopped")
        finally:
            offline.close()
        return
    offline = _engine(engine, master)
    try:
        events = load_events(data_dir)
        typer.echo(f"{events.num_rows:,} events from {data_dir}")
        done = train_on_events(
            events,
            out,
            train_config=TrainConfig(
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                patience=patience,
                seed=seed,
                threads=threads,
                pretrain=PretrainConfig(epochs=pretrain_epochs),
            ),
            build_config=BuildConfig(val_fraction=val_fraction, seed=seed),
            proposer=stage_proposer(events, engine=offline) if served_negatives else None,
            item2vec_epochs=item2vec_epochs,
            engine=offline,
            dim=dim,
            n_layers=layers,
            n_heads=heads,
        )
    finally:
        offline.close()
    m = done.result.metrics()
    typer.echo(f"best epoch {m['best_epoch']}: validation NDCG@10 {m['val_ndcg10']:.4f}, hit@10 {m['val_hit10']:.4f}")
    typer.echo(f"artefact: {done.path}")


def training_data(
    data_dir: Annotated[
        Path,
        typer.Argument(help="A data dir holding history/day=*/ Parquet, an events Parquet file, or a dataset dir."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Writes train/val examples and requests as Parquet here.")],
    engine: EngineOption = "duckdb",
    master: MasterOption = None,
    val_fraction: Annotated[float, typer.Option(help="Share of the latest add-to-carts that validate.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Random seed (validation sample, popularity negatives).")] = 0,
    served_negatives: Annotated[
        bool,
        typer.Option(help="Negatives from the ranking service's candidate stage, replayed at each add-to-cart."),
    ] = True,
) -> None:
    """Build the point-in-time training examples (the columns the trainer reads) and write them as Parquet."""
    from insession.train.build import build, load_events, write_training_data
    from insession.train.replay import stage_proposer

    offline = _engine(engine, master)
    try:
        events = load_events(data_dir)
        typer.echo(f"{events.num_rows:,} events from {data_dir}")
        data = build(
            events,
            BuildConfig(val_fraction=val_fraction, seed=seed),
            proposer=stage_proposer(events, engine=offline) if served_negatives else None,
            engine=offline,
        )
    finally:
        offline.close()
    for path in write_training_data(data, out):
        typer.echo(f"wrote {path}")
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in data.seconds.items())
    typer.echo(f"{len(data.train):,} training and {len(data.val):,} validation groups; {steps}")
