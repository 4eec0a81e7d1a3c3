"""Store stage: result.json, the only contract between measuring and reporting, and the run folder it lies in.

One module per concern: ``layout`` (cell ids and every per-cell file), ``result`` (result.json's typed sections),
``jsonio`` (atomic writes and reads), ``rows`` (error rows and one-line causes), ``identity`` (the settings that
make a figure, content hashes), ``rerun`` (skip-if-done and the previous result), ``locks``, ``environment``
(host, GPU, library versions, git) and ``redaction`` (secrets never reach a file). Import from the module.
"""
