"""Stage two: the tower and heads, losses, the Ray Data input, the Ray Train loop, export.
Names load lazily: ``import train`` imports neither torch nor Ray."""

from store.faces import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "train.config": ["TrainConfig"],
        "train.export": ["TrainedModel", "load"],
        "train.loop": ["TrainError", "TrainResult", "train", "render_train"],
        "train.losses": ["LOSSES", "compute_loss"],
        "train.model": ["FacetCLIP", "ModelConfig", "build_model"],
    },
)
