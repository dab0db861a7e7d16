"""lasad_engine: the LASADGen model, its op, its checkpoint format, and the runtime that serves it."""

from .checkpoint import (CheckpointError, file_fingerprint, load_checkpoint, read_checkpoint,
                         save_checkpoint)
from .config import LASAD_PRESET_NAMES, LasadConfig
from .engine import EngineError, LasadEngine, SamplingParams
from .model import LasadGen, LasadState
from .pipeline import LasadPipeline, LasadPipelineOutput
from .tokenizer import load_tokenizer, save_tokenizer

__version__ = "0.1.0"

__all__ = [
    "LasadConfig", "LASAD_PRESET_NAMES", "LasadGen", "LasadState",
    "save_checkpoint", "load_checkpoint", "read_checkpoint", "file_fingerprint", "CheckpointError",
    "LasadEngine", "SamplingParams", "EngineError", "LasadPipeline", "LasadPipelineOutput",
    "load_tokenizer", "save_tokenizer",
]
