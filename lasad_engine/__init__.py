"""lasad_engine: the LASADGen model, its op, its checkpoint format, and the runtime that serves it.

Names are imported on first use (PEP 562), so `import lasad_engine` and the command-line tools'
`--help` do not pay for importing torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "checkpoint": ("CheckpointError", "file_fingerprint", "load_checkpoint", "read_checkpoint", "resolve_checkpoint",
                   "save_checkpoint"),
    "config": ("LASAD_PRESET_NAMES", "LasadConfig"),
    "params": ("EngineError", "SamplingParams", "parse_grid", "resolve_device"),
    "engine": ("LasadEngine",),
    "model": ("LasadGen", "LasadState"),
    "pipeline": ("LasadPipeline", "LasadPipelineOutput"),
    "tokenizer": ("load_tokenizer", "save_tokenizer"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lasad_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
