"""Models: the compact target (`Target`), its static KV cache, the HF loader, and the GliDe draft."""

from .cache import KVCache
from .loader import load_target, pick_device, pick_dtype, read_config, save_hf
from .target import Target

__all__ = ["KVCache", "Target", "load_target", "save_hf", "read_config", "pick_device", "pick_dtype"]

from .glide import DraftCache, DraftConfig, Glide, load_draft, save_draft  # noqa: E402

__all__ += ["DraftCache", "DraftConfig", "Glide", "load_draft", "save_draft"]
