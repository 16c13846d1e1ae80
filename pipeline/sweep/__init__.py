"""Sweep stage: an Optuna study over the SynOps penalty that traces the accuracy-vs-SynOps front.

Split by job: `storage` (the study's storage and its one-time preparation), `space` (search space
and sampler), `objective` (one trial), `workers` (the loop and worker processes).
"""
