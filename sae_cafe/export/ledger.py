"""The exemplar ledger of a CAFE stage as Parquet: one row per exemplar with its provenance (model, weights,
layer, image id / name / path / label, grid position and receptive-field centre), its activation and rank,
the latent's purity label and concept label (``concept*`` columns, from the stage's ``labels.json``; both
only when the stage was built with ground-truth attributes) and evidence statistics
(iERF positive / negative mass, top-10 % mass share of the iERF and of the activation map, iERF peak).

Written with pyarrow; readable by ``pandas.read_parquet`` / ``pyarrow.parquet.read_table``. The stage's
manifest is stored in the file's schema metadata (key ``sae_cafe.manifest``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifacts import run_dir
from ..cafe.metrics import purity_attributes, top_mass_share
from ..cafe.store import Cafe, load_cafe
from ..errors import ArtifactError, SaeCafeError
from ..model_record import KEY as MODEL_RECORD

#: exemplar rows per evidence chunk (iERFs are unpacked chunk by chunk)
CHUNK = 512


def _image_path(cafe: Cafe, name: str) -> str | None:
    src = cafe.images.get("source") or cafe.manifest.get("images_source")
    return str(Path(src) / name) if src else None


def ledger_table(cafe: Cafe | str | Path):
    """The ledger of a CAFE stage as a ``pyarrow.Table`` (one row per exemplar, ordered by latent then rank)."""
    import pyarrow as pa

    cafe = cafe if isinstance(cafe, Cafe) else load_cafe(cafe)
    ex = cafe.exemplars
    E = int(ex["ex_latent"].shape[0])
    key = ex["ex_latent"].long() * (int(ex["ex_rank"].max()) + 1 if E else 1) + ex["ex_rank"].long()
    order = torch.argsort(key, stable=True)
    ierf_pos, ierf_neg, top_ierf, top_act, peak_r, peak_c = [], [], [], [], [], []
    H, W = cafe.input_size
    for s in range(0, E, CHUNK):
        ids = order[s:s + CHUNK].tolist()
        maps = cafe.ierf(ids)  # (e, H, W)
        ierf_pos.append(maps.clamp(min=0).flatten(1).sum(1))
        ierf_neg.append(maps.clamp(max=0).flatten(1).sum(1))
        top_ierf.append(top_mass_share(maps, 0.1))
        top_act.append(top_mass_share(cafe.act_map(ids), 0.1))
        peak = maps.flatten(1).argmax(1)
        peak_r.append(peak // W)
        peak_c.append(peak % W)
    cat = lambda xs, dt=torch.float32: (torch.cat(xs) if xs else torch.zeros(0, dtype=dt)).tolist()  # noqa: E731
    img = ex["ex_image"][order].tolist()
    names = cafe.images["names"]
    labels = cafe.images.get("labels") or [None] * len(names)
    class_names = cafe.manifest.get("class_names") or None
    lab = [labels[i] for i in img]
    gh, gw = cafe.grid
    rows = ex["ex_row"][order].tolist()
    cols = ex["ex_col"][order].tolist()
    lat = ex["ex_latent"][order].tolist()
    purity = purity_attributes(cafe, "ierf")
    concept = {s: lab for s, lab in cafe.concept_labels.items() if lab.labelled}  # labels.json (issue 21)
    rec = cafe.manifest.get(MODEL_RECORD) or {}
    freq = cafe.latents.get("firing_frequency")
    cols_out = {
        "exemplar": pa.array(order.tolist(), pa.int64()),
        "model": pa.array([cafe.manifest["model"]] * E, pa.string()),
        "model_hash": pa.array([cafe.manifest.get("model_hash")] * E, pa.string()),
        "weights": pa.array([rec.get("weights") if isinstance(rec, dict) else None] * E, pa.string()),
        "weights_sha256": pa.array([rec.get("weights_sha256") if isinstance(rec, dict) else None] * E,
                                   pa.string()),
        "layer": pa.array([cafe.layer] * E, pa.string()),
        "latent": pa.array(lat, pa.int64()),
        "rank": pa.array(ex["ex_rank"][order].tolist(), pa.int64()),
        "activation": pa.array(ex["ex_activation"][order].float().tolist(), pa.float32()),
        "image": pa.array(img, pa.int64()),
        "image_name": pa.array([names[i] for i in img], pa.string()),
        "image_path": pa.array([_image_path(cafe, names[i]) for i in img], pa.string()),
        "image_label": pa.array([None if v is None else str(v) for v in lab], pa.string()),
        "image_class": pa.array([class_names[v] if class_names and isinstance(v, int) and 0 <= v < len(class_names)
                                 else (str(v) if v is not None else None) for v in lab], pa.string()),
        "row": pa.array(rows, pa.int64()), "col": pa.array(cols, pa.int64()),
        "grid_h": pa.array([gh] * E, pa.int64()), "grid_w": pa.array([gw] * E, pa.int64()),
        "center_y": pa.array([(r + 0.5) * H / gh for r in rows], pa.float32()),
        "center_x": pa.array([(c + 0.5) * W / gw for c in cols], pa.float32()),
        "latent_firing_frequency": pa.array([float(freq[s]) for s in lat] if freq is not None else [None] * E,
                                            pa.float32()),
        "label_attribute": pa.array([purity.get(s, {}).get("attribute") for s in lat], pa.string()),
        "label_value": pa.array([purity.get(s, {}).get("value") for s in lat], pa.int64()),
        "label_purity": pa.array([purity.get(s, {}).get("purity") for s in lat], pa.float32()),
        "concept": pa.array([concept[s].name if s in concept else None for s in lat], pa.string()),
        "concept_attribute": pa.array([concept[s].attribute if s in concept else None for s in lat], pa.string()),
        "concept_confidence": pa.array([concept[s].confidence if s in concept else None for s in lat], pa.float32()),
        "concept_raw_confidence": pa.array([concept[s].raw_confidence if s in concept else None for s in lat],
                                           pa.float32()),
        "concept_calibration": pa.array([concept[s].calibration if s in concept else None for s in lat], pa.string()),
        "ierf_positive_mass": pa.array(cat(ierf_pos), pa.float32()),
        "ierf_negative_mass": pa.array(cat(ierf_neg), pa.float32()),
        "ierf_top10_share": pa.array(cat(top_ierf), pa.float32()),
        "act_top10_share": pa.array(cat(top_act), pa.float32()),
        "ierf_peak_y": pa.array(cat(peak_r, torch.long), pa.int64()),
        "ierf_peak_x": pa.array(cat(peak_c, torch.long), pa.int64()),
    }
    table = pa.table(cols_out)
    meta = {"sae_cafe.manifest": json.dumps(cafe.manifest, default=str), "sae_cafe.stage": str(cafe.path)}
    return table.replace_schema_metadata(meta)


def export_ledger(cafe_dir: str | Path, out: str | Path) -> Path:
    """Write the ledger of the CAFE stage at ``cafe_dir`` to the Parquet file ``out`` (atomically); return it."""
    import pyarrow.parquet as pq

    out = Path(out)
    if out.suffix != ".parquet":
        raise SaeCafeError(f"ledger output {out} must end in .parquet")
    table = ledger_table(cafe_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(out)
    return out


def cafe_stages(run: str, root: str | Path | None = None) -> list[Path]:
    """The finished CAFE stages of a run (``<root>/<run>/cafe/<model>/<layer>/``)."""
    base = run_dir(run, root) / "cafe"
    stages = sorted(p.parent for p in base.glob("*/*/manifest.json")) if base.exists() else []
    if not stages:
        raise ArtifactError(f"no CAFE stage under {base}; build one with `sae-cafe cafe --run {run}`")
    return stages


def export_run_ledgers(run: str, root: str | Path | None = None, out_dir: str | Path | None = None) -> list[Path]:
    """One ledger per CAFE stage of ``run``: ``<out_dir>/ledger_<model>_<layer>.parquet`` (default
    ``<root>/<run>/export/``)."""
    out_dir = Path(out_dir) if out_dir is not None else run_dir(run, root) / "export"
    return [export_ledger(s, out_dir / f"ledger_{s.parent.name}_{s.name}.parquet") for s in cafe_stages(run, root)]
