"""The page: one HTML file with its styles, charts and images inside it, readable from disk with no request and no
script (a few lines of script sort the tables and filter the gallery)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from fcclass.version import __version__

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1280px;padding:16px 24px;color:#222}
h1{margin:0 0 8px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
nav a{margin-right:12px}dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0}dt{font-weight:600;color:#555}
dd{margin:0;word-break:break-all}.note{color:#555}.notes{color:#8a5a00}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:150px}
.card .v{font-size:20px;font-weight:600}.card .k{color:#555;font-size:12px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
td:first-child,th:first-child{text-align:left}th[data-sort]{cursor:pointer;background:#f4f4f4}th[data-sort]:hover{background:#e8e8e8}
caption{text-align:left;font-weight:600;padding:4px 0}.confusion td{min-width:34px;text-align:center;font-size:12px}
.rot{height:90px;vertical-align:bottom;white-space:nowrap}.rot span{writing-mode:vertical-rl;transform:rotate(180deg)}
.pair{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.gallery{display:flex;flex-wrap:wrap;gap:8px;margin-top:8px}figure{margin:0;width:112px;font-size:11px;text-align:center}
figure img{width:64px;height:64px;image-rendering:pixelated;object-fit:contain;border:1px solid #ccc}
.chart text{font-size:11px;fill:#333}.chart .t{font-size:13px;font-weight:600}.chart .frame{fill:none;stroke:#999}
.chart .grid{stroke:#eee}.chart .mark{stroke:#d62728;stroke-dasharray:4 3}.chart .marktext{fill:#d62728}
header td{text-align:left}figure.matrix{width:auto}
figure.matrix img{width:auto;height:auto;max-width:600px;image-rendering:pixelated}
pre{background:#f7f7f7;padding:10px;overflow:auto}.better{color:#2a7d2a}.worse{color:#c62828}footer{margin-top:32px;color:#777}
"""

SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th[data-sort]").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var up = th.getAttribute("data-dir") !== "asc";
      table.querySelectorAll("th[data-sort]").forEach(function (h) { h.removeAttribute("data-dir"); });
      th.setAttribute("data-dir", up ? "asc" : "desc");
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col], c;
        if (th.getAttribute("data-sort") === "num") { c = parseFloat(x.getAttribute("data-v")) - parseFloat(y.getAttribute("data-v")); }
        else { c = x.textContent.localeCompare(y.textContent); }
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.querySelectorAll("select[data-filter]").forEach(function (select) {
  select.addEventListener("change", function () {
    document.querySelectorAll("#" + select.getAttribute("data-filter") + " figure").forEach(function (f) {
      f.style.display = !select.value || f.getAttribute("data-true") === select.value ? "" : "none";
    });
  });
});
"""

NAV = [("metrics", "Metrics"), ("per-label", "Per-label table"), ("confusion", "Confusion matrix"),
       ("misclassified", "Misclassified images"), ("reliability", "Reliability"), ("precision-recall", "Precision–recall"),
       ("curves", "Training curves"), ("config", "Config")]


def page(title: str, parts: list[str], nav: list[tuple[str, str]] = NAV) -> str:
    links = "".join(f'<a href="#{key}">{escape(name)}</a>' for key, name in nav)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{CSS}</style></head><body><nav>{links}</nav>"
            f'{"".join(parts)}<footer>Written by fcclass {__version__} (`fcclass report`). Everything on this page is in this one '
            f"file: it needs no network.</footer><script>{SCRIPT}</script></body></html>\n")


def write_page(text: str, out: Path) -> Path:
    """The page, written as every output a user names is (files.write_output: atomic, never through a symlink or
    into a folder, a failure named with its cause)."""
    from fcclass.files import write_output

    write_output(out, text, "the report")
    return out
