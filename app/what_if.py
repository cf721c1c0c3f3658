"""The Image explorer's "what if" panel: scale a latent active on the current image (0 = ablate, 1 = unchanged,
> 1 = amplify) at every position of its layer, through ``run_with_saes(..., interventions=...)`` with the SAE
error term kept, and show the top classes before / after and the saliency of the predicted class before /
after. The model runs only when the panel's button is pressed.

Saliency under an intervention: SRD propagates through the model's own modules and cannot see a latent edit
spliced in by a hook, so the panel seeds the intervened layer with the class relevance of the (intervened)
forward pass, activation × gradient of the class logit at that layer, and propagates it to the pixels with
SRD (``srd_ierf_from_relevance``; the layers below the edit are unchanged, so that part is exact SRD). Before
and after use the same recipe, so the two maps compare like with like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from app import components as C
from app import data as D

TOP = 5


def intervened_saliency(ad, sae, layer: str, x, target: int, interventions) -> np.ndarray:
    """(H, W) saliency of class ``target`` for one image ``x`` (1, 3, H, W) with ``interventions`` at ``layer``:
    activation × gradient of the logit at the layer's output (intervened forward), propagated with SRD."""
    import torch

    from sae_cafe.saes import run_with_saes
    from sae_cafe.srd import srd_ierf_from_relevance

    with torch.enable_grad():
        x = x.detach()
        logits, acts = run_with_saes(ad, x, {layer: sae}, check=False, interventions=interventions,
                                     return_activations=[layer])
        act = acts[layer]
        (grad,) = torch.autograd.grad(logits[0, target], act)
    rel = (act * grad).detach()
    seed = rel.sum(1) if rel.ndim == 4 else rel.sum(-1)  # CNN (1, h, w); ViT (1, T) over all tokens
    maps = srd_ierf_from_relevance(ad, x, layer, seed[:, None])
    return maps[0, 0].numpy()


def what_if(ad, sae, layer: str, pil, latent: int, scale: float) -> dict:
    """Logits, top classes and saliency before / after scaling ``latent`` by ``scale`` on image ``pil``."""
    import torch

    from sae_cafe.interventions import Intervention
    from sae_cafe.saes import run_with_saes

    x = ad.preprocess(pil)
    iv = [Intervention(layer, int(latent), "scale", float(scale))]
    with torch.no_grad():
        before = ad(x)[0]
        after = run_with_saes(ad, x, {layer: sae}, check=False, interventions=iv)[0]
    names = ad.class_names or [str(i) for i in range(before.numel())]
    pb, pa = torch.softmax(before, 0), torch.softmax(after, 0)
    classes = list(dict.fromkeys(torch.argsort(before, descending=True)[:TOP].tolist()
                                 + torch.argsort(after, descending=True)[:TOP].tolist()))
    table = [{"class": names[c], "logit before": round(float(before[c]), 4), "logit after": round(float(after[c]), 4),
              "change": round(float(after[c] - before[c]), 4), "p before": round(float(pb[c]), 4),
              "p after": round(float(pa[c]), 4)} for c in classes]
    cb, ca = int(before.argmax()), int(after.argmax())
    img = (ad.denormalize(x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    noop = [Intervention(layer, int(latent), "scale", 1.0)]
    return {"table": table, "pred_before": names[cb], "pred_after": names[ca], "image": img,
            "sal_before": intervened_saliency(ad, sae, layer, x, cb, noop),
            "sal_after": intervened_saliency(ad, sae, layer, x, ca, iv), "latent": int(latent), "scale": float(scale)}


def what_if_panel(ctx, stage: Path | None, sae_dir: Path | None, model, pil, key: str | None) -> None:
    """The panel (shown under the Image explorer when a CAFE stage, its SAE, the model and an image are there)."""
    if stage is None or sae_dir is None or model is None or pil is None:
        return
    st.subheader("What if: ablate or amplify a latent")
    res = st.session_state.get("ie_result")
    if not (res and res[0] == key and res[1] == str(stage)) or not res[2].get("latents"):
        st.info("Run the model on this image first: the panel offers the latents active on it.")
        return
    lats = [item["latent"] for item in res[2]["latents"]]
    c = st.columns(2)
    latent = c[0].selectbox("latent (active on this image)", lats, key="wi_latent")
    scale = c[1].slider("scale (0 = ablate, 1 = unchanged, > 1 = amplify)", 0.0, 4.0, 0.0, 0.25, key="wi_scale")
    if st.button(f"Apply: latent {latent} × {scale:g}", key="wi_run"):
        try:
            layer = D.manifest(stage)["layer"]
            sae = D.load_sae_cached(str(sae_dir), D.mtime(sae_dir), model, model.weights_hash or "", layer)
            with st.spinner("intervened forward and saliency…"):
                st.session_state["wi_result"] = (key, str(stage), what_if(model, sae, layer, pil, latent, scale))
        except C.ERRORS as e:
            C.show_error(e, f"intervene on latent {latent}")
    out = st.session_state.get("wi_result")
    if out and out[0] == key and out[1] == str(stage):
        r = out[2]
        st.caption(f"latent {r['latent']} × {r['scale']:g} at every position (SAE error term kept): prediction "
                   f"{r['pred_before']} → {r['pred_after']}")
        st.dataframe(r["table"], hide_index=True, key="wi_table")
        st.image([C.upscale(C.overlay(r["image"], r["sal_before"], signed=True)),
                  C.upscale(C.overlay(r["image"], r["sal_after"], signed=True))],
                 caption=[f"saliency '{r['pred_before']}' before", f"saliency '{r['pred_after']}' after"], width=170)
