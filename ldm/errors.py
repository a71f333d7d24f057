"""Errors of bad input, the bottom floor: every module may import this one, and it imports nothing of ldm.

LdmError is bad input, not a bug; each module raises its own subclass, and the command lines print it as one line
(ldm.cli.run). CheckpointError lives here because the file readers (ldm.io), the name maps (ldm.diffusers_names) and
the add-ons (LoRA, embeddings, ControlNet) all raise it without sitting above the model stack.
"""


class LdmError(ValueError):
    """Bad input, not a bug: a config, checkpoint, image, dataset or argument that cannot be used. The message says
    what to fix; each module raises its own subclass (ConfigError, CheckpointError, InputError, DataError, EvalError),
    and the command lines print it as one line (ldm.cli.run)."""


class CheckpointError(LdmError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file or key."""
