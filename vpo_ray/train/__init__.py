"""Training the optimizer on Ray Train: `runner` (vpo train), `worker` (TRL + DeepSpeed per rank),
`data` (set checks and loading), `metrics` (metrics.jsonl, loss.png), `loop` (vpo loop)."""
