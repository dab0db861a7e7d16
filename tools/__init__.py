"""lasad_tools: lasad-export, lasad-profile and the KV-cache baseline."""
