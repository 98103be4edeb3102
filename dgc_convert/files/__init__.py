"""Files: atomic writes, every file name we write, the model file's format, checkpoint directories, plots.

Knows nothing of models by name, conversion or training: what it writes is handed to it.
"""
