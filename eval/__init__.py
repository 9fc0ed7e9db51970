"""Evaluation in two steps: `eval.generate` answers a schema file into predictions.jsonl (resumable, shardable);
`eval.score` turns prediction files into metrics.json, a markdown table and a chart without running a model.
`eval.diagnostics` holds the tools that look inside a model (probes, yes/no ranking, likelihood, stage tables)."""
