"""Shared help texts of the ``sae-cafe`` subcommands: one formatter that shows each default once, and the
wording of the options every subcommand shares (run, root, model, weights, device)."""

from __future__ import annotations

import argparse

ROOT_HELP = ("artifact root holding the runs (default: $SAE_CAFE_ROOT when set, else ./indexes); a run's "
             "stages live in <root>/<run>/<stage>/<model>/...")
RUN_HELP = "run name: artifacts go to / are read from <root>/<run>/"
MODEL_HELP = "registered model name, e.g. resnet50 or mini_resnet (see sae_cafe.models.list_adapters())"
WEIGHTS_HELP = ("local weights file (.pth/.pt/.safetensors; nothing is downloaded). Default: the weights the "
                "run recorded when it has a stage of this model, else the model's shipped weights (mini models), "
                "else random initialisation with a warning")
DEVICE_HELP = "torch device, e.g. cpu or cuda:0 (default: cpu)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` once: only for options whose help does not already mention a default, and never
    for ``None``/``False`` defaults (an unset option or a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) \
                or action.default == [] or not action.option_strings or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def add_common(p: argparse.ArgumentParser, run_default: str | None = "demo", model_required: bool = True,
               weights: bool = True, device: bool = True) -> None:
    """``--run``, ``--root``, ``--model`` (and ``--weights``, ``--device``) with the shared help texts."""
    if run_default is None:
        p.add_argument("--run", required=True, help=RUN_HELP)
    else:
        p.add_argument("--run", default=run_default, help=RUN_HELP + f" (default: {run_default})")
    p.add_argument("--root", default=None, help=ROOT_HELP)
    p.add_argument("--model", required=model_required, help=MODEL_HELP)
    if weights:
        p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    if device:
        p.add_argument("--device", default=None, help=DEVICE_HELP)
