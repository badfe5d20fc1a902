"""The engine of the jobs: config machinery, run directory, stage graph, training, evaluate-and-report.

Modules: `config` (TOML -> validated dataclasses; `StageConfig`, `MeshSection`, `JobConfig`),
`rundir` (layout, atomic writes, config pinning), `task` (the `Task` interface a job implements),
`stages` (the stage graph for any task), `batches` (deterministic batches, compute-matched step
allocation), `tokenizer` (byte-level BPE trained on the run's data), `plots` (shared figures).
The engine imports `dfm`, never a task; tasks (`experiments.text`, `experiments.mllm`) import it.
"""
