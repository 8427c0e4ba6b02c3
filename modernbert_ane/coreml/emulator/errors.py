"""The emulator's exceptions."""


class UnsupportedOpError(NotImplementedError):
    """The program contains an op type the emulator does not implement."""


class NotAnMLPackageError(ValueError):
    """The path is missing or is not an ML Program ``.mlpackage``."""


class EmulationError(ValueError):
    """A value the hardware could not represent faithfully (integer overflow in a narrowing
    cast, out-of-range gather/scatter index)."""
