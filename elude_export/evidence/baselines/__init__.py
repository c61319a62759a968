"""The families of columns an evaluation compares, one file each, registered on import.

The import order below is the report order. A new family is one more file with a
`@register_baseline` class, imported here (or registered by whoever defines it).
"""

# isort: off  (registration order is report order)
from elude_export.evidence.baselines import units  # noqa: F401
from elude_export.evidence.baselines import elude  # noqa: F401
from elude_export.evidence.baselines import random_split  # noqa: F401
from elude_export.evidence.baselines import shuffle  # noqa: F401
from elude_export.evidence.baselines import global_cluster  # noqa: F401
from elude_export.evidence.baselines import sae  # noqa: F401
# isort: on
from elude_export.evidence.baselines.base import (
    ELUDE, UNITS, Baseline, Columns, EvalSetup, SharedForward, SubunitBaseline, delta_key,
)
from elude_export.evidence.baselines.registry import (
    register_baseline, registered, registered_baselines, unregister_baseline,
)

__all__ = ["ELUDE", "UNITS", "Baseline", "Columns", "EvalSetup", "SharedForward", "SubunitBaseline", "delta_key",
           "register_baseline", "registered", "registered_baselines", "unregister_baseline"]
