"""The evaluation report: markdown tables (bootstrap intervals) and matplotlib plots of one dataset's run."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from insession.evaluate.metrics import METRICS, Estimate, PerRequest, average, bootstrap, paired_difference
from insession.evaluate.runner import ENSEMBLE, PRETRAINED, MethodResult, Results

OURS = ("reranker", "ensemble", "pretraining")  # the reranker's own rows: never the "strongest other method"

HEADERS = ("NDCG@10", "HR@10", "MRR", "AUC", "GAUC")


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _setting(setting: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in setting.items())


def _pool(results: list[MethodResult], view: str) -> PerRequest:
    """Seeds of one method pooled: per-request metrics averaged over seeds (sessions stay the unit)."""
    return average([getattr(r, view) for r in results])


def grouped(res: Results) -> dict[str, tuple[str, list[MethodResult]]]:
    out: dict[str, tuple[str, list[MethodResult]]] = {}
    for m in res.methods:
        out.setdefault(m.name, (m.kind, []))[1].append(m)
    return out


def _table(rows: list[tuple[str, dict[str, Estimate], str]]) -> list[str]:
    lines = ["| method | " + " | ".join(HEADERS) + " | notes |", "|---" * (len(HEADERS) + 2) + "|"]
    for name, est, note in rows:
        lines.append(f"| {name} | " + " | ".join(str(est[m]) for m in METRICS) + f" | {note} |")
    return lines


def render(res: Results, img_dir: Path, img_prefix: str) -> str:
    """One dataset's section of docs/evaluation.md; writes its plots under img_dir."""
    cfg = res.config
    groups = grouped(res)
    pooled = {
        name: (kind, {v: _pool(rs, v) for v in ("proposed", "forced")}, rs) for name, (kind, rs) in groups.items()
    }
    est = {name: {v: bootstrap(p[v], cfg.n_boot, seed=0) for v in p} for name, (_, p, _) in pooled.items()}
    L = [f"## {res.dataset}", ""]
    L.append(
        f"{res.n_events:,} events. Train < {_day(res.split.val_start)} UTC <= validation < "
        f"{_day(res.split.test_start)} UTC <= test. Requests (add-to-carts): "
        f"validation {res.n_requests['val']:,} "
        f"({res.n_requests['val_proposed']:,} with the positive proposed), test {res.n_requests['test']:,} "
        f"({res.n_requests['test_proposed']:,} proposed). Seeds {list(cfg.seeds)}; "
        f"reranker epochs <= {cfg.epochs}, "
        f"setting {_setting(res.reranker_setting)}; neural baselines {cfg.neural_epochs} epochs; "
        f"{cfg.n_boot} bootstrap resamples of "
        f"test sessions; run time {res.seconds.get('total', 0) / 60:.1f} min."
    )
    s = res.candidate_stage
    L += [
        "",
        "### Candidate stage (test)",
        "",
        "| recall (positive among the proposals: the ceiling of any reranker) | HR@20 (full catalogue) | "
        "MRR@20 (full catalogue) | proposals per request | missed positives found in the shopper's history |",
        "|---|---|---|---|---|",
        f"| {s['recall']:.4f} | {s['hr20']:.4f} | {s['mrr20']:.4f} | {s['mean_proposals']:.1f} | "
        f"{s['misses_in_history']:.3f} |",
        "",
    ]

    if res.reranker_grid:
        L += [
            "### Reranker setting, tuned on validation (first seed; NDCG@10 of the trainer's validation groups)",
            "",
            "| setting | validation NDCG@10 |",
            "|---|---|",
            *(f"| {_setting(p)} | {v:.4f} |" for p, v in res.reranker_grid),
            "",
        ]

    def note(name: str, kind: str, rs: list[MethodResult]) -> str:
        if kind == "reranker":
            return f"{len(rs)} seeds; best epochs {[r.params.get('best_epoch') for r in rs]}"
        if kind == "pretraining":
            p = rs[0].params
            losses = [r.params.get("pretrain_loss") for r in rs]
            tuned = (
                f", fine-tuned at lr x{p['lr_scale']:g} with {p['freeze_epochs']} frozen epochs"
                if "lr_scale" in p
                else ""
            )
            return (
                f"{len(rs)} seeds; pre-training {p['pretrain_epochs']} epochs (final "
                f"{p.get('objective', 'masked')}-item loss {losses})"
                f"{tuned}, item2vec {'on' if p['item2vec'] else 'off'}; "
                f"best epochs {[r.params.get('best_epoch') for r in rs]}"
            )
        if kind == "neural":
            return f"{len(rs)} seeds; trained on the reranker's add-to-cart groups"
        if kind == "sequential":
            setting = {k: v for k, v in rs[0].params.items() if k != "best_epoch"}
            epochs = [r.params.get("best_epoch") for r in rs]
            return f"{len(rs)} seeds; every interaction, next item; {_setting(setting)}; best epochs {epochs}"
        if kind == "ctr":
            p = rs[0].params
            return (
                f"{len(rs)} seeds; CTR on views + {p['negatives']} popularity-sampled negatives each, "
                f"{p['max_len']} behaviours; best epochs {[r.params.get('best_epoch') for r in rs]}"
            )
        if kind == "hybrid":
            return f"{len(rs)} seeds; " + ", ".join(f"{k}={v}" for k, v in rs[0].params.items())
        if kind == "ensemble":
            return f"mean score of the {rs[0].params['seeds']} seeds' rerankers"
        return ", ".join(f"{k}={v}" for k, v in rs[0].params.items())

    if res.seq_grid:
        L += [
            "### Sequential models (every interaction, next item), tuned on validation (first seed)",
            "",
            "Fitted on events before the validation period, stopped early on the held-out tail of that span "
            "(next-item NDCG@10 over the whole catalogue); the setting with the best validation NDCG@10 "
            "(proposed requests) "
            + (
                "is refitted per seed on events before the test period."
                if cfg.seq_refit
                else "ranks the test requests too (no refit: items first seen in the validation period are "
                "unknown to it)."
            ),
            "",
            "| model | setting | validation NDCG@10 | best epoch | held-out next-item NDCG@10 (catalogue) |",
            "|---|---|---|---|---|",
        ]
        for kind, tried in res.seq_grid.items():
            L += [f"| {kind} | {_setting(p)} | {v:.4f} | {e} | {h:.4f} |" for p, v, e, h in tried]
        L.append("")
    for view, title in (
        ("proposed", "requests whose positive was proposed"),
        ("forced", "every request, the positive put in place of the last proposal when missed"),
    ):
        rows = sorted(
            ((name, est[name][view], note(name, kind, rs)) for name, (kind, _, rs) in pooled.items()),
            key=lambda r: -r[1]["ndcg10"].value,
        )
        L += [f"### Reranking, {title}", ""] + _table(rows) + [""]
    # the headline comparison: the reranker against the strongest baseline (by validation-free test NDCG@10
    # of the proposed view is what the reader sees; the paired interval says whether the gap is real)
    others = [n for n, (k, _, _) in pooled.items() if k not in OURS]
    for ours, title in (
        ("reranker", "Reranker"),
        (PRETRAINED, "Reranker with pre-training"),
        (ENSEMBLE, "Reranker ensemble (seeds' scores averaged)"),
    ):
        for view in ("proposed", "forced") if others and ours in pooled else ():
            # the strongest other method is picked on test itself, which favours it: a conservative comparison
            best = max(others, key=lambda n, v=view: est[n][v]["ndcg10"].value)
            d = paired_difference(pooled[ours][1][view], pooled[best][1][view], n_boot=cfg.n_boot)
            verdict = "beats" if d.low > 0 else "loses to" if d.high < 0 else "is not distinguishable from"
            L += [
                f"**{title} vs the strongest other method, {view} view ({best})**: NDCG@10 difference on "
                f"the same test requests (paired session bootstrap) {d}. It **{verdict}** {best}.",
                "",
            ]
    if res.known:
        L += _known_section(res, pooled, others)
    L += _pretraining_section(res, pooled)
    if "reranker" in pooled:
        abl = [n for n, (k, _, _) in pooled.items() if k == "reranker" and n != "reranker"]
        if abl:
            L += [
                "### Ablations: full reranker minus the ablated one (NDCG@10, paired, seeds averaged)",
                "",
                "| ablation | proposed view | forced view | the component (proposed view) |",
                "|---|---|---|---|",
            ]
            for n in abl:
                d = {
                    v: paired_difference(pooled["reranker"][1][v], pooled[n][1][v], n_boot=cfg.n_boot)
                    for v in ("proposed", "forced")
                }
                p = d["proposed"]
                word = "helps" if p.low > 0 else "hurts" if p.high < 0 else "no measurable effect"
                L.append(f"| {n} | {p} | {d['forced']} | {word} |")
            L.append("")
            L += _ablations_by_surface(res, pooled, abl)
    # segments (proposed view)
    if res.segments:
        L += ["### Segments (test, positive proposed; NDCG@10 with 95% CI, n = requests)", ""]
        ranked = sorted(pooled, key=lambda n: -est[n]["proposed"]["ndcg10"].value)
        ours = [n for n in ranked if pooled[n][0] in OURS]
        names = ours + [n for n in ranked if n not in ours][:6]
        for seg, labels in res.segments.items():
            values = sorted(set(labels.tolist()))
            L += [
                f"**{seg.replace('_', ' ')}**",
                "",
                "| method | " + " | ".join(f"{v} (n={int((labels == v).sum())})" for v in values) + " |",
                "|---" * (len(values) + 1) + "|",
            ]
            for n in names:
                cells = []
                for v in values:
                    sub = pooled[n][1]["proposed"].subset(labels == v)
                    cells.append(str(bootstrap(sub, min(cfg.n_boot, 300), seed=0)["ndcg10"]) if len(sub) else "-")
                L.append(f"| {n} | " + " | ".join(cells) + " |")
            L.append("")
            if seg == "surface":
                L += _every_metric_by_surface(res, pooled, names[:4], labels)
    L += _plots(res, est, pooled, img_dir, img_prefix)
    return "\n".join(L)


def _every_metric_by_surface(res: Results, pooled: dict, names: list[str], labels: np.ndarray) -> list[str]:
    """Every metric on each surface's requests for the leading methods (issue 17: aggregates hide a
    surface's regression)."""
    L = [
        "**every metric by surface** (proposed view, 95% CI)",
        "",
        "| method | surface | n | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for n in names:
        for v in sorted(set(labels.tolist())):
            sub = pooled[n][1]["proposed"].subset(labels == v)
            b = bootstrap(sub, min(res.config.n_boot, 300), seed=0)
            L.append(f"| {n} | {v} | {len(sub)} | " + " | ".join(str(b[m]) for m in METRICS) + " |")
    return [*L, ""]


def _ablations_by_surface(res: Results, pooled: dict, abl: list[str]) -> list[str]:
    """Each ablation's paired difference on each surface's requests, in both views (issue 17: aggregate
    numbers hide a surface's regression; the proposed view may hold a surface's add-to-carts a handful of
    times, the forced view holds every one), where the data has surfaces."""
    L: list[str] = []
    for view, labels in res.surfaces.items():
        values = sorted(set(labels.tolist()))
        L += [
            f"### Ablations by surface: full reranker minus the ablated one (NDCG@10, paired, {view} view)",
            "",
            "A positive difference whose interval excludes 0 means the component helps on that surface.",
            "",
            "| ablation | " + " | ".join(f"{v} (n={int((labels == v).sum())})" for v in values) + " |",
            "|---" * (len(values) + 1) + "|",
        ]
        full = pooled["reranker"][1][view]
        for n in abl:
            cells = []
            for v in values:
                at = labels == v
                d = paired_difference(full.subset(at), pooled[n][1][view].subset(at), n_boot=res.config.n_boot)
                cells.append(f"{d}{' ✓' if d.low > 0 else ' ✗' if d.high < 0 else ''}")
            L.append(f"| {n} | " + " | ".join(cells) + " |")
        L.append("")
    return L


def _pretraining_section(res: Results, pooled: dict) -> list[str]:
    """Each pre-training variant minus the reranker without it (issue 20), paired, on every proposed request
    and (where the run knows which) on the requests whose positive a next-item model knows and the rest."""
    names = [n for n, (k, _, _) in pooled.items() if k == "pretraining"]
    if not names or "reranker" not in pooled:
        return []
    cfg = res.config
    pc = cfg.pretrain
    parts: dict[str, np.ndarray | None] = {"all": None}
    if res.known:
        parts |= {"known": res.known["proposed"], "unknown": ~res.known["proposed"]}
    L = [
        "### Pre-training on every interaction (issue 20): variant minus the reranker (NDCG@10, paired, seeds "
        "averaged)",
        "",
        f"The reranker row is item2vec on, pre-training off. Pre-training: {pc.epochs} epochs of "
        + (
            f"masked items (rate {pc.mask_rate:g}, lr {pc.lr:g}, item rows rescaled to std {pc.item_scale:g}, at "
            f"most {pc.max_windows} windows an epoch) over the history and session windows"
            if pc.objective == "masked"
            else f"next items (lr {pc.lr:g}, item rows rescaled to std {pc.item_scale:g}, at most {pc.max_windows} "
            "prefixes an epoch) after every history and session prefix"
        )
        + " of every event before the "
        "reranker's own training split; then the same fine-tuning, the pre-trained item table and encoders at "
        f"{pc.finetune_lr_scale:g} x its learning rate and frozen for its first {pc.freeze_epochs} epochs. "
        "Known / unknown: proposed requests whose "
        "positive a next-item model fitted before the "
        + ("test" if cfg.seq_refit else "validation")
        + " period knows.",
        "",
        "| variant | " + " | ".join(f"proposed, {p}" for p in parts) + " | forced |",
        "|---" * (len(parts) + 2) + "|",
    ]
    for n in names:
        cells = []
        for m in parts.values():
            a, b = pooled[n][1]["proposed"], pooled["reranker"][1]["proposed"]
            if m is not None:
                a, b = a.subset(m), b.subset(m)
            cells.append(str(paired_difference(a, b, n_boot=cfg.n_boot)) if len(a) else "-")
        forced = paired_difference(pooled[n][1]["forced"], pooled["reranker"][1]["forced"], n_boot=cfg.n_boot)
        L.append(f"| {n} | " + " | ".join(cells) + f" | {forced} |")
    L.append("")
    return L


def _known_section(res: Results, pooled: dict, others: list[str]) -> list[str]:
    """Every method on the test requests whose positive the sequential models know (it occurs as a training
    target before the test period) and on the rest, with the reranker's paired comparisons on each."""
    cfg = res.config
    L = [
        "### Positives the sequential models know, and the rest (test; NDCG@10 and HR@10 with 95% CI)",
        "",
        "Known: the carted item occurs as a next-item training target of the sequential models fitted before "
        + ("the test period" if cfg.seq_refit else "the validation period (no refit)")
        + ". The sequential models alone score 0 on the rest by construction.",
        "",
    ]
    for view in ("proposed", "forced"):
        mask = res.known[view]
        parts = {"known": mask, "unknown": ~mask}
        est = {
            n: {k: bootstrap(p[view].subset(m), cfg.n_boot, seed=0) if m.any() else None for k, m in parts.items()}
            for n, (_, p, _) in pooled.items()
        }
        n_k, n_u = int(mask.sum()), int((~mask).sum())
        L += [
            f"**{view} view** (known n={n_k}, unknown n={n_u})",
            "",
            "| method | NDCG@10 known | HR@10 known | NDCG@10 unknown | HR@10 unknown |",
            "|---|---|---|---|---|",
        ]

        def cell(e: dict | None, m: str) -> str:
            return str(e[m]) if e else "-"

        order = sorted(est, key=lambda n: -(est[n]["known"]["ndcg10"].value if est[n]["known"] else 0.0))
        for n in order:
            e = est[n]
            L.append(
                f"| {n} | {cell(e['known'], 'ndcg10')} | {cell(e['known'], 'hr10')} | "
                f"{cell(e['unknown'], 'ndcg10')} | {cell(e['unknown'], 'hr10')} |"
            )
        L.append("")
        for ours in ("reranker", PRETRAINED, ENSEMBLE):
            if ours not in pooled or not others:
                continue
            for part, m in parts.items():
                if not m.any():
                    continue
                best = max(others, key=lambda n, p=part: est[n][p]["ndcg10"].value if est[n][p] else -1.0)
                d = paired_difference(
                    pooled[ours][1][view].subset(m), pooled[best][1][view].subset(m), n_boot=cfg.n_boot
                )
                verdict = "beats" if d.low > 0 else "loses to" if d.high < 0 else "is not distinguishable from"
                L.append(
                    f"- {view} view, {part} positives: {ours} minus the strongest other method ({best}) "
                    f"{d}: it **{verdict}** {best}."
                )
        L.append("")
    return L


def _plots(res: Results, est: dict, pooled: dict, img_dir: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    out: list[str] = []
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.35 * len(est) + 1)))
    for ax, view in zip(axes, ("proposed", "forced"), strict=True):
        names = sorted(est, key=lambda n: est[n][view]["ndcg10"].value)
        v = np.array([est[n][view]["ndcg10"].value for n in names])
        lo = v - np.array([est[n][view]["ndcg10"].low for n in names])
        hi = np.array([est[n][view]["ndcg10"].high for n in names]) - v
        palette = {
            "baseline": "tab:gray",
            "neural": "tab:blue",
            "sequential": "tab:green",
            "hybrid": "tab:olive",
            "ctr": "tab:purple",
            "reranker": "tab:red",
            "pretraining": "tab:pink",
            "ensemble": "tab:orange",
        }
        colors = [palette[pooled[n][0]] for n in names]
        ax.barh(names, v, xerr=[lo, hi], color=colors)
        ax.set_title(f"NDCG@10, test, {view} view")
    fig.tight_layout()
    p = img_dir / f"{prefix}_ndcg.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out += [f"![NDCG@10 by method]({p.relative_to(img_dir.parent)})", ""]
    curves = defaultdict(list)
    for key, epochs in res.train_curves.items():
        curves[key.rsplit("_seed", 1)[0]].append(epochs)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, runs in curves.items():
            for j, ep in enumerate(runs):
                ax.plot(
                    [e["epoch"] for e in ep],
                    [e["val_ndcg10"] for e in ep],
                    alpha=0.7,
                    label=name if j == 0 else None,
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation NDCG@10 (trainer's own validation)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = img_dir / f"{prefix}_curves.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        out += [f"![training curves]({p.relative_to(img_dir.parent)})", ""]
    return out
