"""The benchmark harness of picie_jax and its peers (PyTorch, scikit-learn, faiss-cpu):
`python -m benchmarks.run --help`; BENCHMARKS.md describes the rows."""
