"""The text job: dense vs decentralized experts on the Python standard library's documentation.

`task.TextTask` implements the engine's `Task` (`experiments.engine`). Modules: `config`
(TOML -> validated dataclasses), `corpus`, `sequences`, `data` (data stage, `TextData`),
`modeling` (models, losses), `scoring` (per-token log-probabilities, masked ELBO), `evaluate`,
`samples`, `report`, `plots`. See docs/main_job.md.
"""
