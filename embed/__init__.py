"""Stage one: prompts and recipes, token ids, engines (hf, vllm), the embed pipeline, the
planner, caption-contrastive tuning of the LLM. Names load lazily: ``import embed`` imports neither torch nor vLLM."""

from store.faces import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "embed.engine": ["Engine", "EngineConfig", "make_engine"],
        "embed.pipeline": [
            "EmbedConfig",
            "EmbedError",
            "EmbedSummary",
            "run_embed",
            "render_embed",
        ],
        "embed.plan": ["Plan", "PlanConfig", "make_plan", "render_plan"],
        "embed.prompts": ["BUILTIN_RECIPES", "PromptGroup", "Recipe", "get_recipe"],
        "embed.tune": [
            "TuneConfig",
            "TuneError",
            "TuneResult",
            "run_tune",
            "render_tune",
            "cpu_miniature",
        ],
        "embed.smollm2": ["materialize_smollm2", "render_smollm2"],
        "embed.pformer": ["PFormerConfig", "train_pformer", "render_pformer"],
        "embed.pformer_model": ["load_predictor", "PromptPredictor"],
    },
)
