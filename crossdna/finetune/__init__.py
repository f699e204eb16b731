"""Downstream finetuning: task readers (readers), splits and encoding (data), heads, whole-set metrics, the training
loop (trainer), suites with k seeds and MLflow parent/child runs (benchmark, tracking), FASTA embedding (embed).
Configuration: :class:`crossdna.finetune.config.BenchmarkConfig` (configs/finetune/*.yaml). See docs/finetuning.md."""
