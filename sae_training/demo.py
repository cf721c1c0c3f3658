"""``sae-cafe demo`` (kept as the entry point ``sae_training.demo:register``): the pipeline now lives in
:mod:`sae_training.pipeline`; this module re-exports its public names."""

from __future__ import annotations

import sys

from .pipeline import (  # noqa: F401 - re-exports
    REPORT,
    CafeSettings,
    Demo,
    DemoConfig,
    ExtractSettings,
    ICATSettings,
    ModelSettings,
    Pipeline,
    Run,
    RunConfig,
    SAESettings,
    SaliencySettings,
    Stage,
    StageResult,
    WorldSettings,
    default_config_path,
    load_config,
    main,
    register,
)

if __name__ == "__main__":
    sys.exit(main())
