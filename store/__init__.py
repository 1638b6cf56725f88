"""The ground both stages stand on: the cache (format, atomic writing, reading, verifying,
inspecting, DuckDB views) and the shared I/O — the table reader, image datasets, Ray
start/join, run directories (checkpoints, metrics, plots), the all-gather. Names load lazily."""

from store.errors import CacheError, FacetclipError, InputError
from store.faces import lazy_face

__getattr__, __dir__, _lazy = lazy_face(
    __name__,
    {
        "store.cache": ["Cache", "Manifest", "ShardEntry"],
        "store.reader": ["KeyIndex", "iter_batches", "iter_cache", "read_shard", "vector_means"],
        "store.tables": ["CaptionSource", "iter_caption_batches", "available_columns"],
        "store.images": ["scan_images", "read_image_bytes", "resolve_image_format"],
        "store.cluster": ["init_ray"],
        "store.inspect": ["inspect_cache", "render_summary"],
        "store.sql": ["example_queries", "format_examples", "run_query", "write_result"],
        "store.verify": ["verify_cache", "render_report"],
        "store.neighbors": ["find_neighbors", "render_neighbors"],
        "store.export": ["EXPORT_FORMATS", "export_npy", "render_export"],
    },
)
__all__ = ["CacheError", "FacetclipError", "InputError", *_lazy]
