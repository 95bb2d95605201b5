"""`insession evaluate`: the whole evaluation of one dataset, written into docs/evaluation.md."""

from __future__ import annotations

import re
from collections.abc import Collection
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


def _named(only: str, choices: Collection[str], what: str, hint: str) -> list[str]:
    """The comma-separated names in `only`, each one of `choices` (else typer.BadParameter listing them)."""
    names = [n for n in only.split(",") if n]
    unknown = sorted(set(names) - set(choices))
    if unknown:
        raise typer.BadParameter(f"unknown {what} {unknown}; choose from {', '.join(choices)}", param_hint=hint)
    return names


def _ablations(on: bool, only: str) -> tuple[str, ...]:
    """The reranker rows to train: the full model, then every ablation or the named ones (in ABLATIONS)."""
    from insession.evaluate.runner import ABLATIONS

    names = _named(only, ABLATIONS, "ablation(s)", "--only-ablations")
    if not on:
        return ("reranker",)
    return tuple(n for n in ABLATIONS if n == "reranker" or not names or n in names)


def _pretraining(on: bool, only: str) -> tuple[str, ...]:
    """The pre-training variants to train: none, the default ones (DEFAULT_PRETRAINING), or the named ones
    (any of PRETRAIN_VARIANTS, in its order)."""
    from insession.evaluate.runner import DEFAULT_PRETRAINING, PRETRAIN_VARIANTS

    names = _named(only, PRETRAIN_VARIANTS, "variant(s)", "--only-pretraining")
    if not on:
        return ()
    return tuple(n for n in PRETRAIN_VARIANTS if (n in names if names else n in DEFAULT_PRETRAINING))


def evaluate(
    dataset: Annotated[
        str,
        typer.Argument(
            help="`synthetic` (the easy shop), `realistic` (the shop calibrated on Taobao, with surfaces, queries "
            "and trends), or a sample name under --data (e.g. taobao_userbehavior_head84k)."
        ),
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
    only_ablations: Annotated[
        str, typer.Option(help="With --ablations: train these ablations only (comma list of names; '' for all).")
    ] = "",
    neural: Annotated[
        bool, typer.Option(help="Train SASRec, DIN and BST on the reranker's add-to-cart groups (the *_groups rows).")
    ] = True,
    sequential: Annotated[
        str, typer.Option(help="Sequential models trained on every interaction (comma list; '' for none).")
    ] = "sasrec,gru4rec",
    seq_tune: Annotated[
        bool, typer.Option(help="Tune the sequential models' dropout and learning rate on validation (else these).")
    ] = True,
    seq_dropout: Annotated[float, typer.Option(help="Sequential models' dropout (--no-seq-tune).")] = 0.5,
    seq_lr: Annotated[float, typer.Option(help="Sequential models' learning rate (--no-seq-tune).")] = 3e-3,
    seq_epochs: Annotated[int, typer.Option(help="Sequential models' epochs at most (early stopping).")] = 40,
    seq_seeds: Annotated[int, typer.Option(help="Seeds of the sequential models' test fits (0: --seeds).")] = 0,
    seq_refit: Annotated[
        bool,
        typer.Option(
            help="Refit the sequential models on events before the test period (else the fit before the "
            "validation period ranks the test requests too, at half the cost)."
        ),
    ] = True,
    pretraining: Annotated[
        bool,
        typer.Option(
            help="Train the pre-training variants (masked items on every interaction; with and without item2vec) "
            "and item2vec off, each with every seed."
        ),
    ] = True,
    pretrain_epochs: Annotated[int, typer.Option(help="Pre-training epochs of those variants.")] = 5,
    pretrain_objective: Annotated[
        str, typer.Option(help="Pre-training objective: masked (masked items) or next (the next item of each prefix).")
    ] = "masked",
    pretrain_lr: Annotated[float, typer.Option(help="Pre-training learning rate.")] = 1e-2,
    only_pretraining: Annotated[
        str, typer.Option(help="Train only these pre-training variants (comma list; '' for all of them).")
    ] = "",
    finetune_lr_scale: Annotated[
        float, typer.Option(help="Fine-tuning after pre-training: the pre-trained parts' learning-rate multiplier.")
    ] = 1.0,
    freeze_epochs: Annotated[
        int, typer.Option(help="Fine-tuning after pre-training: epochs with the pre-trained parts frozen.")
    ] = 0,
    ctr: Annotated[
        str, typer.Option(help="CTR models trained on impressions built from the views (comma list; '' for none).")
    ] = "din,bst",
    ctr_seeds: Annotated[int, typer.Option(help="Seeds of the CTR models (0: --seeds).")] = 0,
    section: Annotated[
        str, typer.Option(help="Name of the report section to write (default: the dataset's own).")
    ] = "",
    users: Annotated[int, typer.Option(help="Synthetic shop: shoppers.")] = 400,
    items: Annotated[int, typer.Option(help="Synthetic shop: items.")] = 1200,
    days: Annotated[int, typer.Option(help="Synthetic shop: days.")] = 14,
    seed: Annotated[int, typer.Option(help="Synthetic shop seed.")] = 7,
    boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    threads: Annotated[int, typer.Option(help="Torch threads (0: OMP_NUM_THREADS or every core).")] = 0,
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
    from insession.evaluate.runner import RERANKER_GRID, EvalConfig, run
    from insession.evaluate.sequential import SEQ_GRID, SeqConfig
    from insession.evaluate.split import earlier_window
    from insession.train.pretrain import PretrainConfig

    try:
        pretrain = PretrainConfig(
            epochs=pretrain_epochs,
            objective=pretrain_objective,
            lr=pretrain_lr,
            finetune_lr_scale=finetune_lr_scale,
            freeze_epochs=freeze_epochs,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--pretrain-objective") from e
    shop = dataset in ("synthetic", "realistic")
    ds = (
        load_synthetic(users, items, days, seed, realistic=dataset == "realistic")
        if shop
        else load_real(data / f"{dataset}.parquet", dataset)
    )
    cfg = EvalConfig(
        seeds=tuple(range(seeds)),
        epochs=epochs,
        neural_epochs=neural_epochs,
        grid=RERANKER_GRID if tune else ({"dim": dim, "lr": lr, "dropout": dropout},),
        ablations=_ablations(ablations, only_ablations),
        neural=tuple(MODELS) if neural else (),
        sequential=tuple(s for s in sequential.split(",") if s),
        seq=SeqConfig(max_epochs=seq_epochs),
        seq_grid=SEQ_GRID if seq_tune else ({"dropout": seq_dropout, "lr": seq_lr},),
        seq_seeds=seq_seeds,
        seq_refit=seq_refit,
        pretraining=_pretraining(pretraining, only_pretraining),
        pretrain=pretrain,
        ctr=tuple(c for c in ctr.split(",") if c),
        ctr_seeds=ctr_seeds,
        n_boot=boot,
        threads=threads,
    )
    name = section or dataset
    section = name
    if backtest > 0:  # the earlier window is cut with the run's own shares, so its test period ends where ours starts
        section = f"{name}_backtest{backtest}"
        earlier = earlier_window(ds.events, backtest, cfg.val_share, cfg.test_share)
        ds = Dataset(f"{ds.name}, backtest {backtest}", earlier, ds.items)
    res = run(ds, cfg)
    command = (
        f"insession evaluate {dataset} --seeds {seeds} --epochs {epochs} --neural-epochs {neural_epochs} "
        + ("--tune " if tune else f"--no-tune --dim {dim} --lr {lr} --dropout {dropout} ")
        + f"{'--ablations' if ablations else '--no-ablations'} "
        + (f"--only-ablations '{only_ablations}' " if ablations and only_ablations else "")
        + f"{'--neural' if neural else '--no-neural'} --sequential '{sequential}' "
        + ("--seq-tune " if seq_tune else f"--no-seq-tune --seq-dropout {seq_dropout} --seq-lr {seq_lr} ")
        + f"--seq-epochs {seq_epochs} --seq-seeds {seq_seeds} {'--seq-refit' if seq_refit else '--no-seq-refit'} "
        + (
            f"--pretraining --pretrain-epochs {pretrain_epochs} --pretrain-lr {pretrain_lr} "
            + (f"--pretrain-objective {pretrain_objective} " if pretrain_objective != "masked" else "")
            + (f"--only-pretraining '{only_pretraining}' " if only_pretraining else "")
            + f"--finetune-lr-scale {finetune_lr_scale} --freeze-epochs {freeze_epochs} "
            if pretraining
            else ""
        )
        + ("" if pretraining else "--no-pretraining ")
        + f"--ctr '{ctr}' --ctr-seeds {ctr_seeds} --boot {boot}"
        + (f" --section {name}" if name != dataset else "")
        + (f" --users {users} --items {items} --days {days} --seed {seed}" if shop else "")
        + (f" --backtest {backtest}" if backtest else "")
        + (f" --threads {threads}" if threads else "")
    )
    body = render(res, out.parent / "img", f"eval_{section}")
    write_section(out, section, f"Reproduce: `{command}`\n\n{body}")
    typer.echo(f"wrote {out} ({res.seconds['total'] / 60:.1f} min)")
