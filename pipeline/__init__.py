"""synops-pipeline: SynOps-regularised training and accuracy-vs-SynOps Pareto fronts."""
