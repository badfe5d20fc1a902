"""The engine of the jobs: config machinery, run directory, stage graph, training, evaluate-and-report.

Modules: `config` (TOML -> validated dataclasses; `StageConfig`, `MeshSection`, `JobConfig`),
`rundir` (layout, atomic writes, config pinning), `task` (the `Task` interface a job implements),
the stages for any task: `graph` (stage names, run options, the partition's assignments, markers),
`clustering` (the partition stage), `training` (training stages), `evaluation` (evaluate, export)
and `pipeline` (their order: `run_all`); `batches` (deterministic batches, compute-matched step
allocation), `tokenizer` (byte-level BPE trained on the run's data), `plots` (shared figures).
The engine imports `dfm`, never a task; tasks (`experiments.text`, `experiments.mllm`) import it.
"""
