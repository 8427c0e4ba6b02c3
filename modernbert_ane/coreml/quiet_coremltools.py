"""Import coremltools without its import-time noise.

On Linux every `import coremltools` logs "Failed to load _MLModelProxy ..." (the native
Core ML runtime exists only on macOS) and, with torch 2.13, "Torch version ... has not been
tested with coremltools". Both are harmless here; users should not see a wall of them.
Only those two messages are dropped: every other coremltools warning still shows.
"""
import logging

_HARMLESS_PREFIXES = ("Failed to load _ML", "Torch version ")


class _DropHarmlessImportWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HARMLESS_PREFIXES)


def import_coremltools():
    """Return the `coremltools` module, imported with its harmless import warnings filtered."""
    logger = logging.getLogger("coremltools")
    if not any(isinstance(f, _DropHarmlessImportWarnings) for f in logger.filters):
        logger.addFilter(_DropHarmlessImportWarnings())
    import coremltools
    return coremltools
