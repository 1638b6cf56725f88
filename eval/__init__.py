"""Evaluation and the testbed: zero-shot and retrieval metrics and reports, benchmark loaders,
sweeps (many runs + their evals), the synthetic dataset, the tiny LM, the demo. Names load
lazily."""

from store.faces import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "eval.benchmarks": ["ClassificationSet", "RetrievalSet", "load_benchmark"],
        "eval.evaluation": ["EvalConfig", "EvalReport", "evaluate", "markdown"],
        "eval.metrics": ["retrieval_recall", "zero_shot_accuracy"],
        "eval.sweep": ["SweepConfig", "SweepResult", "run_sweep", "render_sweep"],
        "eval.synth": ["SynthConfig", "write_synth", "render_synth"],
        "eval.tiny_llm": ["TinyLLMConfig", "build_tiny_llm", "probe_facets", "render_tiny_llm"],
        "eval.demo": ["DemoConfig", "run_demo"],
    },
)
