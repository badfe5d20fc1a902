"""The main job: dense vs decentralized experts on the Python stdlib documentation.

Composes the `dfm` library (models, training loop, partition, routers, ensembles) into the stages
of the `dfm` console script (`dfm.cli`). Modules: `config` (TOML -> validated dataclasses),
`corpus`, `tokenizer`, `sequences`, `data` (data stage), `rundir` (layout, atomic writes),
`modeling` (models, losses), `stages`, `scoring`, `evaluate`, `samples`, `report`, `plots`.
See docs/main_job.md.
"""
