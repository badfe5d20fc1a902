"""The jobs of `dfm`: one engine, two tasks, and the `dfm` console script.

- `engine`: config machinery, run directory, the stage graph for any `Task`, training,
  evaluate-and-report (imports `dfm`, never a task).
- `text`: the main job, dense vs decentralized experts on the Python stdlib documentation.
- `mllm`: the multimodal job, LLaVA-style experts partitioned by image features.
- `registry`: which task runs a config (its `task` key); `cli`: the `dfm` command.
See docs/design.md for the map, docs/main_job.md and docs/multimodal.md for the jobs.
"""
