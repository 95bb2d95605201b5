"""`insession train`: train the Dual Sequence ReRanker on an event history into a versioned artefact (with
`--follow`: keep fine-tuning the serving one, `insession.train.follow`);
`insession training-data`: the point-in-time training examples alone, as Parquet, from either offline engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from insession.log.base import LogConfig
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


LogOption = Annotated[
    str | None,
    typer.Option("--log", help="The replicated log's NATS servers (nats://h1:4222,nats://h2:4222,...; default: "
                 "[log] url of --config): DATA_DIR is then its history (the shared [log] history, a directory or s3://bucket/"
                 "prefix, or a node's data dir) and the stream's events after the export mark are read too "
                 "(docs/cluster.md)."),
]
StreamOption = Annotated[
    str | None, typer.Option("--stream", help="With --log: the JetStream stream (default: [log] stream, INSESSION).")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="A server config (TOML/JSON) whose [log] section names the replicated log "
                 "(url, stream, ack_timeout_s); --log and --stream override it."),
]


def log_options(log: str | None, stream: str | None, config: Path | None) -> LogConfig | None:
    """The replicated log `--log` / `--stream` / `--config` name; None: no replicated log (the history alone, or
    an embedded log.sqlite beside it). A bad value stops the command with exit status 2 naming it."""
    import msgspec

    from insession.serve.config import ConfigError, load_config

    try:
        cfg = load_config(config).log
        if log is not None:
            cfg = msgspec.structs.replace(cfg, url=log)
        if stream is not None:
            cfg = msgspec.convert({**msgspec.structs.asdict(cfg), "stream": stream}, LogConfig)
    except (ConfigError, msgspec.ValidationError) as e:
        raise typer.BadParameter(str(e), param_hint="--config / --stream") from None
    if not cfg.url:
        if stream is not None:
            raise typer.BadParameter("--stream needs --log (or a --config with [log] url)", param_hint="--stream")
        return None
    from insession.log.jetstream import JetStreamError, server_urls

    try:
        server_urls(cfg)
    except JetStreamError as e:
        raise typer.BadParameter(str(e), param_hint="--log") from None
    return cfg


def load_history(data_dir: str, log: LogConfig | None) -> Any:
    """The events to train on (`insession.train.build.load_events`), saying where they came from; a replicated
    log that cannot be read (unreachable, no quorum, no such stream) or a history that is not the stream's
    stops the command with exit status 1 and the reason."""
    from insession.train.build import load_events, read_cluster_events

    if log is None:
        events = load_events(data_dir)
        typer.echo(f"{events.num_rows:,} events from {data_dir}")
        return events
    from insession.log.jetstream import JetStreamError

    try:
        got = read_cluster_events(data_dir, log)
    except (JetStreamError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    tail = got.events.num_rows - (got.mark + 1)
    typer.echo(f"{got.events.num_rows:,} events: {got.mark + 1:,} from the history {got.history} (export mark "
               f"{got.mark}, from {got.mark_from}) and {tail:,} from stream {log.stream} after it "
               f"(its end: offset {got.stream_end})")
    return got.events


def _engine(name: str, master: str | None) -> OfflineEngine:
    if name not in ENGINES:
        raise typer.BadParameter(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}", param_hint="--engine")
    engine = open_engine(name, master=master)
    typer.echo(f"offline engine: {engine.describe()}")  # Spark's UI address, to watch the build's jobs
    return engine


def train(
    data_dir: Annotated[
        str,
        typer.Argument(
            help="A data dir holding history/day=*/ Parquet, an events Parquet file with insession's event schema, "
            "or (with --log) the replicated log's history."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Artefacts go to OUT/<version>/.")] = Path("models"),
    log: LogOption = None,
    stream: StreamOption = None,
    config: ConfigOption = None,
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
            help="Pre-training epochs of the item table and both encoders on every training-period interaction, "
            "before fitting (0: off; docs/evaluation.md measures it)."
        ),
    ] = 0,
    pretrain_objective: Annotated[
        str, typer.Option(help="Pre-training objective: masked (masked items) or next (the next item of each prefix).")
    ] = "masked",
    val_fraction: Annotated[float, typer.Option(help="Share of the latest add-to-carts that validate.")] = 0.15,
    threads: Annotated[int, typer.Option(help="torch intra-op threads (0: OMP_NUM_THREADS or every core).")] = 0,
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
    update_lr: Annotated[
        float, typer.Option(help="With --follow: the fine-tuning learning rate (FollowConfig: why 2e-3).")
    ] = 2e-3,
    update_validate_fraction: Annotated[
        float,
        typer.Option(help="With --follow: the newest share of an update's new add-to-carts that validates (the gate)."),
    ] = 0.2,
    min_new: Annotated[int, typer.Option(help="With --follow: fewer new add-to-carts than this skip an update.")] = 20,
    rollback: Annotated[
        bool,
        typer.Option("--rollback", help="Retire the newest version in OUT (to OUT/_retired/), serve the one before."),
    ] = False,
) -> None:
    """Train the Dual Sequence ReRanker on point-in-time training data from the feature engine."""
    from insession.train.pipeline import train_on_events
    from insession.train.replay import stage_proposer

    replicated = log_options(log, stream, config)
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
        cfg = following.FollowConfig(
            epochs=update_epochs,
            lr=update_lr,
            validate_fraction=update_validate_fraction,
            min_new=min_new,
            seed=seed,
            threads=threads,
        )
        cfg.batch_size, cfg.served_negatives = batch_size, served_negatives
        offline = _engine(engine, master)
        try:
            following.follow(
                data_dir, out, period, cfg, server=server, log=replicated, updates=updates or None, engine=offline,
                echo=typer.echo,
            )
        except KeyboardInterrupt:
            typer.echo("stopped")
        finally:
            offline.close()
        return
    try:
        pretrain = PretrainConfig(epochs=pretrain_epochs, objective=pretrain_objective)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--pretrain-objective") from None
    events = load_history(data_dir, replicated)  # before the engine starts: an unreadable log fails at once
    offline = _engine(engine, master)
    try:
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
                pretrain=pretrain,
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
        str,
        typer.Argument(help="A data dir holding history/day=*/ Parquet, an events Parquet file, a dataset dir, or "
                       "(with --log) the replicated log's history."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Writes train/val examples and requests as Parquet here.")],
    log: LogOption = None,
    stream: StreamOption = None,
    config: ConfigOption = None,
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
    from insession.train.build import build, write_training_data
    from insession.train.replay import stage_proposer

    events = load_history(data_dir, log_options(log, stream, config))
    offline = _engine(engine, master)
    try:
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
