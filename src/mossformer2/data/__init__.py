"""Training and evaluation data: manifests, datasets, dynamic mixing, batching and loaders.

Submodules are imported on use (``from mossformer2.data.loaders import create_dataloaders``) so that importing
the package stays light.
"""
