"""The tools wing: CLI, demo, benchmarks, evaluations, local cluster and embedded broker. Production code
never imports it (a test checks)."""
