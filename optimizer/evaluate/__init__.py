"""Inner-loop scoring: tasks, generation and backends (transformers, vLLM)."""
