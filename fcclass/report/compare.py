"""The page of two runs on the same split: overall metrics side by side, per-label F1 deltas, both confusion
matrices, the images one gets right and the other wrong, and the config keys that differ."""

from __future__ import annotations

from html import escape
from typing import Any

from fcclass.errors import FcclassError
from fcclass.report.build import GALLERY_CAP, RunData, per_image_loss
from fcclass.report.images import thumbnails
from fcclass.report.sections import confusion_view, metric_rows, pct, section

COMPARE_NAV = [("metrics", "Metrics"), ("per-label", "Per-label F1"), ("confusion", "Confusion matrices"),
               ("disagreements", "Right in one, wrong in the other"), ("curves", "Training curves"), ("config", "Config differences")]


def check_comparable(a: RunData, b: RunData) -> None:
    """Two runs compare image by image only when they were evaluated on the same images with the same labels."""
    ra, rb = a.report, b.report
    if ra.class_names != rb.class_names:
        raise FcclassError(f"'{a.name}' and '{b.name}' have different labels ({len(ra.class_names)} vs {len(rb.class_names)}, or other "
                           "names); --compare needs two models of the same dataset.")
    if ra.num_samples != rb.num_samples or not bool((ra.labels == rb.labels).all()):
        raise FcclassError(f"'{a.name}' and '{b.name}' recorded different {ra.split} splits ({ra.num_samples:,} vs {rb.num_samples:,} "
                           "images, or other images); --compare needs runs trained on the same data with the same seed and limits.")


def compare_header(a: RunData, b: RunData) -> str:
    from fcclass.report.sections import model_line

    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(va)}</td><td>{escape(vb)}</td></tr>" for k, va, vb in (
        ("Run", str(a.run_dir), str(b.run_dir)), ("Model", model_line(a), model_line(b)),
        ("Training time", _wall(a), _wall(b)), ("Device", _device(a), _device(b))))
    split = f"{a.report.split} split, {a.report.num_samples:,} images"
    return (f'<header id="header"><h1>{escape(a.name)} vs {escape(b.name)}</h1><p>{escape(split)}</p>'
            f"<table><thead><tr><th></th><th>A</th><th>B</th></tr></thead><tbody>{rows}</tbody></table></header>")


def _wall(d: RunData) -> str:
    s = d.summary
    return f"{s.wall_seconds:,.1f} s" if s is not None and s.wall_seconds is not None else "–"


def _device(d: RunData) -> str:
    s = d.summary
    return f"{s.device}, {s.precision}" if s is not None and s.device else "–"


def _delta(va: float | None, vb: float | None, lower_is_better: bool = False) -> str:
    if va is None or vb is None:
        return "<td>–</td>"
    d = vb - va
    good = (d < 0) if lower_is_better else (d > 0)
    cls = "" if abs(d) < 5e-7 else ("better" if good else "worse")
    return f'<td class="{cls}" data-v="{d}">{d * 100:+.2f} pts</td>'


def overall(a: RunData, b: RunData) -> str:
    rows = []
    for (key, name, ta), (_, _, tb) in zip(metric_rows(a.report), metric_rows(b.report)):
        va, vb = _value(a.report, key), _value(b.report, key)
        lower = key in ("log_loss", "expected_calibration_error")
        delta = _delta(va, vb, lower) if key != "log_loss" else f"<td>{vb - va:+.4f}</td>"
        rows.append(f'<tr><td>{escape(name)}</td><td data-key="{key}">{ta}</td><td data-key="{key}">{tb}</td>{delta}</tr>')
    table = f'<table><thead><tr><th>Metric</th><th>A</th><th>B</th><th>B − A</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    return section("metrics", "Metrics", table, f"A: {escape(a.name)}; B: {escape(b.name)}. Green: B is better.")


def _value(r: Any, key: str) -> float | None:
    d = r.to_dict()
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def f1_deltas(a: RunData, b: RunData) -> str:
    pa, pb = a.report.per_class, b.report.per_class
    order = sorted(pa, key=lambda n: pb[n]["f1"] - pa[n]["f1"])
    rows = "".join(f'<tr data-label="{escape(n)}"><td>{escape(n)}</td><td data-v="{pa[n]["f1"]}">{pct(pa[n]["f1"])}</td>'
                   f'<td data-v="{pb[n]["f1"]}">{pct(pb[n]["f1"])}</td>{_delta(pa[n]["f1"], pb[n]["f1"])}</tr>' for n in order)
    head = "".join(f'<th data-sort="{t}">{n}</th>' for n, t in (("Label", "text"), ("F1 A", "num"), ("F1 B", "num"), ("B − A", "num")))
    table = f'<table class="sortable" id="f1-deltas"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
    return section("per-label", "Per-label F1", table, "Labels that got worse from A to B first; click a heading to sort.")


def both_confusions(a: RunData, b: RunData) -> str:
    body = (f'<div class="pair">{confusion_view(a.report, True, f"A: {a.name} (row-normalised)")}'
            f'{confusion_view(b.report, True, f"B: {b.name} (row-normalised)")}</div>')
    return section("confusion", "Confusion matrices", body)


def disagreements(a: RunData, b: RunData) -> str:
    import torch

    ra, rb = a.report, b.report
    right_a, right_b = ra.predictions == ra.labels, rb.predictions == rb.labels
    parts = []
    for label, only, other, data in (("A right, B wrong", right_a & ~right_b, rb, b), ("B right, A wrong", right_b & ~right_a, ra, a)):
        rows = only.nonzero().flatten()
        order = torch.argsort(per_image_loss(other)[rows], descending=True, stable=True)
        shown = rows[order][: GALLERY_CAP // 2].tolist()
        thumbs = thumbnails(a.images, shown)
        names = ra.class_names
        cards = "".join(f'<figure data-true="{escape(names[int(ra.labels[i])])}"><img src="{thumbs[i]}" alt="image {i}"><figcaption>'
                        f'true <b>{escape(names[int(ra.labels[i])])}</b><br>{"B" if data is b else "A"} said '
                        f'<b>{escape(names[int(other.predictions[i])])}</b></figcaption></figure>' for i in shown)
        cap = f" (the {len(shown):,} the wrong run was most sure of)" if len(shown) < len(rows) else ""
        parts.append(f"<h3>{label}: {len(rows):,} images{cap}</h3><div class=\"gallery\">{cards}</div>")
    return section("disagreements", "Right in one, wrong in the other", "".join(parts))


def compare_curves(a: RunData, b: RunData) -> str:
    from fcclass.report.svg import Series, line_chart

    charts = []
    for key, title in (("val_accuracy", "Validation accuracy"), ("val_loss", "Validation loss"), ("train_loss", "Training loss")):
        series = [Series(f"{tag}: {d.name}", [r["epoch"] for r in d.history if key in r], [r[key] for r in d.history if key in r], dashed=tag == "B")
                  for tag, d in (("A", a), ("B", b)) if any(key in r for r in d.history)]
        if series:
            charts.append(line_chart(title, series, "epoch", key))
    return section("curves", "Training curves", f'<div class="pair">{"".join(charts)}</div>')


def config_differences(a: RunData, b: RunData) -> str:
    from fcclass.runs.listing import config_differences as differences

    diffs, damaged = differences([a.run_dir, b.run_dir])
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(_show(va))}</td><td>{escape(_show(vb))}</td></tr>"
                   for k, (va, vb) in ((k, v) for k, v in diffs) if k != "name")
    notes = "".join(f"<p class=notes>{escape(why)}</p>" for why in damaged.values())
    rows = rows or "<tr><td colspan=3>none</td></tr>"
    table = f'<table id="config-diff"><thead><tr><th>Key</th><th>A</th><th>B</th></tr></thead><tbody>{rows}</tbody></table>'
    return section("config", "Config differences", notes + table, "The keys of config.yaml whose values differ, as `fcclass runs compare` lists them.")


def _show(v: Any) -> str:
    return "(not set)" if v is None else str(v)


def compare_sections(a: RunData, b: RunData) -> list[str]:
    check_comparable(a, b)
    return [compare_header(a, b), overall(a, b), f1_deltas(a, b), both_confusions(a, b), disagreements(a, b),
            compare_curves(a, b), config_differences(a, b)]
