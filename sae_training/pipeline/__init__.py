"""The sae-cafe pipeline (``sae-cafe demo``): world → SRD → activations → SAEs → CAFE → ICAT → saliency
benchmark into ``<root>/<run>/``, one module per stage kind.

    config.py     RunConfig (alias DemoConfig) from the stages' frozen settings, the TOML loader
    context.py    RunContext: device, models, images, labels shared by the stages
    dag.py        Stage, Pipeline (skip / build / fail / block), <run>/pipeline_state.json
    world.py srd.py extract.py sae.py cafe.py icat.py saliency.py   the stage kinds (settings + builders)
    runner.py     Run: plans the DAG and runs it; report.py: the table, reasons and demo_report.json
    cli.py        ``sae-cafe demo``
    configs/      the shipped run configs (package data; user copies in the repository's configs/)

Layout written::

    world/                     the concept world (sae_cafe.world.write_world), or a user's image folder
    srd/<model>/               SRD saliency maps of a few images (maps.png, maps.safetensors)
    acts/<model>/<layer>/      PFV shards of every layer in one pass (sae_cafe.activations)
    saes/<model>/<layer>/      small sae-lens SAEs + held-out metrics (sae_training.train_sae)
    cafe/<model>/<layer>/      top-k exemplars, iERFs, FAISS, concept cards (sae_cafe.cafe)
    icat/<model>/              concept graphs, routes, correct/misclassified/adversarial cases (sae_cafe.icat)
    saliency/<model>/          saliency benchmark with the cheap baselines (sae_cafe.evaluation)
    pipeline_state.json        per output: stage key, manifest sha256, key metrics, notes (skip bookkeeping)
    demo_report.json           per-stage status, seconds, key metrics, notes, reasons and errors of the last run

Incremental: a stage whose outputs all carry, in ``pipeline_state.json``, the stage's current key and
their current manifest hash is skipped (``--fresh`` rebuilds everything); finished manifests are never
rewritten. A stage that fails is reported with its error, the stages depending on it are marked blocked,
the others still run, and the command exits 1. Sizes that do not fit the data are fitted before a stage
works (IVF → Flat, SAE batch size), with a note printed under the stage and kept in the report.
"""

from .cafe import CafeSettings
from .cli import main, register
from .config import (
    DEFAULT_CONFIG_NAME,
    DemoConfig,
    ModelSettings,
    RunConfig,
    config_files,
    default_config_path,
    load_config,
)
from .context import RunContext
from .dag import STATE, Pipeline, PipelineState, Stage, StageResult
from .extract import ExtractSettings
from .icat import ICATSettings
from .report import REPORT
from .runner import Demo, Run
from .sae import SAESettings
from .saliency import SaliencySettings
from .world import WorldSettings

__all__ = ["DEFAULT_CONFIG_NAME", "REPORT", "STATE", "CafeSettings", "Demo", "DemoConfig", "ExtractSettings",
           "ICATSettings", "ModelSettings", "Pipeline", "PipelineState", "RunConfig", "RunContext", "Run",
           "SAESettings", "SaliencySettings", "Stage", "StageResult", "WorldSettings", "config_files",
           "default_config_path", "load_config", "main", "register"]
