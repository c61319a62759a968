"""Evidence stage: does disentangling help? Metrics, baselines and controls, report, steering."""
