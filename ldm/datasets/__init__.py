"""Dataset builders that make a real image-caption set offline, from installed packages
(`python -m ldm.datasets.emoji`)."""
