"""Make the repository importable as installed, for scripts run from a bare checkout (the GPU
machine gets the tree, not an install): `lasad_engine`, `lasad_train` from the root, and the
`tools/` and `plugins/` folders under their installed names."""

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for installed, folder in (("lasad_tools", "tools"), ("lasad_plugins", "plugins")):
    if importlib.util.find_spec(installed) is None:
        sys.modules[installed] = importlib.import_module(folder)
