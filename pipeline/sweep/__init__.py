"""Sweep stage: an Optuna study over the SynOps penalty and the design's variants that traces the
accuracy-vs-SynOps front.

Split by job: `storage` (the study's storage, its one-time preparation and resume checks), `space`
(search space, sampler, the starter trial), `lease` (exactly-once work among workers), `bases` (one
base model per variant), `objective` (one trial), `workers` (the loop and worker processes),
`confirm` (more seeds for the front), `deployment` (the front checked on the study's chip).
"""
