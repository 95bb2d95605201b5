"""`insession evaluate`: the whole evaluation of one dataset, written into docs/evaluation.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the checkout
BEGIN, END = "<!-- evaluate:{name}:begin -->", "<!-- evaluate:{name}:end -->"


def write_section(doc: Path, name: str, body: str) -> None:
    """Replace (or append) this dataset's generated section of the report, leaving the rest as written."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    text = doc.read_text() if doc.exists() else "# Evaluation\n"
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def evaluate(
    dataset: Annotated[
        str,
        typer.Argument(help="`synthetic`, or a sample name under --data (e.g. taobao_userbehavior_head84k)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="The report to write (its section for this dataset).")] = Path(
        "docs/evaluation.md"
    ),
    data: Annotated[Path, typer.Option("--data", help="Directory of the normalised real samples.")] = DEFAULT_DATA,
    seeds: Annotated[int, typer.Option(help="Seeds per neural model and ablation.")] = 3,
    epochs: Annotated[int, typer.Option(help="Reranker epochs at most (early stopping).")] = 8,
    neural_epochs: Annotated[int, typer.Option(help="SASRec / DIN / BST epochs.")] = 3,
    tune: Annotated[
        bool, typer.Option(help="Pick the reranker's width, learning rate and dropout on validation (else these).")
    ] = True,
    dim: Annotated[int, typer.Option(help="Reranker width (--no-tune).")] = 64,
    lr: Annotated[float, typer.Option(help="Reranker learning rate (--no-tune).")] = 2e-3,
    dropout: Annotated[float, typer.Option(help="Reranker dropout (--no-tune).")] = 0.1,
    ablations: Annotated[bool, typer.Option(help="Train every ablation (else the full reranker only).")] = True,
    neural: Annotated[bool, typer.Option(help="Train SASRec, DIN and BST.")] = True,
    users: Annotated[int, typer.Option(help="Synthetic shop: shoppers.")] = 400,
    items: Annotated[int, typer.Option(help="Synthetic shop: items.")] = 1200,
    days: Annotated[int, typer.Option(help="Synthetic shop: days.")] = 14,
    seed: Annotated[int, typer.Option(help="Synthetic shop seed.")] = 7,
    boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    backtest: Annotated[
        int,
        typer.Option(
            help="Evaluate on an earlier window: drop the latest test period's events this many times first "
            "(its own section of the report)."
        ),
    ] = 0,
) -> None:
    """Evaluate the reranker against baselines and its ablations on one dataset (seeded, reproducible)."""
    from insession.evaluate.data import Dataset, load_real, load_synthetic
    from insession.evaluate.neural import MODELS
    from insession.evaluate.report import render
    from insession.evaluate.runner import ABLATIONS, RERANKER_GRID, EvalConfig, run
    from insession.evaluate.split import earlier_window

    ds = (
        load_synthetic(users, items, days, seed)
        if dataset == "synthetic"
        else load_real(data / f"{dataset}.parquet", dataset)
    )
    cfg = EvalConfig(
        seeds=tuple(range(seeds)),
        epochs=epochs,
        neural_epochs=neural_epochs,
        grid=RERANKER_GRID if tune else ({"dim": dim, "lr": lr, "dropout": dropout},),
        ablations=tuple(ABLATIONS) if ablations else ("reranker",),
        neural=tuple(MODELS) if neural else (),
        n_boot=boot,
    )
    section = dataset
    if backtest > 0:  # the earlier window is cut with the run's own shares, so its test period ends where ours starts
        section = f"{dataset}_backtest{backtest}"
        earlier = earlier_window(ds.events, backtest, cfg.val_share, cfg.test_share)
        ds = Dataset(f"{ds.name}, backtest {backtest}", earlier, ds.items)
    res = run(ds, cfg)
    command = (
        f"insession evaluate {dataset} --seeds {seeds} --epochs {epochs} --neural-epochs {neural_epochs} "
        + ("--tune " if tune else f"--no-tune --dim {dim} --lr {lr} --dropout {dropout} ")
        + f"{'--ablations' if ablations else '--no-ablations'} "
        f"{'--neural' if neural else '--no-neural'} --boot {boot}"
        + (f" --users {users} --items {items} --days {days} --seed {seed}" if dataset == "synthetic" else "")
        + (f" --backtest {backtest}" if backtest else "")
    )
    body = render(res, out.parent / "img", f"eval_{section}")
    write_section(out, section, f"Reproduce: `{command}`\n\n{body}")
    typer.echo(f"wrote {out} ({res.seconds['total'] / 60:.1f} min)")
