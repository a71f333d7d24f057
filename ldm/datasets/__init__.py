"""Dataset builders that make a real image-caption set offline, from installed packages
(`python -m ldm.datasets.emoji`), restyle one (`ldm.datasets.gameboy`) or split one (`ldm.datasets.split`)."""

from ldm import LdmError


class DatasetError(LdmError):
    """Bad arguments, a missing source or an output folder that is not empty; the message says what to change."""
