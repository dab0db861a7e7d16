"""Console-script entry points of the tools, interruptible from their first line (see
lasad_engine.entry)."""

from lasad_engine.entry import startup_guard

lasad_export = startup_guard("lasad_tools.export", "main")
lasad_check = startup_guard("lasad_tools.check", "main")
lasad_profile = startup_guard("lasad_tools.profile", "main")
lasad_eval = startup_guard("lasad_tools.evaluate", "main")
