"""Evaluation stages chained after pretraining; the chain is data (`eval.stages`), not code.

Each stage module registers a `Stage`: its name, the stages it needs first, the config sections it
reads, and `run(ctx) -> metrics`. `run_stages` orders the requested stages after their
requirements, skips those whose inputs did not change since the last run, and writes each stage's
artifacts under `<run>/stages/<name>/`. Importing this package registers all.
"""
from pipelines.stages.registry import STAGES, EvalConfig, StageContext, run_stages
from pipelines.stages import embed, knn, linear  # noqa: F401,E402  (registration side effects)
from pipelines.stages import finetune, lowshot, cluster, tsne, robustness  # noqa: F401,E402
from pipelines.stages import efficiency  # noqa: F401,E402
from pipelines.stages import pretext  # noqa: F401,E402

__all__ = ["STAGES", "EvalConfig", "StageContext", "run_stages"]
