"""Fitting stage: calibrate (top-M per unit), cluster (spherical k-means, the K rule), fit routers.

Named `fitting` rather than `fit` so that the public function `elude_export.fit` is never
shadowed by a submodule of the same name.
"""

from elude_export.fitting.fit import FitConfig, FitReport, fit

__all__ = ["FitConfig", "FitReport", "fit"]
