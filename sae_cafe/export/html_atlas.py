"""A static, self-contained HTML atlas of a run: every latent's concept card (statistics, purity label, pushed
classes, top exemplars with their iERF overlays as PNG data URIs) for each CAFE stage, and the ICAT class
graphs as inline SVG whose nodes link to the cards.

One file, no server, no script, no network request: every image is a ``data:`` URI and a Content-Security-
Policy (``default-src 'none'``) forbids any fetch. Size cap: :data:`DEFAULT_MAX_BYTES` (25 MB) by default; when
the page would be larger the exemplars per card are thinned (6 → 3 → 2 → 1 → 0) and the page says so; a page
still over the cap without exemplars raises :class:`~sae_cafe.errors.SaeCafeError`.

The SVG graph drawing is hand-written (a few lines of layered layout) so the page needs no plotting library
in the browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from ..artifacts import read_manifest, run_dir
from ..cafe.cards import card_data
from ..cafe.store import Cafe, load_cafe
from ..errors import ArtifactError, SaeCafeError
from .ledger import cafe_stages

DEFAULT_MAX_BYTES = 25 * 2**20
THUMB_PX = 96
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}h2{border-bottom:1px solid #aaa}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ccc;border-radius:6px;padding:6px;width:430px}
.card h3{margin:2px 0;font-size:15px}.card p{margin:2px 0;font-size:12px}.ex{display:inline-block;margin:2px;
font-size:10px;text-align:center}.ex img{display:block;image-rendering:pixelated}.note{color:#a60}
svg text{font-size:10px}"""


def _png_uri(rgb: np.ndarray, px: int) -> str:
    from PIL import Image

    im = Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8))
    im = im.resize((px, max(1, round(px * im.height / im.width))), Image.NEAREST if im.width < px else Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _overlay(img: np.ndarray, heat: np.ndarray) -> np.ndarray:
    import matplotlib

    h = np.clip(heat, 0, None)
    h = h / h.max() if h.max() > 0 else h
    return 0.45 * img + 0.55 * matplotlib.colormaps["jet"](h)[..., :3]


class _Thumbs:
    """Exemplar image and iERF-overlay data URIs, computed once per exemplar (reused while thinning)."""

    def __init__(self, cafe: Cafe, px: int, notes: list[str]):
        from ..image_source import ImageSource

        self.cafe, self.px, self.cache = cafe, px, {}
        src = cafe.images.get("source") or cafe.manifest.get("images_source")
        self.src = ImageSource(src) if src and Path(src).exists() else None
        if self.src is None:
            notes.append(f"{cafe.manifest['model']}/{cafe.layer}: image folder {src!r} not found; exemplars are "
                         "shown as their iERF on grey")

    def get(self, e: int) -> tuple[str, str]:
        if e not in self.cache:
            import torch
            import torch.nn.functional as F

            H, W = self.cafe.input_size
            rec = self.cafe.record(e)
            if self.src is not None:
                pil = self.src.pil(rec.image).convert("RGB")
                img = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]
                img = F.interpolate(img, size=(H, W), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
            else:
                img = np.full((H, W, 3), 0.5, dtype=np.float32)
            ierf = self.cafe.ierf(e)[0].numpy()
            self.cache[e] = (_png_uri(img, self.px), _png_uri(_overlay(img, ierf), self.px))
        return self.cache[e]


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.3g}" if isinstance(v, float) else html.escape(str(v)))


def card_anchor(model: str, layer: str, latent: int) -> str:
    return f"card-{model}-{layer}-{int(latent)}".replace("/", "_").replace(" ", "_")


def _card_html(cafe: Cafe, latent: int, n: int, thumbs: _Thumbs) -> str:
    c = card_data(cafe, latent, n)
    s = c["stats"]
    model = cafe.manifest["model"]
    parts = [f'<div class="card" id="{card_anchor(model, cafe.layer, latent)}"><h3>Latent {latent}</h3>',
             f"<p>fires on {_fmt(100 * (s.get('firing_frequency') or 0.0))} % of PFVs · iERF top-10 % mass "
             f"{_fmt(s.get('concentration_ierf'))} vs activation {_fmt(s.get('concentration_act'))}</p>"]
    if c.get("concept") and c["concept"]["name"]:
        k = c["concept"]
        parts.append(f"<p><b>concept:</b> {html.escape(k['name'])} (confidence {_fmt(k['confidence'])}, "
                     f"{html.escape(k['calibration'])}; runner-up {html.escape(str(k['runner_up']))})</p>")
    if c["purity"]:
        p = c["purity"]
        parts.append(f"<p><b>label:</b> {html.escape(str(p['attribute']))} = {p['value']} "
                     f"(iERF purity {_fmt(p['purity'])})</p>")
    if c["pushes"]:
        parts.append("<p>pushes " + ", ".join(f"{html.escape(str(q['class']))} ({q['logit']:+.2f})"
                                              for q in c["pushes"]["up"]) + "</p>")
    if not cafe.exemplar_ids(latent):
        parts.append("<p>no exemplars (dead latent)</p>")
    for ex in c["exemplars"]:
        img, ierf = thumbs.get(ex["id"])
        cap = html.escape(f"#{ex['rank']} {ex['image_name'][:20]} a={ex['activation']:.2f}")
        parts.append(f'<span class="ex"><img src="{img}" alt="exemplar"><img src="{ierf}" alt="iERF">{cap}</span>')
    parts.append("</div>")
    return "".join(parts)


def graph_svg(data: dict, width: int = 900, row_h: int = 34) -> str:
    """An ICAT graph (node-link JSON) as inline SVG: one column per depth (layers left → class right), edge width
    ∝ |weight| (blue positive, red negative); latent nodes link to ``#card-<model>-<layer>-<latent>``."""
    nodes, links = data.get("nodes", []), data.get("links", [])
    model = str(data.get("graph", {}).get("model", ""))
    depths = sorted({int(n.get("depth", 0)) for n in nodes})
    cols = {d: [n for n in nodes if int(n.get("depth", 0)) == d] for d in depths}
    tall = max((len(v) for v in cols.values()), default=1)
    height = 30 + row_h * tall
    dx = (width - 160) / max(1, len(depths) - 1)
    pos = {}
    for i, d in enumerate(depths):
        for j, n in enumerate(cols[d]):
            pos[n["id"]] = (80 + i * dx, 25 + row_h * (j + 0.5) * tall / len(cols[d]))
    wmax = max((abs(float(e.get("weight", 0))) for e in links), default=1.0) or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}">']
    for e in links:
        if e["source"] in pos and e["target"] in pos:
            (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
            w = float(e.get("weight", 0))
            out.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="'
                       f'{"#2a6fdb" if w >= 0 else "#d33"}" stroke-opacity="0.7" stroke-width="'
                       f'{0.5 + 5 * abs(w) / wmax:.2f}"><title>{w:+.4f}</title></line>')
    for n in nodes:
        x, y = pos[n["id"]]
        label = html.escape(str(n.get("label", n["id"])))
        circle = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="{"#f4b400" if n.get("kind") == "class" else "#7bb"}"'
                  f' stroke="#333"/><text x="{x + 10:.1f}" y="{y + 4:.1f}">{label}</text>')
        if n.get("kind") == "latent":
            href = "#" + card_anchor(model, str(n.get("layer")), int(n.get("latent", -1)))
            circle = f'<a href="{href}">{circle}</a>'
        out.append(circle)
    out.append("</svg>")
    return "".join(out)


def _graphs_html(run_path: Path, notes: list[str]) -> str:
    parts = []
    for gdir in sorted((run_path / "icat").glob("*/graphs")):
        for f in sorted(gdir.glob("class_*.json"), key=lambda p: int(p.stem.split("_")[1])
                        if p.stem.split("_")[1].isdigit() else 0):
            try:
                data = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                notes.append(f"{f}: unreadable graph ({e}); skipped")
                continue
            g = data.get("graph", {})
            title = f"{gdir.parent.name}: class graph {html.escape(str(g.get('root', f.stem)))} " \
                    f"({g.get('n_images', '?')} images, {g.get('method', '?')})"
            parts.append(f"<h3>{title}</h3>{graph_svg(data)}")
            sup = gdir / "supernodes" / f.name  # the same graph collapsed onto supernodes (issue 21)
            if sup.exists():
                try:
                    parts.append(f"<h4>collapsed onto supernodes</h4>{graph_svg(json.loads(sup.read_text()))}")
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    notes.append(f"{sup}: unreadable graph ({e}); skipped")
    return "".join(parts) or "<p>No ICAT class graphs in this run.</p>"


def _page(run: str, sections: list[str], graphs: str, notes: list[str]) -> str:
    note = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>sae-cafe atlas: {html.escape(run)}</title><style>{CSS}</style></head><body>"
            f"<h1>sae-cafe atlas: run {html.escape(run)}</h1>{note}<h2>ICAT class graphs</h2>{graphs}"
            + "".join(sections) + "</body></html>")


def export_html(run: str, root: str | Path | None = None, out: str | Path | None = None,
                max_bytes: int = DEFAULT_MAX_BYTES, n_exemplars: int = 6, thumb_px: int = THUMB_PX) -> Path:
    """Write the atlas of ``run`` to ``out`` (default ``<root>/<run>/export/atlas.html``); return its path.

    ``max_bytes`` caps the file size (default 25 MB): exemplars per card are thinned until the page fits,
    recorded in a note at the top of the page.
    """
    if max_bytes <= 0 or n_exemplars < 0:
        raise SaeCafeError(f"max_bytes must be > 0 and n_exemplars ≥ 0, got {max_bytes}, {n_exemplars}")
    rp = run_dir(run, root)
    if not rp.exists():
        raise ArtifactError(f"run {run!r} not found at {rp}; pass --root / --run of an existing run")
    out = Path(out) if out is not None else rp / "export" / "atlas.html"
    notes: list[str] = []
    cafes = []
    for s in cafe_stages(run, root):
        read_manifest(s, "cafe")
        cafes.append(load_cafe(s))
    thumbs = {c.path: _Thumbs(c, thumb_px, notes) for c in cafes}
    graphs = _graphs_html(rp, notes)
    steps = [n_exemplars] + [k for k in (3, 2, 1, 0) if k < n_exemplars]
    for n in steps:
        sections = []
        for c in cafes:
            cards = "".join(_card_html(c, s, n, thumbs[c.path]) for s in range(c.n_latents))
            sections.append(f"<h2>{html.escape(c.manifest['model'])} / {html.escape(c.layer)}: {c.n_latents} "
                            f"latents</h2><div class=\"cards\">{cards}</div>")
        page_notes = notes + ([f"exemplars thinned from {n_exemplars} to {n} per card to stay under the "
                               f"{max_bytes / 2**20:.1f} MB cap"] if n < n_exemplars else [])
        text = _page(run, sections, graphs, page_notes).encode()
        if len(text) <= max_bytes:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.part")
            tmp.write_bytes(text)
            tmp.replace(out)
            return out
    raise SaeCafeError(f"the atlas of run {run!r} is {len(text) / 2**20:.1f} MB even without exemplars, over the "
                       f"{max_bytes / 2**20:.1f} MB cap; raise --max-mb")
