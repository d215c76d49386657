"""The transformers form of an exported model (tools/export.py writes it next to Fathom's own files).

configuration_fathom.py and modeling_fathom.py are copied into the exported folder with the model
modules they import (save.py generates that code); they also import here, inside Fathom.
"""
