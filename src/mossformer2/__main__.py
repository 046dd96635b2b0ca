from mossformer2.cli import entry_point

entry_point()
