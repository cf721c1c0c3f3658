"""Files of a saliency benchmark stage: table (CSV, text), results JSON, curve and example plots, manifest.

Every result file records the metric definition set it was computed with (``definitions``: ``"source"`` or
``"paper"``, docs/metrics.md): a column of ``table*.csv``, a key of ``results*.json``, the first line of
``table*.txt`` and the manifest's config. ``res`` is a :class:`sae_cafe.evaluation.benchmark.BenchmarkResult`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import atomic_write_bytes, atomic_write_json, write_manifest
from .definitions import get_definitions

CURVES = ("insertion_curve", "deletion_curve")


def plot_curves(res, path: Path) -> None:
    """Mean insertion and deletion curves per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, k in zip(axes, CURVES):
        for m, c in res.curves.items():
            v = c[k][np.isfinite(c[k]).all(1)]
            if len(v):
                ax.plot(np.linspace(0, 1, v.shape[1]), v.mean(0), label=m, lw=2.2 if m.startswith("srd") else 1.2)
        ax.set_xlabel("fraction of pixels " + ("inserted" if k.startswith("ins") else "deleted"))
        ax.set_ylabel("p(target)")
        ax.set_title(f"{res.model}: {k.split('_')[0]} ({res.config.definitions} definitions)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(res, path: Path) -> None:
    """Grid: rows = example images, columns = the image and each method's map (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in res.methods if m in res.examples]
    E = 0 if res.example_images is None else len(res.example_images)
    if not E or not methods:
        return
    fig, axes = plt.subplots(E, len(methods) + 1, figsize=(1.3 * (len(methods) + 1), 1.3 * E), squeeze=False)
    for r in range(E):
        axes[r, 0].imshow(res.example_images[r])
        for c, m in enumerate(methods, 1):
            a = res.examples[m][r]
            lim = float(np.abs(a).max()) or 1.0
            axes[r, c].imshow(a, cmap="bwr", vmin=-lim, vmax=lim)
            if r == 0:
                axes[r, c].set_title(m, fontsize=6, rotation=30)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io

    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _nan_list(v) -> list:
    return [None if not np.isfinite(a) else float(a) for a in np.atleast_1d(np.asarray(v, dtype=float))]


def _write_tables(res, d: Path, suffix: str) -> None:
    """table{suffix}.csv, results{suffix}.json and table{suffix}.txt of one result."""
    defs = get_definitions(res.config.definitions)
    rows = [{"definitions": defs.name, **r} for r in res.table()]
    write_csv(rows, d / f"table{suffix}.csv")
    per_image = {m: {k: _nan_list(v) for k, v in s.items()} | {"seconds": _nan_list(res.seconds[m])}
                 for m, s in res.scores.items()}
    mean_curves = {m: {k: _nan_list(np.nanmean(c[k], 0)) for k in CURVES} for m, c in res.curves.items()}
    atomic_write_json(d / f"results{suffix}.json", {
        "model": res.model, "definitions": defs.name, "definitions_description": defs.description,
        "config": res.config,
        "table": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                  for r in rows],
        "image_ids": res.image_ids, "per_image": per_image, "mean_curves": mean_curves,
        "not_applicable": res.not_applicable, "errors": res.errors, "postprocess": defs.postprocess})
    atomic_write_bytes(d / f"table{suffix}.txt",
                       f"definitions: {defs.name} ({defs.description})\n{res.format_table()}\n".encode())


def write_saliency_benchmark(res, directory: str | Path, config: dict | None = None,
                             upstream: dict | None = None, others: list | tuple = ()) -> None:
    """Write table.csv, results.json, table.txt (of ``res``), curves.png, examples.png and the manifest; with
    ``others`` (results of the same run under the other definition set) also ``table_<definitions>.csv``,
    ``results_<definitions>.json`` and ``table_<definitions>.txt`` of every result, ``res`` included."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_tables(res, d, "")
    for r in (res, *others) if others else ():
        _write_tables(r, d, f"_{r.config.definitions}")
    plot_curves(res, d / "curves.png")
    plot_examples(res, d / "examples.png")
    write_manifest(d, "saliency", {"benchmark": res.config, **(config or {})}, upstream,
                   model=res.model, methods=res.methods, n_images=len(res.image_ids),
                   definitions=[r.config.definitions for r in (res, *others)])
