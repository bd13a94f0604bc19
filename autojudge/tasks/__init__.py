"""Tasks shared by mining, evaluation and benchmarks: datasets, prompts, answer checkers and the code sandbox."""
