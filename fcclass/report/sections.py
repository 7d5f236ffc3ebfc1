"""The sections of one run's page, each an HTML fragment under a heading that names it. Numbers are the evaluation's,
shown as `fcclass eval` shows them (percentages with two decimals, the loss with four)."""

from __future__ import annotations

from html import escape
from typing import Any

from fcclass.report.build import RunData, misclassified, per_image_loss, pr_curves
from fcclass.report.images import thumbnails
from fcclass.report.svg import Series, line_chart, pr_chart, reliability_chart


def pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.2%}"


def section(key: str, title: str, body: str, note: str = "") -> str:
    extra = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{key}"><h2>{escape(title)}</h2>{extra}{body}</section>'


def header(data: RunData) -> str:
    """Run, dataset and split with image counts, model, training time, device and precision, versions, git commit."""
    s, r = data.summary, data.report
    sizes = ", ".join(f"{name} {n:,}" for name, n in data.split_sizes.items())
    rows = [("Run", str(data.run_dir)), ("Dataset", getattr(s, "dataset", None) or "–"),
            ("Split", f"{r.split}: {r.num_samples:,} images" + (f" (recorded splits: {sizes})" if sizes else "")),
            ("Model", model_line(data)), ("Checkpoint", r.checkpoint)]
    if s is not None:
        epochs = s.epochs.done if s.epochs else "?"
        wall = f"{s.wall_seconds:,.1f} s" if s.wall_seconds is not None else "–"
        rows += [("Training", f"{epochs} epoch(s) in {wall}" + (f", best epoch {data.best_epoch}" if data.best_epoch else "")),
                 ("Device", f"{s.device or '–'}, precision {s.precision or '–'}"),
                 ("Versions", ", ".join(f"{k} {v}" for k, v in (s.versions or {}).items()) or "–"),
                 ("Git commit", (s.git.commit + (" (uncommitted changes)" if s.git.dirty else "")) if s.git else "– (not in a git repository)")]
    notes = "".join(f"<li>{escape(n)}</li>" for n in r.notes)
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in rows)
    return f'<header id="header"><h1>{escape(data.name)}</h1><dl>{items}</dl>{f"<ul class=notes>{notes}</ul>" if notes else ""}</header>'


def model_line(data: RunData) -> str:
    """The layers in order, and the parameter counts."""
    s, layers = data.summary, getattr(getattr(data.config, "model", None), "layers", None) or []
    names = " → ".join(getattr(layer, "type", type(layer).__name__) for layer in layers)
    params = f"{s.params:,} parameters ({s.trainable_params:,} trainable)" if s is not None and s.params is not None else ""
    return "; ".join(p for p in (names, params) if p) or "–"


def metric_rows(r: Any) -> list[tuple[str, str, str]]:
    """(key in `fcclass eval --json`, name, value as shown) for the overall figures."""
    rows = [("accuracy", "Accuracy", pct(r.accuracy))]
    if r.top5_accuracy is not None:
        rows.append(("top5_accuracy", "Top-5 accuracy", pct(r.top5_accuracy)))
    for avg, d in (("macro_avg", r.macro), ("weighted_avg", r.weighted)):
        for m in ("precision", "recall", "f1"):
            rows.append((f"{avg}.{m}", f"{avg.split('_')[0].title()} {m if m != 'f1' else 'F1'}", pct(d[m])))
    rows += [("macro_avg.average_precision", "Macro average precision", pct(r.macro.get("average_precision"))),
             ("log_loss", "Log loss (cross-entropy)", f"{r.loss:.4f}"),
             ("expected_calibration_error", "Expected calibration error (ECE, 15 bins)", pct(r.calibration_error))]
    return rows


def metrics(data: RunData) -> str:
    cells = "".join(f'<div class="card"><div class="v" data-key="{k}">{v}</div><div class="k">{escape(name)}</div></div>'
                    for k, name, v in metric_rows(data.report))
    return section("metrics", "Metrics", f'<div class="cards">{cells}</div>')


def per_label(data: RunData) -> str:
    r = data.report
    head = "".join(f'<th data-sort="{t}">{n}</th>' for n, t in (("Label", "text"), ("Precision", "num"), ("Recall", "num"),
                                                                   ("F1", "num"), ("Average precision", "num"), ("Support", "num")))
    body = []
    for name, m in r.per_class.items():
        vals = [(m["precision"], pct(m["precision"])), (m["accuracy"], pct(m["accuracy"])), (m["f1"], pct(m["f1"])),
                (m["average_precision"] or 0, pct(m["average_precision"])), (m["support"], f"{m['support']:,}")]
        tds = "".join(f'<td data-v="{v}">{t}</td>' for v, t in vals)
        body.append(f'<tr data-label="{escape(name)}"><td>{escape(name)}</td>{tds}</tr>')
    table = f'<table class="sortable" id="per-label-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return section("per-label", "Per-label table", table, "Click a column's heading to sort by it. Recall is what `fcclass eval` calls accuracy.")


def _heat(fraction: float, diagonal: bool) -> str:
    alpha = 0.08 + 0.85 * fraction ** 0.5 if fraction > 0 else 0  # square root: a 5% confusion stands out, not only a 50% one
    return f"background:rgba({'44,160,44' if diagonal else '214,39,40'},{alpha:.2f})"


def confusion_table(r: Any, normalise: bool, caption: str) -> str:
    names = r.class_names
    head = "".join(f'<th class="rot"><span>{escape(n)}</span></th>' for n in names)
    rows = []
    for t, name in enumerate(names):
        row = r.confusion[t].tolist()
        total = max(sum(row), 1)
        cells = "".join(f'<td style="{_heat(c / total, p == t)}" title="true {escape(name)}, predicted {escape(names[p])}: {c:,}">'
                        f'{(f"{c / total:.1%}" if normalise else f"{c:,}") if c else "·"}</td>' for p, c in enumerate(row))
        rows.append(f"<tr><th>{escape(name)}</th>{cells}</tr>")
    return (f'<table class="confusion"><caption>{escape(caption)}</caption><thead><tr><th>true \\ predicted</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


TABLE_LABELS = 25  # above this many labels a confusion matrix is drawn as an image: two 100 x 100 tables would pass 5 MB


def confusion_image(r: Any, caption: str) -> str:
    """The row-normalised matrix as a PNG heatmap (one 6 x 6 pixel square per cell; green diagonal, red elsewhere)."""
    import torch

    from fcclass.report.images import png_data_url

    rows = r.confusion.float() / r.confusion.sum(1, keepdim=True).clamp_min(1)
    eye = torch.eye(len(r.class_names), dtype=torch.bool)
    shade = (255 * (1 - rows.clamp(0, 1) ** 0.5)).to(torch.uint8)
    full = torch.full_like(shade, 255)
    image = torch.stack([torch.where(eye, shade, full), torch.where(eye, full, shade), shade])  # green on the diagonal, red off it
    image = image.repeat_interleave(6, 1).repeat_interleave(6, 2)
    return f'<figure class="matrix"><img src="{png_data_url(image, limit=None)}" alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption></figure>'


def confusion_view(r: Any, normalise: bool, caption: str) -> str:
    if len(r.class_names) > TABLE_LABELS:
        return confusion_image(r, caption + " (drawn as an image: rows are true labels, columns predicted, in label order; "
                                           "eval.json holds the counts)") if normalise else ""
    return confusion_table(r, normalise, caption)


def confusion(data: RunData) -> str:
    r = data.report
    pairs = "".join(f"<li><b>{escape(p['true'])}</b> taken for <b>{escape(p['predicted'])}</b>: {p['count']:,} "
                    f"({p['fraction_of_true']:.2%} of {escape(p['true'])})</li>" for p in r.confused_pairs(10))
    body = (f'<div class="pair">{confusion_view(r, False, "Counts")}{confusion_view(r, True, "Row-normalised (fraction of each true label)")}</div>'
            f'<h3>Most confused pairs</h3><ol id="confused-pairs">{pairs or "<li>none: every image is predicted right</li>"}</ol>')
    return section("confusion", "Confusion matrix", body)


def gallery(data: RunData) -> str:
    r = data.report
    rows, total = misclassified(r)
    thumbs, losses = thumbnails(data.images, rows), per_image_loss(r)
    names = r.class_names
    cards = []
    for row in rows:
        t, p = int(r.labels[row]), int(r.predictions[row])
        prob = float(r.probabilities[row, p])
        cards.append(f'<figure data-true="{escape(names[t])}"><img src="{thumbs[row]}" alt="image {row}">'
                     f'<figcaption>true <b>{escape(names[t])}</b><br>pred <b>{escape(names[p])}</b> {prob:.2%}<br>'
                     f'loss {float(losses[row]):.2f}</figcaption></figure>')
    options = "".join(f'<option value="{escape(n)}">{escape(n)}</option>' for n in names)
    shown = f"The {len(rows):,} of {total:,} misclassified images with the highest loss" if total > len(rows) else f"All {total:,} misclassified images"
    note = f"{shown}, highest loss first (probability: the predicted label's)."
    control = f'<label>True label: <select id="gallery-filter" data-filter="gallery"><option value="">all</option>{options}</select></label>'
    return section("misclassified", "Misclassified images", f'{control}<div class="gallery" id="gallery">{"".join(cards)}</div>', note)


def reliability(data: RunData) -> str:
    from fcclass.inference.metrics import calibration_bins

    r = data.report
    chart = reliability_chart(calibration_bins(r.probabilities, r.labels), r.calibration_error)
    return section("reliability", "Reliability", chart, "Accuracy of the images in each of 15 confidence bins; bars under the "
                   "diagonal mean over-confidence. Hover a bar for its count.")


def precision_recall(data: RunData) -> str:
    curves = pr_curves(data.report)
    chart = pr_chart([(f"{name[:12]} {ap:.2%}", rec, prec) for name, rec, prec, ap in curves])
    ap = "".join(f"<tr><td>{escape(n)}</td><td>{pct(a)}</td></tr>" for n, _, _, a in curves)
    table = f'<table class="small"><thead><tr><th>Label</th><th>Average precision</th></tr></thead><tbody>{ap}</tbody></table>'
    return section("precision-recall", "Precision–recall", f'<div class="pair">{chart}{table}</div>')


def curves(data: RunData) -> str:
    if not data.history:
        return section("curves", "Training curves", f"<p>{escape(data.history_problem or 'No epochs recorded.')}</p>")
    h, best = data.history, data.best_epoch
    epochs = [row["epoch"] for row in h]
    mark = (best, f"best epoch {best}") if best else None

    def series(*keys: str) -> list[Series]:
        return [Series(k, [e for e, row in zip(epochs, h) if k in row], [row[k] for row in h if k in row]) for k in keys if any(k in row for row in h)]

    charts = [line_chart("Loss", series("train_loss", "val_loss"), "epoch", "loss", mark),
              line_chart("Accuracy", series("train_accuracy", "val_accuracy"), "epoch", "accuracy", mark),
              line_chart("Learning rate", series("lr"), "epoch", "learning rate", mark)]
    return section("curves", "Training curves", f'<div class="pair">{"".join(charts)}</div>', "From metrics.csv; the dashed line marks the best epoch.")


def config(data: RunData) -> str:
    body = f'<details><summary>Show the resolved config</summary><pre>{escape(data.config_yaml)}</pre></details>'
    return section("config", "Config", body)


def run_sections(data: RunData) -> list[str]:
    return [header(data), metrics(data), per_label(data), confusion(data), gallery(data), reliability(data),
            precision_recall(data), curves(data), config(data)]
