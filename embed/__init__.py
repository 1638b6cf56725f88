"""Stage one: prompts and recipes, token ids, engines (hf, vllm), the embed pipeline."""

from embed.engine import Engine, EngineConfig, make_engine
from embed.pipeline import EmbedConfig, EmbedError, EmbedSummary, run_embed
from embed.plan import Plan, PlanConfig, make_plan
from embed.prompts import BUILTIN_RECIPES, PromptGroup, Recipe, get_recipe

__all__ = ["Engine", "EngineConfig", "make_engine", "EmbedConfig", "EmbedError", "EmbedSummary",
           "run_embed", "Plan", "PlanConfig", "make_plan", "BUILTIN_RECIPES", "PromptGroup", "Recipe", "get_recipe"]  # fmt: skip
