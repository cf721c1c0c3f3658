"""Image explorer: an image from the run or an upload → prediction, SRD saliency, per-layer relevance, the
SAE latents active on it with their iERFs on this image, and query-by-example with a box. The model runs
only when a button is pressed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402

from app import components as C  # noqa: E402
from app import data as D  # noqa: E402

N_LATENTS = 5


def image_choices(ctx, limit: int = 500) -> list[tuple[str, Path]]:
    """(label, path) of the run's images: the exported concept world, then the images the CAFE stages read
    (the user's folders, inside the root or recorded by the run)."""
    out = []
    world = ctx.stages("world")
    if world:
        try:
            for r in D.json_file(world[0] / "labels.json")[:limit]:
                out.append((f"{r['id']} · {r['class_name']}", D.confine(world[0], r["file"])))
        except C.ERRORS as e:
            C.show_error(e, "list the world images")
    seen = {p for _, p in out}
    allowed = D.run_image_folders(ctx.root, ctx.run)
    for s in ctx.stages("cafe"):
        try:
            m = D.manifest(s)
            info = D.json_file(s / "images.json")
            src = m.get("images_source") or info.get("source")
            if not src:
                continue
            folder = D.image_folder(ctx.root, src, allowed)
            for name in info.get("names", [])[:limit]:
                p = D.image_file(folder, name)
                if p not in seen and p.exists():
                    seen.add(p)
                    out.append((f"{p.relative_to(folder)} · {folder.name}", p))
        except C.ERRORS as e:
            C.show_error(e, f"list the images of {ctx.label(s, 'cafe')}")
    return out[:2 * limit]


def headless_direction(ad, x, stage: Path | None):
    """(d (K,), name) for a headless backbone (its SRD backend refuses class ids), else (None, None): the run's
    ICAT direction (``icat/<model>/direction.safetensors``, the unit mean output) when the run has one, else the
    image's own unit output (⟨output, d⟩ is then the output's norm)."""
    import torch

    from sae_cafe.srd.api import srd_backend

    backend = srd_backend(ad)
    with torch.no_grad():
        backend.prepare(x.to(ad.device), torch.float32)
    if not getattr(backend, "headless", False):
        return None, None
    if stage is not None:
        f = stage.parents[2] / "icat" / D.manifest(stage)["model"].replace("/", "_") / "direction.safetensors"
        if f.is_file():
            from safetensors.torch import load_file

            return load_file(str(f))["direction"].float(), "the run's mean output direction"
    with torch.no_grad():
        out = ad(x.to(ad.device))[0].float().cpu()
    return out / out.norm().clamp_min(1e-12), "its own unit output"


def analyse(ad, pil, stage: Path | None, sae_dir: Path | None) -> dict:
    """Run the run's model ``ad`` on one image: prediction, SRD saliency and relevance, active latents and
    their iERFs."""
    import torch

    from sae_cafe.cafe.anchor import upsample_map
    from sae_cafe.saes import encode_images
    from sae_cafe.srd import srd_ierf_from_relevance, srd_relevance, srd_saliency

    x = ad.preprocess(pil)
    img = (ad.denormalize(x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    d, dname = headless_direction(ad, x, stage)
    if d is not None:  # a headless backbone: no classes, explain ⟨output, d⟩
        with torch.no_grad():
            value = float(ad(x)[0].float() @ d.to(ad.device))
        target = d
        out = {"image": img, "output": {"output width": int(d.numel()), "direction": dname,
                                        "⟨output, direction⟩": round(value, 4)}, "target": f"⟨output, {dname}⟩"}
    else:
        with torch.no_grad():
            p = torch.softmax(ad(x), 1)[0]
        names = ad.class_names or [str(i) for i in range(p.numel())]
        top = torch.argsort(p, descending=True)[:5].tolist()
        target = top[0]
        out = {"image": img, "pred": [{"class": names[c], "probability": round(float(p[c]), 4)} for c in top],
               "target": names[target]}
    out["saliency"] = srd_saliency(ad, x, target)[0].numpy()
    names = list(ad.layers())
    layers = [n for n in names if "." not in n]
    if not 0 < len(layers) <= 6:
        layers = names[len(names) - 1::-max(1, len(names) // 4)][:4][::-1]
    if stage is not None:
        layers = sorted(set(layers) | {D.manifest(stage)["layer"]}, key=list(ad.layers()).index)
    rel = srd_relevance(ad, x, target, layers)
    out["relevance"] = {k: upsample_map(v, img.shape[:2])[0].numpy() for k, v in rel.items()}
    if stage is not None and sae_dir is not None:
        layer = D.manifest(stage)["layer"]
        sae = D.load_sae_cached(str(sae_dir), D.mtime(sae_dir), ad, ad.weights_hash or "", layer)
        _, lat, grid = encode_images(sae, ad, layer, x)
        best = lat[0].amax(0)
        lats = [s for s in torch.argsort(best, descending=True)[:N_LATENTS].tolist() if best[s] > 0]
        if lats:
            seeds = lat[0][:, lats].T.clamp(min=0).reshape(1, len(lats), *grid)
            seeds = seeds / seeds.flatten(2).sum(-1)[..., None, None].clamp(min=1e-12)
            maps = srd_ierf_from_relevance(ad, x, layer, seeds)[0]
            acts = upsample_map(lat[0][:, lats].T.reshape(len(lats), *grid), img.shape[:2])
            out["latents"] = [{"latent": s, "activation": float(best[s]), "ierf": maps[j].numpy(),
                               "act": acts[j].numpy()} for j, s in enumerate(lats)]
        else:
            out["latents"] = []
    return out


ctx = C.page_setup("Image explorer")
if ctx and ctx.run:
    stages = ctx.stages("cafe")
    stage = C.pick_stage(ctx, "cafe", "CAFE stage (model/layer)", "ie_stage") if stages else None
    models = sorted({D.manifest(s).get("model") for k in ("cafe", "icat", "saliency") for s in ctx.stages(k)}
                    - {None})
    model_name = D.manifest(stage)["model"] if stage is not None else (models[0] if models else None)
    if stage is None:
        st.info("No CAFE stage in this run: latents and query by example are unavailable; prediction and "
                "saliency still work for a known model.")
    sae_dir = None
    if stage is not None:
        m = D.manifest(stage)
        sae_dir = D.sae_dir_for(ctx.root, ctx.run, stage, m["model"], m["layer"])
        if sae_dir is None:
            st.warning(f"No SAE found for {m['model']}/{m['layer']} inside the artifact root "
                       f"(`saes/{m['model']}/{m['layer']}` or the CAFE manifest's sae_path); latents are off.")
    model, model_error = None, None
    if model_name is not None:
        try:
            model = D.run_model(ctx.root, ctx.run, model_name)
        except C.ERRORS as e:
            model_error = str(e)
            st.warning(f"The model is not run in the viewer: {e}")
    choices = image_choices(ctx)
    mode = st.radio("image", ["pick from the run", "upload"], horizontal=True, key="ie_mode",
                    index=0 if choices else 1)
    pil, key = None, None
    if mode == "upload":
        up = st.file_uploader(f"upload an image (≤ {D.MAX_UPLOAD_MB} MB; {', '.join(D.UPLOAD_TYPES)})",
                              type=list(D.UPLOAD_TYPES), key="ie_upload")
        if up is not None:
            try:
                pil = D.read_upload(up.name, up.getvalue())
                key = f"upload:{up.name}:{up.size}"
            except C.ERRORS as e:
                st.error(f"Upload rejected: {e}")
    elif choices:
        labels = [c[0] for c in choices]
        pick = st.selectbox("image from the run", labels, key="ie_pick")
        path = choices[labels.index(pick)][1]
        try:
            from PIL import Image

            pil = Image.fromarray(D.image_rgb(path))
            key = f"run:{path}"
        except C.ERRORS as e:
            C.show_error(e, f"read {path.name}")
    else:
        st.info("This run has no images to pick from (no exported world, and the CAFE stages' image folders are "
                "not readable); upload an image instead.")
    if pil is not None:
        st.image(C.upscale(np.asarray(pil.convert("RGB"))) if max(pil.size) <= 128 else pil,
                 caption=f"{pil.size[0]}×{pil.size[1]} px", width=220)
        if model_name is None:
            st.info("No model recorded in this run (no CAFE, ICAT or saliency stage).")
        elif model is None:
            st.info(f"Prediction, saliency, latents and query need the run's own {model_name} ({model_error}).")
        elif st.button(f"Run {model_name} on this image", key="ie_run", type="primary"):
            try:
                with st.spinner("prediction, SRD saliency, relevance, latents…"):
                    st.session_state["ie_result"] = (key, str(stage), analyse(model, pil, stage, sae_dir))
            except C.ERRORS as e:
                C.show_error(e, f"run {model_name}")
        res = st.session_state.get("ie_result")
        if res and res[0] == key and res[1] == str(stage):
            r = res[2]
            if "pred" in r:
                st.subheader("Prediction")
                st.dataframe(r["pred"], hide_index=True, key="ie_pred")
            else:
                st.subheader("Output (a headless backbone: a feature vector, no classes)")
                st.dataframe([r["output"]], hide_index=True, key="ie_pred")
            st.subheader(f"SRD saliency for '{r['target']}' and per-layer relevance")
            pics = [C.upscale(C.overlay(r["image"], r["saliency"], signed=True))]
            caps = ["saliency (SRD)"]
            for layer, m in r["relevance"].items():
                pics.append(C.upscale(C.overlay(r["image"], m, signed=True)))
                caps.append(f"relevance {layer}")
            st.image(pics, caption=caps, width=170)
            if "latents" in r:
                st.subheader("Latents active on this image — activation map · iERF on this image")
                if not r["latents"]:
                    st.info("No latent of the SAE fires on this image.")
                for item in r["latents"]:
                    st.image([C.upscale(C.overlay(r["image"], item["act"], "viridis")),
                              C.upscale(C.overlay(r["image"], item["ierf"], "jet"))],
                             caption=[f"latent {item['latent']} · a={item['activation']:.2f}", "iERF"], width=170)
        if stage is not None and sae_dir is not None and model is not None:
            st.subheader("Query the index by example")
            W, H = pil.size
            c = st.columns(4)
            box = (c[0].number_input("x0", 0, W - 1, 0, key="ie_x0"), c[1].number_input("y0", 0, H - 1, 0, key="ie_y0"),
                   c[2].number_input("x1", 1, W, W, key="ie_x1"), c[3].number_input("y1", 1, H, H, key="ie_y1"))
            if st.button("Query index with this box", key="ie_query"):
                from sae_cafe.cafe import query

                try:
                    m = D.manifest(stage)
                    ad = model
                    sae = D.load_sae_cached(str(sae_dir), D.mtime(sae_dir), ad, ad.weights_hash or "", m["layer"])
                    full = box == (0, 0, W, H)
                    with st.spinner("querying…"):
                        qr = query(D.cafe(stage), ad, sae, pil, box=None if full else box, k_latents=8)
                    st.session_state["ie_query_res"] = (key, str(stage), qr.to_json())
                except C.ERRORS as e:
                    C.show_error(e, "query the index")
            qres = st.session_state.get("ie_query_res")
            if qres and qres[0] == key and qres[1] == str(stage):
                q = qres[2]
                st.caption(f"{len(q['positions'])} PFV(s) selected")
                st.dataframe([{"latent": mm["latent"], "cosine": round(mm["score"], 4), "hits": mm["hits"],
                               "exemplars": ", ".join(e["image_name"] for e in mm["exemplars"][:3])}
                              for mm in q["matches"]], hide_index=True, key="ie_matches")
                if q["matches"]:
                    C.concept_card(ctx, stage, q["matches"][0]["latent"], n=4, key="ie_card")
    from app.what_if import what_if_panel  # noqa: E402
    what_if_panel(ctx, stage, sae_dir, model, pil, key)
